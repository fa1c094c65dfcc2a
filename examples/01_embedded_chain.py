# The whole chain on the embedded world, one explicit stage call at a time:
#
#   .venv/bin/python examples/01_embedded_chain.py --out runs/example01             # demo sizes
#   .venv/bin/python examples/01_embedded_chain.py --size tiny --out /tmp/ex01      # smoke run
#
# Tried on: 2-core x86_64 CPU, no GPU, torch 2.13.0+cpu, shared with other work.
#   --size tiny (micro model, 240 trees, 4 PPO updates): ~10 s (AMD EPYC, 2026-12-05). The micro
#     model does not yet answer any task (gold 0.0 before and after PPO): it checks the
#     plumbing, not the learning.
#   --size demo (configs/demo.yaml itself, loaded and checked whole: tiny model, 3000 trees,
#     3 SFT epochs, 60 PPO-ptx updates): the stages `make demo` runs, at its sizes; its
#     evaluation samples but skips greedy answers. Not timed here; `make demo`'s chain took
#     5-6 minutes on the 2-core machines (README).
#
# It does what `rlhfkit run configs/demo.yaml` does, but as plain Python calls, so each
# stage's inputs and outputs are visible and any of them can be swapped for your own:
#
#   synth_data -> build_data -> init_model -> train_sft -> train_reward -> train_ppo -> evaluate
#
# Between stages it prints one parseable line per stage (``STAGE key=value ...``):
#
#   WORLD trees=... messages=... pairs=...
#   DATA sft_train=... pairs_train=... prompts_train=... prompts_validation=...
#   MODEL parameters=... vocab_size=...
#   SFT eval_loss=... train_loss=... steps=... time_s=...
#   REWARD eval_accuracy=... gold_agreement=... eval_loss=... time_s=...
#   PPO_TRAIN updates=... gold_first=... gold_last=... score_first=... score_last=... kl=... time_s=...
#   PPO gold_before=... gold_after=... gain=... gain_se=... win_rate_gold=... kl=... prompts=...
#
# "gold" is the embedded world's judge (rlhfkit.world.gold_score, in [0, 1]); it is never
# shown to the reward model or to PPO, only measured. gold_before / gold_after are the SFT
# and PPO policies on held-out prompts, sampled at the PPO temperature.
#
# Re-running with the same --out reuses finished stages (SFT, reward and PPO also resume
# from their last checkpoint after a kill).
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Stage sizes: "demo" is configs/demo.yaml itself (the config `make demo` runs); "tiny" is the same
# file with these overrides (a 1-2 minute smoke run on the micro model).
TINY_OVERRIDES = [
    "world.trees=240", "data.val_fraction=0.2", "model.size=micro", "model.vocab_size=512",
    "sft.num_train_epochs=1", "sft.warmup_steps=0", "sft.save_steps=1000",
    "reward.learning_rate=1e-3", "reward.num_train_epochs=1", "reward.save_steps=1000",
    "ppo.num_updates=4", "ppo.rollout_batch_size=16", "ppo.per_device_train_batch_size=8", "ppo.num_ppo_epochs=1",
    "ppo.response_length=12", "ppo.learning_rate=1e-4", "ppo.save_steps=2", "ppo.sample_every=2",
    "eval.max_prompts=16", "eval.samples_per_prompt=2",
]
SIZES = {"demo": [], "tiny": TINY_OVERRIDES}


def fmt(value) -> str:
    """One token per value: floats with 4 decimals, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def say(stage: str, **figures) -> None:
    """Print ``STAGE key=value ...`` on one line (what tests and scripts parse)."""
    print(stage + " " + " ".join(f"{k}={fmt(v)}" for k, v in figures.items()), flush=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SFT -> reward model -> PPO on the embedded world, as Python calls.")
    p.add_argument("--size", choices=sorted(SIZES), default="demo",
                   help="demo = configs/demo.yaml as shipped (default); tiny = it with TINY_OVERRIDES, a 1-2 minute "
                        "smoke run")
    p.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    p.add_argument("--out", default=None, help="run folder (default runs/example01-SIZE)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Heavy imports after argument parsing, so --help is instant.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.artifacts import load_pretrained, load_tokenizer, resolve_model_path
    from rlhfkit.config import load_config
    from rlhfkit.data import DataBuildConfig, build_data, prompts_from_data_dir
    from rlhfkit.evaluate import evaluate
    from rlhfkit.pipeline import RunConfig
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.reward import RewardStageConfig, train_reward
    from rlhfkit.sft import SFTStageConfig, train_sft
    from rlhfkit.world import ModelInitConfig, SynthConfig, gold_score, init_model, synth_data

    # The shipped config, checked whole (every section, every key) before anything runs
    run = load_config(RunConfig, REPO / "configs" / "demo.yaml", SIZES[args.size])
    out = Path(args.out or f"runs/example01-{args.size}")
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    started = time.perf_counter()
    print(f"example 01: size={args.size} out={out}", flush=True)

    # 1. world: synthetic Open Assistant-style trees whose replies the gold judge can score
    trees = out / "world" / "trees.jsonl"
    if not trees.is_file():
        world = synth_data(SynthConfig(out=str(trees), seed=seed, **dataclasses.asdict(run.world)))
        say("WORLD", trees=world.metrics["trees"], messages=world.metrics["messages"], pairs=world.metrics["pairs"])

    # 2. data: trees -> SFT conversations and preference pairs, split by tree
    data = out / "data"
    if not (data / "manifest.json").is_file():
        fields = {k: v for k, v in dataclasses.asdict(run.data).items() if k != "source"}
        build_data(DataBuildConfig(sources=[str(trees)], out=str(data), seed=seed, **fields))
    stats = json.loads((data / "stats.json").read_text())["splits"]
    train_prompts = prompts_from_data_dir(data, "train")
    val_prompts = prompts_from_data_dir(data, "validation")
    say("DATA", sft_train=stats["train"]["sft_examples"], pairs_train=stats["train"]["pairs"],
        prompts_train=len(train_prompts), prompts_validation=len(val_prompts))

    # 3. model: a byte-level BPE tokenizer trained on the world, and an untrained Llama
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        fields = {k: v for k, v in dataclasses.asdict(run.model).items() if k != "name"}
        m = init_model(ModelInitConfig(out=str(model_dir), corpus=str(trees), seed=seed, **fields)).metrics
        say("MODEL", parameters=m["parameters"], vocab_size=m["vocab_size"])

    # 4. SFT. load_config routes TRL keys (learning_rate, num_train_epochs, ...) to trl_args
    #    and checks every key before anything loads; SFTStageConfig(...) works as well.
    sft_cfg = load_config(SFTStageConfig, {**run.sft, "model": str(model_dir), "data": str(data),
                                           "output_dir": str(out / "sft"), "seed": seed})
    sft = train_sft(sft_cfg).metrics
    say("SFT", eval_loss=sft["eval_loss"], train_loss=sft["train_loss"], train_loss_first=sft["train_loss_first"],
        steps=sft["steps"], time_s=sft["wall_time_s"])

    # 5. reward model: Bradley-Terry on the annotators' ranks, starting from the SFT model
    reward_cfg = load_config(RewardStageConfig, {**run.reward, "model": str(out / "sft"), "data": str(data),
                                                 "output_dir": str(out / "reward"), "seed": seed})
    rm = train_reward(reward_cfg).metrics
    say("REWARD", eval_accuracy=rm["eval_accuracy"], gold_agreement=rm["gold_agreement"], eval_loss=rm["eval_loss"],
        time_s=rm["wall_time_s"])

    # 6. PPO against the learned reward model; gold_fn is only measured and logged, never optimised
    def gold_fn(prompts, responses):
        return [gold_score(p, r) for p, r in zip(prompts, responses)]

    ppo_cfg = load_config(PPOStageConfig, {**run.ppo, "model": str(out / "sft"), "reward_model": str(out / "reward"),
                                           "data": str(data), "output_dir": str(out / "ppo"), "seed": seed})
    ppo = train_ppo(ppo_cfg, gold_fn=gold_fn).metrics
    rows = read_jsonl(out / "ppo" / "metrics.jsonl")
    say("PPO_TRAIN", updates=ppo["updates"], gold_first=rows[0].get("objective/gold") if rows else None,
        gold_last=ppo.get("objective/gold"), score_first=rows[0]["objective/scores"] if rows else None,
        score_last=ppo["objective/scores"], kl=ppo["objective/kl"], time_s=ppo["wall_time_s"])

    # 7. held-out gold evaluation: the SFT and the PPO policy answer the same validation prompts
    tokenizer = load_tokenizer(resolve_model_path(out / "sft"))
    sft_policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(out / "sft"))
    ppo_policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(out / "ppo"))
    reward_model = load_pretrained(AutoModelForSequenceClassification, resolve_model_path(out / "reward"), num_labels=1)
    eval_cfg = dataclasses.replace(run.eval, num_examples=3, greedy=False, seed=seed)
    ev, examples = evaluate(sft_policy, ppo_policy, reward_model.eval(), tokenizer, val_prompts, eval_cfg,
                            ppo_cfg.temperature, ppo_cfg.response_length, gold_score)
    (out / "eval.json").write_text(json.dumps({k: v for k, v in ev.items() if k != "scatter"}, indent=2))
    for ex in examples:
        print(f"  prompt: {ex['prompt']!r}\n    sft ({ex['sft_gold']:.1f}): {ex['sft']!r}\n"
              f"    ppo ({ex['ppo_gold']:.1f}): {ex['ppo']!r}")
    say("PPO", gold_before=ev["sft"]["gold"], gold_after=ev["ppo"]["gold"], gain=ev["gold_gain"],
        gain_se=ev["gold_gain_se"], win_rate_gold=ev["win_rate_gold"], reward_before=ev["sft"]["reward"],
        reward_after=ev["ppo"]["reward"], kl=ev["ppo"]["kl"], prompts=ev["prompts"])
    say("DONE", out=out, time_s=time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())

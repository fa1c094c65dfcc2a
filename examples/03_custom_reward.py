# PPO with your own reward function instead of a learned reward model.
#
#   .venv/bin/python examples/03_custom_reward.py --out runs/example03                  # demo sizes
#   .venv/bin/python examples/03_custom_reward.py --size tiny --out /tmp/ex03           # smoke run
#   .venv/bin/python examples/03_custom_reward.py --from-run runs/example01-demo --out runs/example03
#       (reuse the SFT model and data of examples/01_embedded_chain.py or of `rlhfkit run`)
#
# Tried on: 2-core x86_64 CPU (AMD EPYC), no GPU, torch 2.13.0+cpu.
#   --size tiny: 3 s with its own SFT (2026-12-06; gold stays 0.0 at this size: the micro
#   model answers nothing right yet, so the gold reward gives PPO no signal).
#   --size demo: the demo's SFT stage (an hour or more on that machine) plus 60 PPO updates;
#   not run to the end here.
#
# train_ppo takes ``reward_fn(prompts, responses) -> list[float]``: ``prompts`` are the
# conversations PPO sampled from (lists of {"role", "content"} messages ending with the
# user turn), ``responses`` the decoded replies. Here it is the embedded world's gold judge
# itself, so PPO optimises the true objective: the gold gain it reaches is the upper bound
# for what PPO against a *learned* reward model (example 01) can reach on this world.
#
# Without a reward model there is nothing to start the value model from, so
# ``value_model`` must be "policy" (a fresh scalar head on a copy of the SFT policy) or a
# folder; the default "reward" is a config error with reward_fn.
#
# Prints the same parseable lines as example 01:
#   PPO_TRAIN updates=... gold_first=... gold_last=... kl=... time_s=...
#   PPO gold_before=... gold_after=... gain=... gain_se=... win_rate_gold=... kl=... prompts=...
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
# Sizes: configs/demo.yaml itself (demo) or with example 01's TINY_OVERRIDES (tiny), read from
# those files, so the three stay one. PPO drops the demo's kl_budget and ptx_coef: they guard
# against a learned reward model's errors, and the gold judge has none to guard against.
NOT_FOR_GOLD = ("kl_budget", "ptx_coef")


def load_sizes(size: str):
    """The demo config (a RunConfig), checked whole, with example 01's overrides for ``tiny``."""
    import importlib.util

    from rlhfkit.config import load_config
    from rlhfkit.pipeline import RunConfig

    spec = importlib.util.spec_from_file_location("example01", Path(__file__).with_name("01_embedded_chain.py"))
    example01 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example01)  # import-safe: its heavy imports are inside main()
    return load_config(RunConfig, REPO / "configs" / "demo.yaml", example01.SIZES[size])


def fmt(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def say(stage: str, **figures) -> None:
    print(stage + " " + " ".join(f"{k}={fmt(v)}" for k, v in figures.items()), flush=True)


def gold_reward(prompts: list, responses: list[str]) -> list[float]:
    """The user's reward function: here the world's gold judge, a score in [0, 1] per reply.

    Any callable with this signature works: a rule, a classifier, an API call. It runs on
    every rollout batch of the main loop, so keep it fast (or batch it yourself).
    """
    from rlhfkit.world import gold_score

    return [gold_score(prompt, response) for prompt, response in zip(prompts, responses)]


def prepare_sft(out: Path, run, seed: int) -> tuple[Path, Path]:
    """world -> data -> model -> SFT, as in example 01 (each step skipped when already done)."""
    from rlhfkit.config import load_config
    from rlhfkit.data import DataBuildConfig, build_data
    from rlhfkit.sft import SFTStageConfig, train_sft
    from rlhfkit.world import ModelInitConfig, SynthConfig, init_model, synth_data

    trees, data, model_dir = out / "world" / "trees.jsonl", out / "data", out / "model"
    if not trees.is_file():
        synth_data(SynthConfig(out=str(trees), seed=seed, **dataclasses.asdict(run.world)))
    if not (data / "manifest.json").is_file():
        fields = {k: v for k, v in dataclasses.asdict(run.data).items() if k != "source"}
        build_data(DataBuildConfig(sources=[str(trees)], out=str(data), seed=seed, **fields))
    if not (model_dir / "config.json").is_file():
        fields = {k: v for k, v in dataclasses.asdict(run.model).items() if k != "name"}
        init_model(ModelInitConfig(out=str(model_dir), corpus=str(trees), seed=seed, **fields))
    sft_cfg = load_config(SFTStageConfig, {**run.sft, "model": str(model_dir), "data": str(data),
                                           "output_dir": str(out / "sft"), "seed": seed})
    m = train_sft(sft_cfg).metrics
    say("SFT", eval_loss=m["eval_loss"], train_loss=m["train_loss"], steps=m["steps"], time_s=m["wall_time_s"])
    return out / "sft", data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PPO against your own reward function (here the gold judge).")
    p.add_argument("--size", choices=["demo", "tiny"], default="demo",
                   help="demo = configs/demo.yaml's sizes (default); tiny = with example 01's TINY_OVERRIDES (smoke run)")
    p.add_argument("--tiny", dest="size", action="store_const", const="tiny", help="same as --size tiny")
    p.add_argument("--out", default=None, help="output folder (default runs/example03-SIZE)")
    p.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="reuse RUN_DIR/sft and RUN_DIR/data (example 01's --out, or an `rlhfkit run` folder)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForCausalLM

    from rlhfkit.artifacts import load_pretrained, load_tokenizer, resolve_model_path
    from rlhfkit.config import load_config
    from rlhfkit.data import prompts_from_data_dir
    from rlhfkit.evaluate import evaluate
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.world import gold_score

    run = load_sizes(args.size)
    out = Path(args.out or f"runs/example03-{args.size}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.from_run:
        sft_dir, data = Path(args.from_run) / "sft", Path(args.from_run) / "data"
        for need in (sft_dir, data):
            if not need.exists():
                print(f"error: {need} not found (run example 01 first, or drop --from-run)", file=sys.stderr)
                return 2
    else:
        sft_dir, data = prepare_sft(out, run, args.seed)

    # PPO: no reward_model, reward_fn instead; value_model="policy" (see the header).
    # Prompts are passed in memory: any list of message lists (or plain strings) works.
    train_prompts = prompts_from_data_dir(data, "train")
    ppo_cfg = load_config(PPOStageConfig, {**{k: v for k, v in run.ppo.items() if k not in NOT_FOR_GOLD},
                                           "model": str(sft_dir), "value_model": "policy",
                                           "output_dir": str(out / "ppo_gold"), "seed": args.seed})
    # gold_fn is only logged (objective/gold); here it is the reward itself, so it equals
    # objective/raw_scores (the score before the missing-EOS penalty).
    ppo = train_ppo(ppo_cfg, prompts=train_prompts, reward_fn=gold_reward, gold_fn=gold_reward).metrics
    rows = [json.loads(line) for line in (out / "ppo_gold" / "metrics.jsonl").read_text().splitlines()]
    say("PPO_TRAIN", updates=ppo["updates"], gold_first=rows[0]["objective/gold"], gold_last=ppo["objective/gold"],
        score_last=ppo["objective/scores"], kl=ppo["objective/kl"], time_s=ppo["wall_time_s"])

    # Held-out gold evaluation, SFT vs the gold-trained PPO policy (no reward model to report).
    tokenizer = load_tokenizer(resolve_model_path(sft_dir))
    sft_policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(sft_dir))
    ppo_policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(out / "ppo_gold"))
    eval_cfg = dataclasses.replace(run.eval, num_examples=3, greedy=False, seed=args.seed)
    ev, examples = evaluate(sft_policy, ppo_policy, None, tokenizer, prompts_from_data_dir(data, "validation"),
                            eval_cfg, ppo_cfg.temperature, ppo_cfg.response_length, gold_score)
    for ex in examples:
        print(f"  prompt: {ex['prompt']!r}\n    sft ({ex['sft_gold']:.1f}): {ex['sft']!r}\n"
              f"    ppo ({ex['ppo_gold']:.1f}): {ex['ppo']!r}")
    say("PPO", gold_before=ev["sft"]["gold"], gold_after=ev["ppo"]["gold"], gain=ev["gold_gain"],
        gain_se=ev["gold_gain_se"], win_rate_gold=ev["win_rate_gold"], kl=ev["ppo"]["kl"], prompts=ev["prompts"])
    say("DONE", out=out, time_s=time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())

# PPO with your own reward function instead of a learned reward model.
#
#   .venv/bin/python examples/03_custom_reward.py --out runs/example03                  # demo sizes
#   .venv/bin/python examples/03_custom_reward.py --size tiny --out /tmp/ex03           # smoke run
#   .venv/bin/python examples/03_custom_reward.py --from-run runs/example01-demo --out runs/example03
#       (reuse the SFT model and data of examples/01_embedded_chain.py or of `rlhfkit run`)
#
# Tried on: 2-core x86_64 CPU, no GPU, torch 2.13.0+cpu, shared with other work.
#   --size tiny: 80 s with its own SFT, 30 s with --from-run (gold stays 0.0 at this size:
#   the micro model answers nothing right yet, so the gold reward gives PPO no signal).
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
import json
import math
import os
import sys
import time
from pathlib import Path

# World + SFT sizes (as in example 01) and the PPO run against the gold reward.
SIZES = {
    "demo": {
        "world": {"trees": 3000, "annotator_noise": 0.5},
        "data": {"val_fraction": 0.1},
        "model": {"size": "tiny", "vocab_size": 4096},
        "sft": {"learning_rate": 3e-3, "num_train_epochs": 6, "per_device_train_batch_size": 64,
                "lr_scheduler_type": "cosine", "warmup_steps": 30},
        "ppo": {"num_updates": 60, "rollout_batch_size": 64, "num_mini_batches": 2, "per_device_train_batch_size": 32,
                "num_ppo_epochs": 2, "response_length": 24, "temperature": 1.0, "kl_coef": 0.02,
                "learning_rate": 5e-5, "vf_coef": 0.1, "save_steps": 10, "sample_every": 10},
        "eval": {"max_prompts": 200, "samples_per_prompt": 4},
    },
    "tiny": {
        "world": {"trees": 240, "annotator_noise": 0.5},
        "data": {"val_fraction": 0.2},
        "model": {"size": "micro", "vocab_size": 512},
        "sft": {"learning_rate": 3e-3, "num_train_epochs": 1, "per_device_train_batch_size": 32, "save_steps": 1000},
        "ppo": {"num_updates": 4, "rollout_batch_size": 16, "num_mini_batches": 2, "per_device_train_batch_size": 8,
                "num_ppo_epochs": 1, "response_length": 12, "learning_rate": 1e-4, "save_steps": 2,
                "sample_every": 2},
        "eval": {"max_prompts": 16, "samples_per_prompt": 2},
    },
}


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


def prepare_sft(out: Path, size: dict, seed: int) -> tuple[Path, Path]:
    """world -> data -> model -> SFT, as in example 01 (each step skipped when already done)."""
    from rlhfkit.config import load_config
    from rlhfkit.data import DataBuildConfig, build_data
    from rlhfkit.sft import SFTStageConfig, train_sft
    from rlhfkit.world import ModelInitConfig, SynthConfig, init_model, synth_data

    trees, data, model_dir = out / "world" / "trees.jsonl", out / "data", out / "model"
    if not trees.is_file():
        synth_data(SynthConfig(out=str(trees), seed=seed, **size["world"]))
    if not (data / "manifest.json").is_file():
        build_data(DataBuildConfig(sources=[str(trees)], out=str(data), seed=seed, **size["data"]))
    if not (model_dir / "config.json").is_file():
        init_model(ModelInitConfig(out=str(model_dir), corpus=str(trees), seed=seed, **size["model"]))
    sft_cfg = load_config(SFTStageConfig, {**size["sft"], "model": str(model_dir), "data": str(data),
                                           "output_dir": str(out / "sft"), "seed": seed})
    m = train_sft(sft_cfg).metrics
    say("SFT", eval_loss=m["eval_loss"], train_loss=m["train_loss"], steps=m["steps"], time_s=m["wall_time_s"])
    return out / "sft", data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PPO against your own reward function (here the gold judge).")
    p.add_argument("--size", choices=sorted(SIZES), default="demo", help="demo (default) or tiny (smoke run)")
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
    from rlhfkit.data import prompts_from_data_dir
    from rlhfkit.evaluate import EvalConfig, evaluate
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.world import gold_score

    size = SIZES[args.size]
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
        sft_dir, data = prepare_sft(out, size, args.seed)

    # PPO: no reward_model, reward_fn instead; value_model="policy" (see the header).
    # Prompts are passed in memory: any list of message lists (or plain strings) works.
    train_prompts = prompts_from_data_dir(data, "train")
    ppo_cfg = PPOStageConfig(model=str(sft_dir), value_model="policy", output_dir=str(out / "ppo_gold"),
                             seed=args.seed, **size["ppo"])
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
    eval_cfg = EvalConfig(num_examples=3, greedy=False, seed=args.seed, **size["eval"])
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

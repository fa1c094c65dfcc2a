"""rlhfkit's ``rloo`` and ``grpo`` against TRL's own RLOOTrainer and GRPOTrainer, on the same work.

From one finished chain (``rlhfkit run``: its ``sft/``, ``reward/`` and ``data/`` folders), each
system trains the SFT policy against the same reward-model folder (TRL: ``reward_funcs=<the
reward model's folder>``) on the same prompts, with the same sizes:

    episodes per generation  64 = 16 prompts x num_generations 4    (TRL: generation_batch_size)
    optimizer steps          2 minibatches of 32, 2 passes           (TRL: steps_per_generation 2,
                             = 4 per generation                          num_iterations 2)
    response length 24, temperature 1, KL coefficient beta 0.02, clip 0.2, AdamW lr 5e-5 linear,
    loss dapo (token mean), GRPO's std scaling on, no EOS penalty, no PPO-ptx, no KL budget

and each policy is then evaluated by rlhfkit's held-out evaluation against the SFT policy (gold
gain sampled and greedy, KL; ± SE across prompts). Only training is timed (rlhfkit: the RL
loop's ``wall_time_s``; TRL: ``trainer.train()``); model loading and evaluation are not.
Systems alternate within each seed, on the same machine, each in a fresh process (trainers
leave process-wide state behind, such as accelerate's singletons, that changed the numerics of
whatever ran after them in one process).

    .venv/bin/python benchmarks/trl_peers.py RUN_DIR [RUN_DIR ...] [--updates 60] [--seeds 0,1]
        [--systems rlhfkit-rloo,trl-rloo,rlhfkit-grpo,trl-grpo] [--out runs/trl-peers]

``rlhfkit-ppo`` is rlhfkit's PPO (value model from the reward model, GAE), which TRL 1.16 no longer
has: one sample of each of 64 prompts per generation, the same episodes and optimizer steps.
A system ``rlhfkit-<algorithm>-sequence`` sets ``importance_sampling_level: sequence`` (one
clipped ratio per response, the policy loss a mean over responses: TRL's RLOOTrainer loss for
rloo, GSPO for grpo); ``rlhfkit-<algorithm>-ptx`` adds PPO-ptx at the demo's ptx_coef 1.0 (the
SFT demonstrations' NLL in every step, which TRL's trainers do not offer); both may be combined
(``rlhfkit-rloo-sequence-ptx``). ``-ensemble`` (ours and TRL's alike; the chain trained with
``reward_ensemble: K``) trains against all K reward models: ours their mean of standardised scores
(each member's held-out mean and std), TRL's ``reward_funcs=[K folders]`` with ``reward_weights``
1/(K std_k), the same reward up to a constant; ours may reduce them instead by their
minimum (``-ensemble-min``) or mean - std (``-ensemble-msd``, Coste et al. 2023), which TRL's
weighted sum cannot. With several seeds the table ends with each system's mean ± SE across
seeds and the per-seed gold difference against TRL's trainer of the same algorithm (and reward models). Several
RUN_DIRs, one per seed (say the seed-0, -1 and -2 chains of a sweep), make each seed a full
replicate: its own SFT policy and reward model, not only its own RL seed.

Stdout ends with ONE JSON line (every row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_line  # benchmarks/machine.py (scripts run from benchmarks/)

SIZES = dict(num_generations=4, rollout_batch_size=64, per_device_train_batch_size=32, num_mini_batches=2,
             num_ppo_epochs=2, response_length=24, temperature=1.0, kl_coef=0.02, cliprange=0.2, learning_rate=5e-5)


VARIANTS = {"sequence": {"importance_sampling_level": "sequence"}, "ptx": {"ptx_coef": 1.0},
            "ensemble": {}, "min": {"ensemble_reduction": "min"}, "msd": {"ensemble_reduction": "mean_minus_std"}}
TRL_VARIANTS = {"ensemble"}  # TRL's trainers sum weighted reward functions: the ensemble's mean, not min or mean - std


def reward_members(run: Path) -> list[Path]:
    """The chain's reward-model folders, as many as its ``config.json`` says it trained (``reward_ensemble``)."""
    from rlhfkit.reward.ensemble import member_folders

    config = run / "config.json"
    size = json.loads(config.read_text()).get("reward_ensemble", 1) if config.is_file() else 1
    return member_folders(run / "reward", size)


def trl_reward_weights(members: list[Path]) -> list[float]:
    """TRL's ``reward_weights`` that make its weighted sum the ensemble's mean of standardised scores.

    rlhfkit's reward is (1/K) sum_k (s_k - mu_k) / sigma_k (each member's held-out mean and std);
    TRL's is sum_k w_k s_k. With w_k = 1 / (K sigma_k) the two differ by one constant,
    sum_k mu_k / (K sigma_k), which every group baseline (RLOO's, GRPO's) removes; the KL penalty
    sees the same scale.
    """
    from rlhfkit.engine.scoring import held_out_norm

    return [1.0 / (len(members) * held_out_norm(m)[1]) for m in members]


def train_rlhfkit(algorithm: str, run: Path, out: Path, updates: int, seed: int, variants: list[str]) -> float:
    from rlhfkit.ppo import PPOStageConfig, train_ppo

    reward = [str(m) for m in reward_members(run)] if "ensemble" in variants else str(run / "reward")
    config = PPOStageConfig(model=str(run / "sft"), reward_model=reward, data=str(run / "data"),
                            output_dir=str(out), algorithm=algorithm, num_updates=updates, seed=seed,
                            missing_eos_penalty=None, save_steps=0, sample_every=0,
                            **{**SIZES, **({"num_generations": 1} if algorithm == "ppo" else {})},
                            **{k: v for name in variants for k, v in VARIANTS[name].items()})
    return train_ppo(config).metrics["wall_time_s"]


def train_trl(algorithm: str, run: Path, out: Path, updates: int, seed: int, variants: list[str]) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from rlhfkit.data import prompts_from_data_dir

    config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    extra = {} if algorithm == "rloo" else {"scale_rewards": "group", "loss_type": "dapo"}
    members = reward_members(run) if "ensemble" in variants else [run / "reward"]
    if len(members) > 1:
        extra["reward_weights"] = trl_reward_weights(members)
    steps_per_update = SIZES["num_mini_batches"] * SIZES["num_ppo_epochs"]
    args = config_cls(
        output_dir=str(out), seed=seed, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10,
        learning_rate=SIZES["learning_rate"], lr_scheduler_type="linear", max_steps=updates * steps_per_update,
        per_device_train_batch_size=SIZES["per_device_train_batch_size"], gradient_accumulation_steps=1,
        steps_per_generation=SIZES["num_mini_batches"], num_iterations=SIZES["num_ppo_epochs"],
        num_generations=SIZES["num_generations"], max_completion_length=SIZES["response_length"],
        temperature=SIZES["temperature"], beta=SIZES["kl_coef"], epsilon=SIZES["cliprange"], disable_dropout=True,
        disable_tqdm=True, **extra)
    tokenizer = AutoTokenizer.from_pretrained(run / "sft" / "model", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")
    prompts = Dataset.from_dict({"prompt": prompts_from_data_dir(run / "data", "train")})
    reward_funcs = [str(m / "model") for m in members]
    trainer = trainer_cls(model=policy, reward_funcs=reward_funcs[0] if len(reward_funcs) == 1 else reward_funcs,
                          args=args, train_dataset=prompts, processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    return seconds


def evaluate(run: Path, policy: Path, out: Path, prompts: int) -> dict:
    from rlhfkit.evaluate import EvalStageConfig, evaluate_stage

    config = EvalStageConfig(policy=str(policy), reference=str(run / "sft"), reward_model=str(run / "reward"),
                             data=str(run / "data"), output_dir=str(out), max_prompts=prompts, samples_per_prompt=4,
                             temperature=SIZES["temperature"], response_length=SIZES["response_length"])
    return evaluate_stage(config).metrics


def run_system(system: str, seed: int, run: Path, a: argparse.Namespace) -> dict:
    """Train one system from ``run`` and evaluate its policy: one row."""
    owner, algorithm, *variants = system.split("-")
    out = a.out / f"{system}-seed{seed}"
    if out.exists() and (out / ".rlhfkit-bench").is_file():
        shutil.rmtree(out)  # this benchmark's own earlier output only
    out.mkdir(parents=True)
    (out / ".rlhfkit-bench").write_text("written by benchmarks/trl_peers.py\n")
    if owner == "rlhfkit":
        seconds = train_rlhfkit(algorithm, run, out / "train", a.updates, seed, variants)
    else:
        seconds = train_trl(algorithm, run, out / "train", a.updates, seed, variants)
    policy = out / "train" if owner == "rlhfkit" else out / "train" / "model"
    m = evaluate(run, policy, out / "eval", a.prompts)
    return {"system": system, "seed": seed, "train_s": round(seconds, 1),
            "reward_models": len(reward_members(run)) if "ensemble" in variants else 1,
            **{k: m.get(k) for k in ("gold_gain", "gold_gain_se", "greedy_gold_gain", "greedy_gold_gain_se")},
            "kl": m["ppo"]["kl"], "kl_se": m["ppo"]["kl_se"]}


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{mean:+.3f} ± {se:.3f}" if abs(mean) < 10 else f"{mean:.1f} ± {se:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="a finished `rlhfkit run` folder (sft/, reward/, data/), "
                                                             "or one per seed")
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--systems", default="rlhfkit-rloo,trl-rloo,rlhfkit-grpo,trl-grpo")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts evaluated (x 4 samples)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=SIZES["learning_rate"],
                        help="AdamW learning rate of every system (ours and TRL's alike)")
    parser.add_argument("--out", type=Path, default=Path("runs/trl-peers"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run one system, print its row
    a = parser.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {a.learning_rate}")
    SIZES["learning_rate"] = a.learning_rate
    if len(a.runs) not in (1, len(seeds)):
        parser.error(f"give one RUN_DIR, or one per seed ({len(seeds)}); got {len(a.runs)}")
    run_of = dict(zip(seeds, a.runs * len(seeds) if len(a.runs) == 1 else a.runs))
    for system in a.systems.split(","):
        owner, algorithm, *variants = system.split("-")
        ours = owner == "rlhfkit"
        if owner not in ("rlhfkit", "trl") or algorithm not in (("rloo", "grpo", "ppo") if ours else ("rloo", "grpo")) or (
                not set(variants) <= (set(VARIANTS) if ours else TRL_VARIANTS)) or (
                {"min", "msd"} & set(variants) and "ensemble" not in variants):
            parser.error(f"system {system!r}: rlhfkit-<rloo|grpo|ppo>[-sequence][-ptx][-ensemble[-min|-msd]] or "
                         "trl-<rloo|grpo>[-ensemble]")
        if "ensemble" in variants:
            for run in a.runs:
                if len(reward_members(run)) < 2:
                    parser.error(f"system {system!r}: {run} has one reward model; train the chain with "
                                 "reward_ensemble=3 (reward/members/N)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the children inherit it
    if a.child:  # one system, one seed: print its row
        import torch

        torch.set_num_threads(a.threads)
        print("ROW " + json.dumps(run_system(a.systems, seeds[0], run_of[seeds[0]], a)), flush=True)
        return
    from importlib.metadata import version  # the parent only starts children: no torch here

    print(machine_line())
    print(f"torch {version('torch')} ({a.threads} threads), trl {version('trl')}; runs {run_of}; "
          f"{a.updates} updates x {SIZES['rollout_batch_size']} episodes; sizes {SIZES}")
    rows = []
    for seed in seeds:
        for system in a.systems.split(","):
            child = subprocess.run(
                [sys.executable, __file__, str(run_of[seed]), "--seeds", str(seed), "--systems", system, "--updates",
                 str(a.updates), "--prompts", str(a.prompts), "--threads", str(a.threads), "--out", str(a.out),
                 "--learning-rate", str(a.learning_rate),
                 "--child"], stdout=subprocess.PIPE, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{child.stdout[-3000:]}\n{system} seed {seed} failed (exit {child.returncode})")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1][len("ROW "):]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'system':22} {'train s':>8} {'gold gain, sampled':>20} {'gold gain, greedy':>19} {'KL':>12}")
    for r in rows:
        print(f"{r['system']:22} {r['train_s']:8.1f} {r['gold_gain']:+10.3f} ± {r['gold_gain_se']:.3f}      "
              f"{r['greedy_gold_gain']:+9.3f} ± {r['greedy_gold_gain_se']:.3f} {r['kl']:7.2f} ± {r['kl_se']:.2f}")
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {(r["system"], r["seed"]): r for r in rows}
    if len(seeds) > 1:
        print(f"\nacross seeds {seeds} (mean ± SE of the per-seed figures; paired: minus TRL's trainer, same seed)")
    for system in systems:
        mine = [by[system, s] for s in seeds if (system, s) in by]
        owner, algorithm, *variants = system.split("-")
        peer = f"trl-{algorithm}" + ("-ensemble" if "ensemble" in variants else "")
        if len(seeds) > 1:
            line = f"{system:22}" + "".join(f" {key} {_mean_se([r[key] for r in mine])}"
                                            for key in ("train_s", "gold_gain", "greedy_gold_gain", "kl"))
            pairs = [(by[system, s], by[peer, s]) for s in seeds if (system, s) in by and (peer, s) in by]
            if system != peer and len(pairs) > 1:
                line += f"  paired gold {_mean_se([m['gold_gain'] - p['gold_gain'] for m, p in pairs])}"
            print(line)
        theirs = [by[peer, s]["train_s"] for s in seeds if (peer, s) in by]
        if system != peer and theirs and mine:
            print(f"  {system}: {peer} / {system} training time, median over seeds: "
                  f"{statistics.median(theirs) / statistics.median([r['train_s'] for r in mine]):.2f}x")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()

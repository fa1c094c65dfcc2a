"""rlhfkit's overhead over calling TRL directly, for the SFT and reward-model stages.

The same run (same model folder, data folder, TRL arguments) goes through
``rlhfkit.sft.train_sft`` / ``rlhfkit.reward.train_reward`` and through TRL's
``SFTTrainer`` / ``RewardTrainer`` called directly (data loaded and converted the way a
user of TRL would, model and tokenizer loaded by TRL from the folder, ``train()``,
``save_model()``). Each measured run is a fresh child process; its wall time runs from
the data folder to the saved model (imports excluded). Runs alternate between the two
systems (ABBA...) and the median of ``--reps`` is reported; one unmeasured warm-up run
of each comes first. Machines here are noisy: read the spread, not only the median.

    .venv/bin/python benchmarks/stage_overhead.py            # ~5 min on 2 cores, 1 torch thread per run
    .venv/bin/python benchmarks/stage_overhead.py --reps 5 --size tiny

Prints the machine, the workload, both wall times and rlhfkit's extra time in percent,
then one JSON line. Because the training loop is the same TRL code in both, the time spent
*outside* ``trainer.train()`` is also reported: it isolates rlhfkit's own work (config,
checks, resume discovery, its held-out scoring, metrics) from the machine's noise. CPU
time (user + sys of the run) is reported beside wall time: on a shared machine it moves
less than wall time. (rlhfkit's reward stage skips the Trainer's final evaluation, which
is inside ``train()``, and scores the validation split itself, outside it.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage_config(stage: str, work: Path, out: Path, args: argparse.Namespace):
    from rlhfkit.config import load_config

    common = {
        "output_dir": str(out),
        "data": str(work / "data"),
        "learning_rate": 3e-3 if stage == "sft" else 1e-3,
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch,
        "per_device_eval_batch_size": 64,
        "max_length": 128,
        "disable_tqdm": True,
        "seed": 0,
    }
    if stage == "sft":
        from rlhfkit.sft import SFTStageConfig

        return load_config(SFTStageConfig, {**common, "model": str(work / "model")})
    from rlhfkit.reward import RewardStageConfig

    return load_config(RewardStageConfig, {**common, "model": str(work / "sft")})


def trl_kwargs(stage: str, config) -> dict:
    """Exactly the TRL arguments the rlhfkit run uses (its defaults resolved)."""
    from rlhfkit.reward import REWARD_TRL_DEFAULTS
    from rlhfkit.sft import SFT_TRL_DEFAULTS
    from rlhfkit.training import resolve_trl_kwargs

    defaults = SFT_TRL_DEFAULTS if stage == "sft" else REWARD_TRL_DEFAULTS
    return resolve_trl_kwargs(config, defaults, has_eval=True)


def run_rlhfkit(stage: str, config) -> float:
    """Run the stage; return the seconds spent in ``trainer.train()``."""
    if stage == "sft":
        from rlhfkit.sft import train_sft

        return train_sft(config).metrics["train_time_s"]
    from rlhfkit.reward import train_reward

    return train_reward(config).metrics["train_time_s"]


def run_trl(stage: str, config, work: Path) -> float:
    """What a careful TRL user writes for the same run."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    kwargs = trl_kwargs(stage, config)
    if stage == "sft":
        dd = load_from_disk(str(work / "data" / "sft"))

        def split(ex):
            return {"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]}

        train = dd["train"].map(split, remove_columns=dd["train"].column_names)
        val = dd["validation"].map(split, remove_columns=dd["validation"].column_names)
        model_dir = str(work / "model")
        tok = AutoTokenizer.from_pretrained(model_dir)
        trainer = SFTTrainer(model=model_dir, args=SFTConfig(**kwargs), train_dataset=train, eval_dataset=val,
                             processing_class=tok)
    else:
        dd = load_from_disk(str(work / "data" / "pairs"))
        cols = ["prompt", "chosen", "rejected"]
        model_dir = str(work / "sft" / "model")
        tok = AutoTokenizer.from_pretrained(model_dir)
        trainer = RewardTrainer(model=model_dir, args=RewardConfig(**kwargs), train_dataset=dd["train"].select_columns(cols),
                                eval_dataset=dd["validation"].select_columns(cols), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    trainer.save_model(str(Path(config.output_dir) / "model"))
    return train_s


def child(stage: str, system: str, work: Path, out: Path, args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import rlhfkit.reward  # noqa: F401  (imports are not timed)
    import rlhfkit.sft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    t0, c0 = time.perf_counter(), time.process_time()
    config = stage_config(stage, work, out, args)
    train_s = run_rlhfkit(stage, config) if system == "rlhfkit" else run_trl(stage, config, work)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "cpu": time.process_time() - c0, "outside_train": wall - train_s}))


def measure(stage: str, system: str, work: Path, args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{stage}-{system}-", dir=work))
    cmd = [sys.executable, __file__, "--child", stage, system, "--work", str(work), "--out", str(out),
           "--epochs", str(args.epochs), "--batch", str(args.batch), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-3000:])
        raise SystemExit(f"{stage}/{system} run failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def setup(work: Path, args: argparse.Namespace) -> dict:
    from rlhfkit.data import DataBuildConfig, build_data
    from rlhfkit.sft import train_sft
    from rlhfkit.world import ModelInitConfig, SynthConfig, init_model, synth_data

    world = work / "world.jsonl"
    synth_data(SynthConfig(out=str(world), trees=args.trees, seed=0))
    data = build_data(DataBuildConfig(sources=[str(world)], out=str(work / "data"), val_fraction=0.05)).metrics
    model = init_model(ModelInitConfig(out=str(work / "model"), corpus=str(world), vocab_size=1024, size=args.size))
    # the reward runs start from an SFT model (one rlhfkit SFT run, not measured)
    train_sft(stage_config("sft", work, work / "sft", args))
    return {"sft_examples": data["splits"]["train"]["sft_examples"], "pairs": data["splits"]["train"]["pairs"],
            "parameters": model.metrics["parameters"]}


def machine() -> dict:
    import torch
    import transformers
    import trl

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--trees", type=int, default=1000)
    p.add_argument("--size", default="micro", choices=["micro", "tiny", "small"])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--stages", default="sft,reward")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run; 1 keeps the comparison stable on a shared machine, 0 = torch default")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (printed)")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "SYSTEM"))
    p.add_argument("--work")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.work), Path(args.out), args)
        return

    work = Path(tempfile.mkdtemp(prefix="rlhfkit-stage-overhead-"))
    mach = machine()
    print(f"machine: {mach}")
    workload = setup(work, args)
    workload.update(size=args.size, trees=args.trees, epochs=args.epochs, batch=args.batch, max_length=128,
                    torch_threads=args.threads or "default")
    print(f"workload: {workload}")
    results = {}
    for stage in args.stages.split(","):
        config = stage_config(stage, work, work / "x", args)
        print(f"{stage}: TRL args {json.dumps({k: v for k, v in trl_kwargs(stage, config).items() if k != 'output_dir'})}")
        measure(stage, "rlhfkit", work, args), measure(stage, "trl", work, args)  # warm-up, not counted
        runs: dict[str, list[dict]] = {"rlhfkit": [], "trl": []}
        for rep in range(args.reps):
            order = ["rlhfkit", "trl"] if rep % 2 == 0 else ["trl", "rlhfkit"]
            for system in order:
                runs[system].append(measure(stage, system, work, args))
        med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("wall", "cpu", "outside_train")}
               for s in runs}
        res = {
            "rlhfkit_wall_s": med["rlhfkit"]["wall"],
            "trl_wall_s": med["trl"]["wall"],
            "overhead_wall_pct": 100.0 * (med["rlhfkit"]["wall"] / med["trl"]["wall"] - 1),
            "rlhfkit_cpu_s": med["rlhfkit"]["cpu"],
            "trl_cpu_s": med["trl"]["cpu"],
            "overhead_cpu_pct": 100.0 * (med["rlhfkit"]["cpu"] / med["trl"]["cpu"] - 1),
            "rlhfkit_outside_train_s": med["rlhfkit"]["outside_train"],
            "trl_outside_train_s": med["trl"]["outside_train"],
            "overhead_outside_train_pct": 100.0 * (med["rlhfkit"]["outside_train"] - med["trl"]["outside_train"])
            / med["trl"]["wall"],
            "runs": {s: [{k: round(v, 2) for k, v in r.items()} for r in runs[s]] for s in runs},
        }
        results[stage] = res
        print(f"{stage}: wall rlhfkit {res['rlhfkit_wall_s']:.2f} s, TRL direct {res['trl_wall_s']:.2f} s "
              f"-> rlhfkit extra {res['overhead_wall_pct']:+.1f} %")
        print(f"{stage}: CPU  rlhfkit {res['rlhfkit_cpu_s']:.2f} s, TRL direct {res['trl_cpu_s']:.2f} s "
              f"-> rlhfkit extra {res['overhead_cpu_pct']:+.1f} %")
        print(f"{stage}: outside train() rlhfkit {res['rlhfkit_outside_train_s']:.2f} s, TRL direct "
              f"{res['trl_outside_train_s']:.2f} s -> rlhfkit extra {res['overhead_outside_train_pct']:+.1f} % "
              "of TRL's wall time")
    print(json.dumps({"benchmark": "stage_overhead", "machine": mach, "workload": workload, "reps": args.reps,
                      "results": results}))
    if args.keep:
        print(f"work folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

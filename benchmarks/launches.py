"""The RL stage under five launches on one machine: 1 process, 2 processes data parallel, FSDP, ZeRO-2, ZeRO-3.

Takes a finished ``rlhfkit run`` folder (its ``sft/``, ``reward/`` and ``data/``; e.g. ``make
demo``'s ``runs/demo``) and runs its ``ppo`` section for ``--updates`` updates from the same SFT
policy and reward model under each launch, interleaved (1, DDP, FSDP, ZeRO-2, ZeRO-3, 1, ...), each
in a fresh output folder:

    1 process  rlhfkit ppo CONFIG                                            (OMP_NUM_THREADS=2)
    DDP        accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m rlhfkit.cli ppo CONFIG
    FSDP       accelerate launch --config_file configs/accelerate/cpu_2proc_fsdp.yaml -m rlhfkit.cli ppo CONFIG
    ZeRO-2/3   the DDP command with ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2 (or 3)
               (all with ACCELERATE_USE_CPU=true and OMP_NUM_THREADS=1: two processes, one core each)

The same episodes per update in every launch (``rollout_batch_size`` counts all processes) and
micro-batches of ``--micro-batch`` episodes (one process: gradient accumulation 2). Figures per
launch, medians over ``--repeats``: the update loop's seconds per update (``metrics.json``'s
``wall_time_s`` / updates: from the first update to the last, model loading and sharding not
counted) and the whole command's wall time (start-up, loading, sharding, saving included).

    cd benchmarks && ../.venv/bin/python launches.py ../runs/demo --updates 10 --repeats 3

What it does not say: anything about GPUs (gloo on CPU cores is not NCCL on GPUs) or about
memory per process at scale (these models are tiny: sharding saves nothing that matters here).
Stdout ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line  # benchmarks/machine.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHES = {
    "1 process": ([str(BIN / "rlhfkit"), "ppo"], {"OMP_NUM_THREADS": "2"}),
    "2 processes, DDP": ([str(BIN / "accelerate"), "launch", "--config_file",
                          str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m", "rlhfkit.cli", "ppo"],
                         {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}),
    "2 processes, FSDP": ([str(BIN / "accelerate"), "launch", "--config_file",
                           str(ROOT / "configs/accelerate/cpu_2proc_fsdp.yaml"), "-m", "rlhfkit.cli", "ppo"],
                          {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}),
    **{f"2 processes, ZeRO-{stage}": ([str(BIN / "accelerate"), "launch", "--config_file",
                                       str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m", "rlhfkit.cli", "ppo"],
                                      {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_DEEPSPEED": "true",
                                       "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)})
       for stage in (2, 3)},
}


def ppo_config(run: Path, out: Path, updates: int, micro_batch: int) -> dict:
    """The run's ppo section, wired to its stages, for ``updates`` updates and no checkpoints."""
    chain = json.loads((run / "config.json").read_text())
    return {**chain["ppo"], "model": str(run / "sft"), "reward_model": str(run / "reward"), "data": str(run / "data"),
            "output_dir": str(out), "seed": chain["seed"], "num_updates": updates, "save_steps": 0,
            "sample_every": 0, "per_device_train_batch_size": micro_batch}


def run_once(launch: str, run: Path, work: Path, updates: int, micro_batch: int) -> dict:
    out = work / f"{launch.replace(' ', '_').replace(',', '')}-{time.time_ns()}"
    config = work / f"{out.name}.json"
    config.write_text(json.dumps(ppo_config(run, out, updates, micro_batch)))
    command, env = LAUNCHES[launch]
    started = time.perf_counter()
    done = subprocess.run([*command, str(config)], env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{done.stdout[-3000:]}\n{launch} failed (exit {done.returncode})")
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out)  # this benchmark's own folder, under its own mkdtemp
    return {"launch": launch, "loop_s_per_update": metrics["wall_time_s"] / metrics["updates_done"],
            "command_s": wall, "score": metrics["objective/scores"], "kl": metrics["objective/kl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `rlhfkit run` folder (sft/, reward/, data/, config.json)")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=16, help="per_device_train_batch_size of every launch")
    a = parser.parse_args()
    missing = [p for p in ("sft", "reward", "data", "config.json") if not (a.run / p).exists()]
    if missing:
        parser.error(f"{a.run}: not a finished `rlhfkit run` folder ({', '.join(missing)} missing)")
    if a.updates < 1 or a.repeats < 1:
        parser.error("--updates and --repeats must be >= 1")
    print(machine_line())
    print(f"run {a.run.resolve()}; {a.updates} updates; micro-batch {a.micro_batch}; repeats {a.repeats}, interleaved; "
          f"config {json.dumps(ppo_config(a.run, Path('OUT'), a.updates, a.micro_batch))}", flush=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="rlhfkit-launches-"))
    try:
        for _ in range(a.repeats):
            for launch in LAUNCHES:
                rows.append(run_once(launch, a.run.resolve(), work, a.updates, a.micro_batch))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'launch':20} {'loop s/update':>14} {'command s':>10}   (medians over {a.repeats})")
    one = statistics.median(r["loop_s_per_update"] for r in rows if r["launch"] == "1 process")
    for launch in LAUNCHES:
        mine = [r for r in rows if r["launch"] == launch]
        loop = statistics.median(r["loop_s_per_update"] for r in mine)
        print(f"{launch:20} {loop:14.2f} {statistics.median(r['command_s'] for r in mine):10.1f}"
              f"   {one / loop:.2f}x the 1-process update rate")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()

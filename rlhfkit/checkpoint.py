"""The RL stage's checkpoints: everything a resume needs, written atomically, nothing pickled.

Below the stages: the RL stage (``rlhfkit.ppo``) writes and resumes from them, the evaluation
reads their policies for the over-optimisation curve.

A checkpoint ``checkpoints/update-000010/`` holds the policy and value weights
(safetensors), the optimizer state (tensors; loaded with ``weights_only=True``), the
random generators of every process (safetensors) and ``state.json`` (update counter,
elapsed time, scheduler, KL controller, config). It is written to a temp sibling and
renamed, so a folder named ``update-*`` is always complete (docs/pitfalls.md#9); older ones are
removed only after the new one is in place. The files hold full tensors whatever the run's
sharding (FSDP shards are gathered to write and cut again to load: ``rlhfkit.engine.sharding``; a
ZeRO-2 optimizer state is assembled from its partitions and cut again: ``rlhfkit.engine.zero``),
so a checkpoint is the same file under any launch, and any launch resumes from it. ``state.json`` records each file's SHA-256: a
resume takes the newest checkpoint whose files still match (``latest_verified``) and sets
a damaged one aside as ``corrupt-update-*`` (kept for inspection, never loaded). The data
position is the update counter itself (prompts are drawn by ``batch_indices(update, ...)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file

from rlhfkit.artifacts import atomic_dir, damage, file_digests, read_json, sanitize, write_text_atomic
from rlhfkit.engine.sharding import full_state, is_partitioned, load_full_state
from rlhfkit.errors import ConfigError

PREFIX = "update-"
# Fields that may change between a run and its resume without changing the training.
RESUMABLE_CHANGES = {"output_dir", "report_to", "logging_steps", "sample_every", "num_samples", "save_steps",
                     "save_total_limit", "torch_threads", "rollout_forward_batch_size"}

POLICY_FILE = "policy.safetensors"  # the policy weights of a checkpoint (with full fine-tuning)


def completed(folder: Path) -> list[Path]:
    """The complete checkpoints, oldest first (temp folders of a killed save are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint."""
    done = completed(folder)
    return done[-1] if done else None


def damaged(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a file missing, changed or truncated), or None when it is intact."""
    try:
        state = read_json(path / "state.json")
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({e})"
    return damage(path, state.get("files"))


def latest_verified(folder: Path, log=print) -> Path | None:
    """The newest intact checkpoint; newer damaged ones are renamed ``corrupt-update-*`` and reported."""
    for path in reversed(completed(folder)):
        problem = damaged(path)
        if problem is None:
            return path
        aside = path.with_name("corrupt-" + path.name)
        os.replace(path, aside)
        log(f"checkpoint {path} is damaged: {problem}; set aside as {aside.name}, trying an older one")
    return None


def update_of(path: Path) -> int:
    """The update counter of checkpoint folder ``update-000010`` (10)."""
    return int(path.name[len(PREFIX):])


def _resumable_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}


def check_config(path: Path, config: Any) -> None:
    saved = read_json(path / "state.json")["config"]
    current = json.loads(json.dumps(_resumable_config(config)))
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise ConfigError(
            f"{path.parent.parent} holds checkpoints of another config (differs in {', '.join(changed)}); "
            "use a new output_dir or delete the old one"
        )


def check_processes(path: Path, num_processes: int) -> None:
    """A resume runs on as many processes as the run it continues: each process samples with its own
    generator, saved in the checkpoint (a checkpoint from before this was recorded is not checked)."""
    saved = read_json(path / "state.json").get("num_processes")
    if saved is not None and saved != num_processes:
        raise ConfigError(f"{path} was written by a run on {saved} process(es); resume it with {saved} "
                          f"(this launch has {num_processes}), or use a new output_dir")


def save(accelerator, folder: Path, update: int, elapsed: float, module, backend, kl_ctl, generators, config) -> None:
    """Write checkpoint ``update`` (every process calls it: sharded weights are gathered first)."""
    from accelerate.utils import gather_object

    rng = gather_object([[g.get_state() for g in generators]])
    # full tensors whatever the sharding, a tied weight once under the name safetensors' save_model
    # keeps; under FSDP every process all-gathers (a collective), else only the main one, which writes
    weights_partitioned = is_partitioned(module.policy)  # FSDP or ZeRO-3: gathering them is a collective
    if weights_partitioned or accelerator.is_main_process:
        weights = {part: full_state(getattr(module, part)) for part in ("policy", "value")
                   if getattr(module, part) is not None}  # rloo / grpo have no value model
    if backend.collective_state or accelerator.is_main_process:  # sharded or partitioned: a collective
        optimizer_state = backend.optimizer_state()
    if accelerator.is_main_process:
        with atomic_dir(folder / f"{PREFIX}{update:06d}") as tmp:
            for part, state in weights.items():
                save_file(state, str(tmp / (POLICY_FILE if part == "policy" else "value.safetensors")),
                          metadata={"format": "pt"})
            torch.save(optimizer_state, tmp / "optimizer.pt")
            save_file({f"rank{r}_gen{i}": s for r, states in enumerate(rng) for i, s in enumerate(states)},
                      str(tmp / "rng.safetensors"))
            files = file_digests(tmp)  # state.json, written next, is not among them
            write_text_atomic(tmp / "state.json", json.dumps({
                "files": files,
                "update": update,
                "num_processes": accelerator.num_processes,  # each process has its own generators
                "elapsed_s": elapsed,
                "scheduler": backend.scheduler.state_dict(),
                "kl_controller": kl_ctl.state_dict(),
                "config": _resumable_config(config),
            }, indent=2))
        old = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
        for stale in old[: max(0, len(old) - config.save_total_limit)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def load(path: Path, module, backend, kl_ctl, generators, rank: int) -> tuple[int, float]:
    """Restore every piece of state; returns (updates done, seconds spent so far).

    The files hold full tensors whatever the run's sharding: a sharded module takes its shards of them."""
    state = read_json(path / "state.json")
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    load_full_state(module.policy, load_file(str(path / POLICY_FILE)))  # a sharded module takes its shards
    if module.value is not None:
        load_full_state(module.value, load_file(str(path / "value.safetensors")))
    backend.load_optimizer_state(optimizer_state, state["scheduler"])  # after the weights (ZeRO reads them)
    kl_ctl.load_state_dict(state["kl_controller"])
    rng = load_file(str(path / "rng.safetensors"))
    for i, generator in enumerate(generators):
        generator.set_state(rng[f"rank{rank}_gen{i}"])
    return int(state["update"]), float(state["elapsed_s"])


def load_policy(path: Path, policy) -> None:
    """The policy weights of checkpoint ``path`` into ``policy`` (a model of the checkpoint's architecture)."""
    load_model(policy, str(path / POLICY_FILE))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row and flush it to disk: a killed run loses at most the row being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(sanitize(row), allow_nan=False) + "\n")  # strict JSON: a NaN figure is null
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a log written by ``append_jsonl`` (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_log(path: Path, update: int) -> None:
    """Drop rows past ``update`` (and a torn last line) so a resumed log has no duplicates."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("update", 0) <= update:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))

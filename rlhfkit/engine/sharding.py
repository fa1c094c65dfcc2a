"""FSDP2 sharding of the RL stage's models, and the full (unsharded) weights of those it trains.

Below the stages: the RL stage shards its policy, value, reference and reward models; the
checkpoints gather the trained ones.

Why rlhfkit calls torch's ``fully_shard`` itself rather than accelerate's FSDP plugin: the
plugin applies only on GPU-like devices (accelerate 1.15 turns a CPU launch into plain data
parallelism, silently), and one code path on CPU and GPU is one path tested on the CPU.
The launcher still decides: ``accelerate launch --use_fsdp --fsdp_version 2`` (or an FSDP
config file) exports ``ACCELERATE_USE_FSDP=true``, which ``fsdp_requested`` reads, so the
same rlhfkit config runs on 1 process, N data-parallel processes or N sharded ones
(docs/pitfalls.md#15: what goes silently wrong around sharding).

What sharding changes, and where it is handled:

* each decoder layer and then the whole model is one FSDP unit (``shard``): a layer's
  parameters are all-gathered just before its forward and freed after; gradients are
  reduce-scattered (averaged over processes, as DDP averages);
* sampling runs a different number of decode steps on each process (each stops when its own
  rows have ended), so it cannot all-gather inside each step: ``gathered`` unshards the
  policy once for the whole generation and reshards after (what TRL does for ZeRO-3);
* saving: ``full_state`` all-gathers every shard (every process must call it, in the same
  order) into the ordinary tensors an unsharded model holds; ``load_full_state`` and
  ``load_full_optimizer_state`` cut ordinary tensors back into this process's shards. So a
  checkpoint or final model written under FSDP is the very file an unsharded run writes,
  and either kind of run resumes from it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from rlhfkit.errors import ConfigError


def fsdp_requested(distributed_type: str | None = None) -> bool:
    """Whether the launcher asked for FSDP (``--use_fsdp``, or a config file with ``distributed_type: FSDP``).

    ``distributed_type`` is accelerate's (``"FSDP"`` on GPUs); on the CPU accelerate reports
    MULTI_CPU and only the launcher's environment says FSDP. FSDP1 is refused in one line."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" and distributed_type != "FSDP":
        return False
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ConfigError(f"FSDP version {version}: rlhfkit's RL stage shards with FSDP2; launch with --fsdp_version 2 "
                          "(or fsdp_version: 2 in the accelerate config)")
    return True


def is_sharded(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` is an FSDP2 unit (``shard`` made it one); called before every forward."""
    from torch.distributed.fsdp import FSDPModule  # torch.distributed loads only for what shards

    return model is not None and isinstance(model, FSDPModule)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over all processes: each decoder layer one unit (the classes a transformers model
    lists in ``_no_split_modules``); then each direct child with parameters (the backbone, the
    head) one unit when no weight is tied across them, since the value forward calls the
    backbone and the score head one at a time (``forward.token_values``), and a unit's weights
    are gathered only for its own forward; the rest is the root unit. The parameters become
    DTensors in place: build the optimizer afterwards."""
    from torch.distributed.fsdp import fully_shard

    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module)
    children = [c for c in model.children() if any(True for _ in c.parameters())]
    owned = [{id(p) for p in c.parameters()} for c in children]
    if sum(len(o) for o in owned) == len(set().union(*owned)):  # no weight tied across children
        for child in children:
            fully_shard(child)
    fully_shard(model)
    return model


def is_partitioned(model: torch.nn.Module | None) -> bool:
    """Whether ``model``'s weights are split over the processes (FSDP2, or DeepSpeed ZeRO-3): gathering
    them is then a collective every process must join."""
    from rlhfkit.engine import zero

    return is_sharded(model) or zero.is_partitioned(model)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The whole model unsharded for a generation (no collective inside it), resharded after.

    A no-op for an unsharded model."""
    from rlhfkit.engine import zero

    if zero.is_partitioned(model):
        with zero.gathered(model):
            yield model
        return
    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:  # forwards inside keep the gathered weights (no all-gather, no free)
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor.detach().cpu()


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each weight's names, keyed by the first in sorted order (the one safetensors' ``save_model``
    keeps): a tied weight (embeddings and LM head) is one parameter under several names. Read from
    the modules, since a sharded model's state dict gives each name its own tensor."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    return {min(group): sorted(group) for group in names.values()}


def full_state(model: torch.nn.Module, all_names: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights as ordinary CPU tensors, a tied weight once (under its first name,
    as ``save_model`` writes it) or, with ``all_names``, as one tensor under each of its names
    (as ``save_pretrained`` takes them). Under FSDP or ZeRO-3 every process must call it (each weight
    is all-gathered)."""
    from rlhfkit.engine import zero

    if zero.is_partitioned(model):
        with zero.whole(model):
            return _full_state(model, all_names)
    return _full_state(model, all_names)


def _full_state(model: torch.nn.Module, all_names: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = {}
    for first, group in sorted(tied_names(model).items()):
        if first not in state:  # a non-persistent buffer
            continue
        out[first] = _full(state[first])
        for name in group[1:] if all_names else []:
            out[name] = out[first]
    return out


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut as ``like`` is (this process's shard of a DTensor), else ``full`` on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):  # every process holds the full tensor: cut locally, no communication
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device)


@torch.no_grad()
def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full weights (as ``full_state`` gives them, a tied weight under any of its names) into a
    sharded model, each process taking its shards (ZeRO-3: the main process's copy is partitioned)."""
    from rlhfkit.engine import zero

    if zero.is_partitioned(model):
        with zero.whole(model, modifier_rank=0):
            _load_full_state(model, state)
        return
    _load_full_state(model, state)


def _load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    live = model.state_dict()
    for group in tied_names(model).values():
        source = next((state[name] for name in group if name in state), None)
        for name in group:
            if name not in live:
                continue
            if source is None:
                raise KeyError(f"{name} is missing from the weights")
            live[name].copy_(_shard_like(source, live[name]))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor all-gathered (every process calls it)."""
    state = optimizer.state_dict()
    return {"state": {i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an ``optimizer.state_dict()`` of full tensors into an optimizer over sharded parameters:
    each state tensor shaped like its parameter is cut as the parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {"param_groups": state["param_groups"], "state": {}}
    for i, entries in state["state"].items():
        param = params[int(i)]
        sharded["state"][i] = {k: _shard_like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                               for k, v in entries.items()}
    optimizer.load_state_dict(sharded)


def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded gradients; the total norm as an ordinary tensor
    (the same on every process)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextlib.contextmanager
def every_process_loads() -> Iterator[None]:
    """Every process reads the whole weights it loads inside, whatever the launcher says.

    Under an FSDP launch (``fsdp_cpu_ram_efficient_loading``, accelerate's default) transformers
    fills the weights on local rank 0 only and leaves empty "meta" tensors elsewhere, for
    accelerate's prepare to broadcast, which the RL stage does not call under FSDP (it shards
    itself), so every process loads the full weights and then keeps its shards. Under a ZeRO-3
    launch, once a TRL stage of the chain has run in this process, transformers loads every model
    partitioned (``zero.Init``); the RL stage partitions only the models it trains, in its engines."""
    import transformers.integrations.deepspeed as hf_deepspeed

    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    before, zero3_config = os.environ.get(key), hf_deepspeed._hf_deepspeed_config_weak_ref
    os.environ[key] = "false"
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = zero3_config
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before

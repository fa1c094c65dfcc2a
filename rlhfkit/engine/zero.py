"""DeepSpeed ZeRO for the RL stage's trained models: stage 2 partitions their optimizer state and
gradients over the processes; stage 3 their weights as well.

Below the stages, beside ``sharding`` (FSDP2): the RL stage makes one ``ZeroModels`` when the
launcher asks for DeepSpeed (``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``
or ``deepspeed_zero3.yaml`` exports ``ACCELERATE_USE_DEEPSPEED=true`` and ``ACCELERATE_DEEPSPEED_ZERO_STAGE``).

Why rlhfkit calls ``deepspeed.initialize`` itself rather than accelerate's ``prepare``: on a machine
without GPUs accelerate gives a DeepSpeed launch a one-process state on every rank (each would
believe it is the main process), while ``deepspeed.initialize`` over the gloo group trains
correctly; one code path on CPU and GPU is one path tested on the CPU (as for FSDP).

What ZeRO changes, and where it is handled:

* one engine per trained model (policy, value): PPO clips each model's gradient norm on its own,
  as the data-parallel run does, and an engine clips all its parameters together;
* the forwards call the models (and their parts) directly, not through the engines: ``before_forward``
  does what ``engine.forward`` would first (ZeRO's per-micro-batch bookkeeping);
* each engine's ``backward`` divides the loss by the accumulation steps and its gradients are
  averaged over the processes (what accelerate and DDP do), so ``ppo_update``'s loss weights are
  unchanged; ``step`` after every micro-batch steps the optimizer (clipping first) and the
  learning-rate schedule at the minibatch's last one;
* ZeRO-2: weights stay whole on every process, so sampling, the forwards and the saved weights are
  those of an unsharded run. ZeRO-3: each weight is all-gathered for the forward of its layer (DeepSpeed's
  hooks); sampling runs a different number of decode steps on each process, so ``gathered`` unshards
  the whole policy once for the generation with the hooks removed (what TRL does), the forwards
  skip no padding (``forward._grouped``: each is a collective), and the saved weights are gathered
  (``sharding.full_state``; every process calls it). The frozen models (reference, reward models)
  stay whole on every process;
* a checkpoint holds the optimizer state whole, in the layout ``torch.optim.AdamW.state_dict()`` of one
  data-parallel run has (assembled with DeepSpeed's ``safe_get_full_optimizer_state``), so every
  launch resumes from every other's checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import weakref
from typing import Any, Iterator

import torch

ADAM_STATES = ("exp_avg", "exp_avg_sq")
_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def zero_stage() -> int | None:
    """The ZeRO stage the launcher asks for (``ACCELERATE_DEEPSPEED_ZERO_STAGE``, 2 when unset), None without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)


@contextlib.contextmanager
def without_deepspeed_on_cpu() -> Iterator[None]:
    """A TRL stage (SFT, reward, DPO) under a DeepSpeed launch on a machine without GPUs: there
    accelerate trains it data parallel, without a DeepSpeed engine, but transformers would still load
    its model ZeRO-3-partitioned (its ``TrainingArguments`` read ``ACCELERATE_USE_DEEPSPEED``), so the
    variable is hidden from it for the stage. On GPUs nothing changes: TRL runs DeepSpeed itself."""
    key = "ACCELERATE_USE_DEEPSPEED"
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    before = os.environ.get(key)
    if cpu and before is not None:
        os.environ.pop(key)
    try:
        yield
    finally:
        if cpu and before is not None:
            os.environ[key] = before


def zero_problems() -> list[str]:
    """What a DeepSpeed launch asks that the RL stage cannot do, read from the launcher's environment."""
    stage = zero_stage()
    if stage is None:
        return []
    problems = []
    if stage not in (2, 3):
        problems.append(f"DeepSpeed ZeRO stage {stage}: the RL stage runs ZeRO-2 or ZeRO-3 (configs/accelerate/"
                        "deepspeed_zero2.yaml, deepspeed_zero3.yaml); for plain data parallelism use multi_gpu.yaml")
    for kind in ("OPTIMIZER", "PARAM"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind}_DEVICE", "none").lower()
        if device not in ("", "none"):
            problems.append(f"DeepSpeed offload_{kind.lower()}_device {device}: the RL stage does not offload; set it to none")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        problems.append("a DeepSpeed config file (deepspeed_config_file): the RL stage builds its own DeepSpeed config "
                        "from its fields; set zero_stage (2 or 3) in the accelerate config instead")
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("DeepSpeed launch: deepspeed is not installed (pip install deepspeed)")
    return problems


class ZeroModels:
    """The RL stage's trained models (policy, and value when there is one), each in a ZeRO engine
    with its own AdamW and learning-rate schedule."""

    def __init__(self, parts: list[torch.nn.Module], make_optimizer, make_scheduler, *, stage: int, micro_batch: int,
                 accumulation: int, max_grad_norm: float):
        import deepspeed

        self.stage = stage
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, the optimizer of the other launches
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.parts = parts
        self.engines = []
        for part in parts:
            optimizer = make_optimizer([p for p in part.parameters() if p.requires_grad])
            engine, *_ = deepspeed.initialize(model=part, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer),
                                              config=ds_config)
            self.engines.append(engine)
            _ENGINES[part] = engine  # for ``gathered``: sampling takes the model, its hooks are the engine's

    @property
    def scheduler(self):
        """The policy's schedule (every engine's is the same)."""
        return self.engines[0].lr_scheduler

    def before_forward(self) -> None:
        """What ``engine.forward`` does first, for forwards that call the models (or their parts) directly:
        ZeRO's per-micro-batch bookkeeping (ZeRO-3 counts micro-batches here, so that a micro-batch's
        gradients add to the earlier ones' instead of replacing them)."""
        for engine in self.engines:
            engine.optimizer.clear_backward_seen_flag()

    def backward_and_step(self, losses: list[torch.Tensor]) -> None:
        """Each model's loss through its engine (``losses`` in the order of ``parts``); an optimizer step
        at the accumulation boundary, after which a non-finite gradient norm stops the run."""
        from rlhfkit.errors import RlhfkitError

        for engine, loss in zip(self.engines, losses):
            engine.backward(loss)
        for engine in self.engines:
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            norm = engine.get_global_grad_norm() if boundary else None
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                raise RlhfkitError("gradient norm is not finite: lower learning_rate or check the reward scale")

    def trained(self) -> list[torch.nn.Parameter]:
        return [p for part in self.parts for p in part.parameters() if p.requires_grad]

    def full_optimizer_state(self) -> dict:
        """The optimizer state whole, as ``AdamW.state_dict()`` of one optimizer over all trained parameters
        (policy's first) has it; every process must call it (each piece is assembled from all partitions)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        state: dict[int, dict[str, Any]] = {}
        for i, param in enumerate(self.trained()):
            entries = {key: safe_get_full_optimizer_state(param, key) for key in ADAM_STATES}
            if all(v is not None for v in entries.values()):  # none before the first step
                state[i] = {"step": self._step(), **{k: v.detach().cpu() for k, v in entries.items()}}
        inner = self.engines[0].optimizer.optimizer  # the AdamW inside ZeRO: the same hyperparameters in each
        group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(self.trained())))}]}

    def _step(self) -> torch.Tensor:
        """AdamW's step count (every parameter has taken the same steps)."""
        for engine in self.engines:
            for entries in engine.optimizer.optimizer.state.values():  # keyed by ZeRO's flat partitions
                return entries["step"].detach().cpu().clone()
        raise KeyError("no optimizer step yet")

    def load_full_optimizer_state(self, state: dict, scheduler_state: dict) -> None:
        """Load a whole optimizer state (``full_optimizer_state``'s layout, or a data-parallel run's) and
        the schedule's state into every engine: the master weights are refreshed from the model weights
        (load those first), then each process keeps its partition of every Adam moment."""
        import deepspeed
        from deepspeed.utils import safe_set_full_optimizer_state

        from rlhfkit.errors import RlhfkitError

        for engine in self.engines:
            engine.lr_scheduler.load_state_dict(scheduler_state)
        steps = [s["step"] for s in state["state"].values()]
        for engine in self.engines:
            zero = engine.optimizer
            zero.refresh_fp32_params()  # the fp32 partitions from the weights just loaded
            inner = zero.optimizer
            for group, saved in zip(inner.param_groups, state["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            if steps:  # AdamW creates its state lazily: make it, then (ZeRO-2) let ZeRO link each weight's slice of it
                flats = (zero.fp32_partitioned_groups_flat if self.stage == 3
                         else [p for group in inner.param_groups for p in group["params"]])
                for flat in flats:
                    inner.state[flat] = {"step": steps[0].clone().to(flat.device),
                                         **{k: torch.zeros_like(flat) for k in ADAM_STATES}}
                if self.stage == 3:  # reads the state of its flat partitions directly
                    continue
                if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # DeepSpeed's own, not public API
                    raise RlhfkitError(f"deepspeed {deepspeed.__version__} links optimizer state differently from "
                                       "0.19 (tested: 0.19.8); install deepspeed 0.19.x to resume under ZeRO-2")
                zero._hp_optimizer_states_linked = False
                zero._lazy_init_hp_params_optimizer_state()
        for i, param in enumerate(self.trained()):
            if i in state["state"]:
                for key in ADAM_STATES:
                    safe_set_full_optimizer_state(param, state["state"][i][key].to(param.device), key)


def is_partitioned(model: torch.nn.Module | None) -> bool:
    """Whether ``model``'s weights are ZeRO-3 partitions (each process holds a slice of each). ZeRO-3
    converts every parameter of the model it wraps, so the first one says (asked before every forward)."""
    first = None if model is None else next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A ZeRO-3 model whole for a generation, its hooks removed (no collective inside), partitioned after."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    offload = _ENGINES[model].optimizer.parameter_offload
    with GatheredParameters(list(model.parameters())):
        for param in model.parameters():
            param.ds_active_sub_modules.clear()
        # every hook of DeepSpeed's: the gather/release of each layer's weights, and the model's
        # start-of-forward hook (a check that every process is at the same step: a collective)
        start = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]
        for hook in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield model
        finally:  # back in the order DeepSpeed registered them
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start)
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def whole(model: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[torch.nn.Module]:
    """A ZeRO-3 model's weights whole inside (every process calls it); with ``modifier_rank`` that
    process's changes are what every process keeps."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank):
        yield model

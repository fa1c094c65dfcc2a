"""DeepSpeed ZeRO-2 for the RL stage's trained models: optimizer state and gradients partitioned over
the processes, weights replicated.

Below the stages, beside ``sharding`` (FSDP2): the RL stage makes one ``ZeroModels`` when the
launcher asks for DeepSpeed (``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``
exports ``ACCELERATE_USE_DEEPSPEED=true`` and ``ACCELERATE_DEEPSPEED_ZERO_STAGE``).

Why rlhfkit calls ``deepspeed.initialize`` itself rather than accelerate's ``prepare``: on a machine
without GPUs accelerate gives a DeepSpeed launch a one-process state on every rank (each would
believe it is the main process), while ``deepspeed.initialize`` over the gloo group trains
correctly; one code path on CPU and GPU is one path tested on the CPU (as for FSDP).

What ZeRO-2 changes, and where it is handled:

* one engine per trained model (policy, value): PPO clips each model's gradient norm on its own,
  as the data-parallel run does, and an engine clips all its parameters together;
* each engine's ``backward`` divides the loss by the accumulation steps and its gradients are
  averaged over the processes (what accelerate and DDP do), so ``ppo_update``'s loss weights are
  unchanged; ``step`` after every micro-batch steps the optimizer (clipping first) and the
  learning-rate schedule at the minibatch's last one;
* weights stay whole on every process: sampling, the forwards and the saved weights are those of
  an unsharded run; only the optimizer state is partitioned. A checkpoint holds it whole, in the
  layout ``torch.optim.AdamW.state_dict()`` of one data-parallel run has (assembled with
  DeepSpeed's ``safe_get_full_optimizer_state``), so either launch resumes from either's checkpoint.

ZeRO-3 (weights partitioned too) is refused in one line: shard the weights with FSDP
(``configs/accelerate/fsdp.yaml``), which the RL stage supports.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def zero_stage() -> int | None:
    """The ZeRO stage the launcher asks for (``ACCELERATE_DEEPSPEED_ZERO_STAGE``, 2 when unset), None without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)


def zero_problems() -> list[str]:
    """What a DeepSpeed launch asks that the RL stage cannot do, read from the launcher's environment."""
    stage = zero_stage()
    if stage is None:
        return []
    problems = []
    if stage != 2:
        problems.append(f"DeepSpeed ZeRO stage {stage}: the RL stage runs ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml); "
                        "to shard the weights as well, launch it with configs/accelerate/fsdp.yaml")
    for kind in ("OPTIMIZER", "PARAM"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind}_DEVICE", "none").lower()
        if device not in ("", "none"):
            problems.append(f"DeepSpeed offload_{kind.lower()}_device {device}: the RL stage does not offload; set it to none")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        problems.append("a DeepSpeed config file (deepspeed_config_file): the RL stage builds its own DeepSpeed config "
                        "from its fields; launch with zero_stage: 2 in the accelerate config instead")
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("DeepSpeed launch: deepspeed is not installed (pip install deepspeed)")
    return problems


class ZeroModels:
    """The RL stage's trained models (policy, and value when there is one), each in a ZeRO-2 engine
    with its own AdamW and learning-rate schedule."""

    def __init__(self, parts: list[torch.nn.Module], make_optimizer, make_scheduler, *, micro_batch: int,
                 accumulation: int, max_grad_norm: float):
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": 2},
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

    @property
    def scheduler(self):
        """The policy's schedule (every engine's is the same)."""
        return self.engines[0].lr_scheduler

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
            inner = engine.optimizer.optimizer
            for flat in (p for group in inner.param_groups for p in group["params"]):
                if flat in inner.state:
                    return inner.state[flat]["step"].detach().cpu().clone()
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
            if steps:  # AdamW creates its state lazily: make it, then let ZeRO link each weight's slice of it
                for flat in (p for group in inner.param_groups for p in group["params"]):
                    inner.state[flat] = {"step": steps[0].clone().to(flat.device),
                                         **{k: torch.zeros_like(flat) for k in ADAM_STATES}}
                if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # DeepSpeed's own, not public API
                    raise RlhfkitError(f"deepspeed {deepspeed.__version__} links optimizer state differently from "
                                       "0.19 (tested: 0.19.8); install deepspeed 0.19.x to resume under ZeRO-2")
                zero._hp_optimizer_states_linked = False
                zero._lazy_init_hp_params_optimizer_state()
        for i, param in enumerate(self.trained()):
            if i in state["state"]:
                for key in ADAM_STATES:
                    safe_set_full_optimizer_state(param, state["state"][i][key].to(param.device), key)

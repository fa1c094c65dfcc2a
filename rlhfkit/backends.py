"""How the RL stage's update steps under each launch: one small object per backend, chosen once at set-up.

The update (``rlhfkit.ppo.trainer.ppo_update``) computes its losses the same way whatever the
launch; what differs is only how a micro-batch's gradients are accumulated, synchronised and
applied, and how the optimizer state is gathered for a checkpoint:

- ``DataParallel``: one process, or DDP through accelerate (``accelerator.prepare``): accelerate
  counts the micro-batches and syncs the gradients on the last one; one AdamW over both models.
- ``Sharded``: FSDP2 (``fully_shard``, our own): the gradients stay local until the minibatch's last
  micro-batch (one reduce-scatter of their sum), clipped with torch over the sharded gradients.
- ``Zero``: DeepSpeed ZeRO-2/3: an engine per trained model (``rlhfkit.engine.zero.ZeroModels``),
  each with its own AdamW, schedule and gradient clipping, stepping at the accumulation boundary.

Each has the same methods: ``before_forward``, ``ptx`` (where the PPO-ptx term's gradient goes),
``micro_batch`` (a context around one micro-batch's forward and backward), ``backward_and_step``,
and for checkpoints ``optimizer_state`` / ``load_optimizer_state``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from rlhfkit.errors import RlhfkitError


class DataParallel:
    """One process or DDP: accelerate's ``accumulate`` and ``backward``; one AdamW steps both models."""

    collective_state = False  # the optimizer state is whole on every process: the main one gathers it alone

    def __init__(self, accelerator, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 max_grad_norm: float):
        self.accelerator, self.module = accelerator, module
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm

    def before_forward(self) -> None:
        """Nothing: only ZeRO keeps per-micro-batch bookkeeping outside the forward."""

    def ptx(self, nll_of: Callable[[torch.nn.Module], torch.Tensor], coef: float) -> tuple[torch.Tensor, Any]:
        """The demonstrations' NLL and the term to add to the policy's loss: here its own backward first,
        without a gradient sync (the PPO backward that follows syncs the sum; accelerate divides both by
        the accumulation steps and DDP averages both), so nothing is added."""
        with self.accelerator.no_sync(self.module):
            nll = nll_of(self.accelerator.unwrap_model(self.module).policy)
            self.accelerator.backward(coef * nll)
        return nll, 0.0

    @contextmanager
    def micro_batch(self) -> Iterator[None]:
        """Around one micro-batch: accelerate counts it, and syncs the gradients on the minibatch's last."""
        with self.accelerator.accumulate(self.module):
            yield

    def backward_and_step(self, policy_loss: torch.Tensor, value_loss: torch.Tensor | None) -> None:
        """One backward of the sum; on the minibatch's last micro-batch each model's gradient norm clipped,
        then one optimizer and schedule step."""
        self.accelerator.backward(policy_loss if value_loss is None else policy_loss + value_loss)
        if self.accelerator.sync_gradients:
            unwrapped = self.accelerator.unwrap_model(self.module)
            for part in (p for p in (unwrapped.policy, unwrapped.value) if p is not None):
                norm = self.clip([p for p in part.parameters() if p.requires_grad])
                if norm is not None and not math.isfinite(float(norm)):
                    raise RlhfkitError("gradient norm is not finite: lower learning_rate or check the reward scale")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()

    def clip(self, trained: list[torch.nn.Parameter]):
        return self.accelerator.clip_grad_norm_(trained, self.max_grad_norm)

    def optimizer_state(self) -> dict:
        """The optimizer state whole, ``AdamW.state_dict()``'s layout (every launch writes and reads this one)."""
        from rlhfkit.engine.sharding import full_optimizer_state

        return full_optimizer_state(self.optimizer)

    def load_optimizer_state(self, state: dict, scheduler_state: dict) -> None:
        from rlhfkit.engine.sharding import load_full_optimizer_state

        load_full_optimizer_state(self.optimizer, state)
        self.scheduler.load_state_dict(scheduler_state)


class Sharded(DataParallel):
    """FSDP2 (our ``fully_shard``): the module is not wrapped by accelerate; parameters are DTensors."""

    collective_state = True  # gathering the sharded optimizer state is an all-gather: every process calls it

    @contextmanager
    def micro_batch(self) -> Iterator[None]:
        """Gradients stay local until the minibatch's last micro-batch, then one reduce-scatter of their sum
        (what DDP's ``no_sync`` does for data parallelism)."""
        with self.accelerator.accumulate(self.module):
            for part in (p for p in (self.module.policy, self.module.value) if p is not None):
                part.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield

    def clip(self, trained: list[torch.nn.Parameter]):
        from rlhfkit.engine.sharding import clip_grad_norm_

        return clip_grad_norm_(trained, self.max_grad_norm)  # torch's, over the DTensors


class Zero:
    """DeepSpeed ZeRO-2/3: ``ZeroModels`` (an engine per trained model) backs and steps each model's loss."""

    collective_state = True  # each piece of the state is assembled from every process's partition

    def __init__(self, accelerator, module: torch.nn.Module, models):
        self.accelerator, self.module, self.models = accelerator, module, models
        self.scheduler = models.scheduler

    def before_forward(self) -> None:
        """ZeRO's per-micro-batch bookkeeping (the forwards call the models directly, not the engines)."""
        self.models.before_forward()

    def ptx(self, nll_of: Callable[[torch.nn.Module], torch.Tensor], coef: float) -> tuple[torch.Tensor, Any]:
        """The term joins the policy's loss (ZeRO has no ``no_sync`` for a backward of its own)."""
        nll = nll_of(self.module.policy)
        return nll, coef * nll

    @contextmanager
    def micro_batch(self) -> Iterator[None]:
        with self.accelerator.accumulate(self.module):
            yield

    def backward_and_step(self, policy_loss: torch.Tensor, value_loss: torch.Tensor | None) -> None:
        """Each model's loss through its engine; each clips and steps at the accumulation boundary."""
        self.models.backward_and_step([policy_loss] + ([value_loss] if value_loss is not None else []))

    def optimizer_state(self) -> dict:
        return self.models.full_optimizer_state()

    def load_optimizer_state(self, state: dict, scheduler_state: dict) -> None:
        """After the weights: ZeRO refreshes its fp32 master copy from them."""
        self.models.load_full_optimizer_state(state, scheduler_state)


Backend = DataParallel | Sharded | Zero  # Sharded is a DataParallel; named for readers of the signatures

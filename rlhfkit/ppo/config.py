"""The RL stage's config (PPO, RLOO or GRPO: ``algorithm``), and its batch arithmetic said once.

Sizes are counted in episodes (one prompt, one sampled response):

    rollout_batch_size        episodes sampled per update, across all processes
                              = prompts per update x num_generations (samples of each prompt)
    mini_batch_size           = rollout_batch_size / num_mini_batches  (one optimizer step each)
    per_device_train_batch_size   episodes per forward/backward on one process
    gradient_accumulation_steps   = mini_batch_size / (per_device_train_batch_size x processes)
    optimizer steps per update    = num_ppo_epochs x num_mini_batches
    num_updates               = total_episodes / rollout_batch_size

A combination that does not divide evenly is rejected before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import choice_problems, field
from rlhfkit.processes import launch_size


DEFAULT_GROUP = 4  # rloo / grpo samples per prompt when num_generations is not set


def launch_problems() -> list[str]:
    """What the launch asks that the RL stage cannot do (read from the launcher's environment)."""
    from rlhfkit.engine.zero import zero_problems

    return zero_problems()


@dataclass
class PPOStageConfig:
    # --- inputs and outputs
    model: str = field(help="policy to align: the SFT stage's folder, a Hugging Face folder or a hub id")
    algorithm: Literal["ppo", "rloo", "grpo"] = field(
        "ppo", help="ppo: clipped policy loss with a value model and GAE (KL in the per-token reward); rloo: "
                    "leave-one-out baseline over num_generations samples per prompt (KL in the reward); grpo: "
                    "group-normalised advantages (KL as a k3 loss term). rloo and grpo load no value model")
    reward_model: str | list[str] | None = field(None, help="reward model folder (the reward stage's output), or a list of "
                                                         "them: an ensemble (see ensemble_reduction); or pass reward_fn in Python")
    data: str | None = field(None, help="prompts: a data-build folder (its user turns) or a dataset folder with a 'prompt' column")
    output_dir: str = field("runs/ppo", help="artifact folder: model/, checkpoints/, metrics.jsonl, samples.jsonl, metrics.json")
    value_model: str = field("reward", help="value model init: 'reward' (from the reward model), 'policy' (from the policy), or a folder")
    prompt_split: str = field("train", help="split of the data to draw prompts from")
    trust_remote_code: bool = field(False, help="allow model code from the hub (off unless you trust it)")
    seed: int = field(0, help="seed of sampling, shuffling and initialisation")
    # --- batch arithmetic (see the module docstring)
    total_episodes: int | None = field(None, help="episodes to train on in all; a whole number of updates (or set num_updates)")
    num_updates: int | None = field(None, help="PPO updates (each samples rollout_batch_size episodes); alternative to total_episodes")
    rollout_batch_size: int = field(64, help="episodes sampled per update, across all processes")
    num_mini_batches: int = field(4, help="minibatches per PPO epoch; one optimizer step each")
    per_device_train_batch_size: int = field(16, help="episodes per forward/backward on one process (micro-batch)")
    rollout_forward_batch_size: int = field(64, help="episodes per forward while sampling and scoring, per process")
    num_ppo_epochs: int = field(4, help="passes over each rollout batch")
    num_generations: int | None = field(None, help="samples of each prompt per update (TRL's name); null = 1 for ppo, "
                                                   f"{DEFAULT_GROUP} for rloo and grpo (they compare a prompt's samples "
                                                   "with each other, so they need at least 2)")
    # --- sampling
    response_length: int = field(48, help="most tokens sampled per response")
    temperature: float = field(1.0, help="sampling temperature; log-probs for the loss use the same temperature")
    max_prompt_length: int = field(256, help="prompt tokens kept (the last ones: the instruction is at the end)")
    missing_eos_penalty: float | None = field(1.0, help="subtracted from the score of a response that never emits EOS; null = off")
    # --- objective
    ensemble_reduction: Literal["mean", "min", "mean_minus_std"] = field(
        "mean", help="reward-model ensemble: members' standardised scores combined by their mean, their minimum, or "
                     "mean - ensemble_std_coef * std (Coste et al. 2023); their std is logged as objective/ensemble_std")
    ensemble_std_coef: float = field(1.0, help="lambda of ensemble_reduction=mean_minus_std")
    kl_coef: float = field(0.05, help="KL penalty coefficient beta (initial value when kl_target is set)")
    kl_estimator: Literal["k1", "k3"] = field("k1", help="per-token KL estimator: k1 = logp - ref, k3 = exp(ref-logp)-1-(ref-logp)")
    kl_target: float | None = field(None, help="adaptive KL (Ziegler et al.): target KL per sequence; null = fixed kl_coef")
    kl_horizon: int = field(10000, help="adaptive KL horizon in episodes")
    kl_budget: float | None = field(None, help="stop once the KL to the reference (mean objective/kl of the last "
                                               "kl_budget_window updates, nats per response) reaches this budget; the "
                                               "policy of that update is the final one; null = run every update")
    kl_budget_window: int = field(5, help="updates averaged for kl_budget (one update's KL is a noisy estimate)")
    gamma: float = field(1.0, help="discount")
    lam: float = field(0.95, help="GAE lambda")
    whiten_rewards: bool = field(False, help="whiten per-token rewards before GAE (mean kept)")
    score_clip: float | None = field(None, help="clip reward-model scores to [-score_clip, score_clip]; null = off")
    scale_rewards: bool = field(True, help="grpo: divide each group's centred scores by their std (false = Dr. GRPO)")
    loss_type: Literal["dapo", "dr_grpo"] = field(
        "dapo", help="token losses aggregated as dapo: the minibatch's token mean; dr_grpo: their sum over "
                     "episodes x response_length (no length normalisation, Dr. GRPO)")
    importance_sampling_level: Literal["token", "sequence"] = field(
        "token", help="rloo / grpo: token = one clipped ratio per token (PPO's); sequence = one per response, the policy "
                      "loss then the mean over responses: rloo the ratio of the response's probabilities, "
                      "exp(sum of token log-ratios), as TRL's RLOOTrainer; grpo their geometric mean, exp(mean), "
                      "GSPO (Zheng et al. 2025) as TRL's GRPOTrainer. loss_type then weighs only grpo's KL term")
    cliprange: float = field(0.2, help="policy ratio clip epsilon")
    cliprange_value: float = field(0.2, help="value clip epsilon")
    vf_coef: float = field(0.1, help="weight of the value loss")
    value_warmup_updates: int = field(0, help="critic warm-up: the first N updates train only the value model "
                                              "(the policy is not changed), so the first policy steps use fitted values")
    target_kl: float | None = field(None, help="stop this update's PPO epochs early when approx-KL passes it; null = off")
    ptx_coef: float = field(0.0, help="PPO-ptx (Ouyang et al. 2022): add ptx_coef x the policy's token-mean NLL on SFT "
                                      "demonstrations (the data folder's sft split) to every optimizer step, so the policy keeps "
                                      "what SFT taught where the reward model cannot tell right from wrong; 0 = off")
    # --- optimisation
    learning_rate: float = field(3e-6, help="AdamW learning rate of policy and value model")
    lr_scheduler_type: str = field("linear", help="transformers scheduler name, stepped once per optimizer step")
    warmup_steps: int = field(0, help="scheduler warm-up, in optimizer steps")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="clip the global gradient norm of each model to this")
    # --- LoRA: the reference is then the same weights with the adapter disabled
    lora: bool = field(False, help="train a LoRA adapter on the policy; the reference is the adapter disabled (no copy)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_dropout: float = field(0.0, help="LoRA dropout (PPO keeps dropout off: keep 0)")
    lora_target_modules: list[str] | None = field(None, help="modules to adapt; null = peft's default for the architecture")
    # --- logging and checkpoints
    report_to: list[str] = field(default_factory=lambda: ["none"], help="trackers through accelerate: tensorboard, wandb, none")
    logging_steps: int = field(1, help="write a metrics row every N updates")
    sample_every: int = field(10, help="log sample responses every N updates (0 = never)")
    num_samples: int = field(4, help="responses shown per sample log")
    save_steps: int = field(10, help="checkpoint every N updates (0 = only at the end)")
    save_total_limit: int = field(1, help="checkpoints kept (the newest, rotated after a new one is complete)")
    torch_threads: int | None = field(None, help="torch intra-op threads; null = torch's default")

    def validate(self) -> list[str]:
        problems = [f"{f.name} must be a finite number, got {getattr(self, f.name)}" for f in dataclasses.fields(self)
                    if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        for name in ("rollout_batch_size", "num_mini_batches", "per_device_train_batch_size",
                     "rollout_forward_batch_size", "num_ppo_epochs", "response_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_generations is not None and self.num_generations < 1:
            problems.append(f"num_generations must be at least 1, got {self.num_generations}")
        problems += choice_problems(self)
        if problems:
            return problems
        if self.algorithm != "ppo" and self.generations < 2:
            problems.append(f"num_generations: {self.algorithm} needs at least 2 samples per prompt (each sample's "
                            f"baseline comes from the others), got {self.generations}")
        elif self.algorithm != "ppo" and self.value_warmup_updates:
            problems.append(f"value_warmup_updates: {self.algorithm} has no value model to warm up; set it to 0")
        elif self.algorithm == "ppo" and self.importance_sampling_level == "sequence":
            problems.append("importance_sampling_level: sequence needs one advantage per response (rloo or grpo); "
                            "ppo's GAE gives one per token: use token")
        if (self.total_episodes is None) == (self.num_updates is None):
            problems.append("set exactly one of total_episodes and num_updates")
        elif self.num_updates is not None and self.num_updates < 1:
            problems.append(f"num_updates must be at least 1, got {self.num_updates}")
        elif self.total_episodes is not None and self.total_episodes < self.rollout_batch_size:
            problems.append(f"total_episodes must be at least one update (rollout_batch_size={self.rollout_batch_size}), "
                            f"got {self.total_episodes}")
        elif self.total_episodes is not None and self.total_episodes % self.rollout_batch_size:
            problems.append(
                f"total_episodes={self.total_episodes} is not a whole number of updates of "
                f"rollout_batch_size={self.rollout_batch_size} episodes"
            )
        n = launch_size()
        if self.rollout_batch_size % self.num_mini_batches:
            problems.append(
                f"rollout_batch_size={self.rollout_batch_size} does not split into num_mini_batches={self.num_mini_batches} equal minibatches"
            )
        elif (self.rollout_batch_size // self.num_mini_batches) % (self.per_device_train_batch_size * n):
            problems.append(
                f"mini_batch_size={self.rollout_batch_size // self.num_mini_batches} (rollout_batch_size/num_mini_batches) "
                f"is not a multiple of per_device_train_batch_size={self.per_device_train_batch_size} x {n} process(es)"
            )
        if self.rollout_batch_size % n:
            problems.append(f"rollout_batch_size={self.rollout_batch_size} does not split over {n} processes")
        elif (self.rollout_batch_size // n) % self.generations:
            problems.append(f"rollout_batch_size={self.rollout_batch_size} is not whole groups of num_generations="
                            f"{self.generations} samples on each of {n} process(es) (a group is compared on one process)")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.kl_coef < 0:
            problems.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_target is not None and self.kl_target <= 0:
            problems.append(f"kl_target must be > 0, got {self.kl_target}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            problems.append(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            problems.append("cliprange and cliprange_value must be > 0")
        # values that would otherwise crash mid-run (logging_steps=0, kl_horizon=0), silently undo
        # the run (save_total_limit=0 deletes the checkpoint just written; max_grad_norm=0 zeroes
        # every gradient) or be silently overridden (dropout is forced off everywhere)
        if self.logging_steps < 1:
            problems.append(f"logging_steps must be at least 1, got {self.logging_steps}")
        if self.save_total_limit < 1:
            problems.append(f"save_total_limit must be at least 1, got {self.save_total_limit}")
        if not (math.isfinite(self.ensemble_std_coef) and self.ensemble_std_coef >= 0):
            problems.append(f"ensemble_std_coef must be a finite number >= 0, got {self.ensemble_std_coef}")
        if isinstance(self.reward_model, list) and not self.reward_model:
            problems.append("reward_model: an empty list; give one folder or several (an ensemble)")
        for name in ("save_steps", "sample_every", "num_samples", "warmup_steps", "value_warmup_updates"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ptx_coef < 0:
            problems.append(f"ptx_coef must be >= 0, got {self.ptx_coef}")
        if self.kl_budget_window < 1:
            problems.append(f"kl_budget_window must be at least 1, got {self.kl_budget_window}")
        for name in ("kl_horizon", "max_grad_norm", "learning_rate", "target_kl", "score_clip", "kl_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
        if not problems and self.value_warmup_updates >= self.updates:
            problems.append(f"value_warmup_updates={self.value_warmup_updates} leaves no policy update of "
                            f"{self.updates}; set it below the number of updates")
        if self.lora_dropout != 0:
            problems.append(f"lora_dropout must be 0: PPO turns dropout off everywhere, got {self.lora_dropout}")
        if self.lr_scheduler_type in ("reduce_lr_on_plateau", "greedy"):
            problems.append(f"lr_scheduler_type: {self.lr_scheduler_type} is driven by a validation metric; PPO has none")
        bad = set(self.report_to) - {"none", "tensorboard", "wandb", "all"}
        if bad:
            problems.append(f"report_to: unknown tracker(s) {sorted(bad)}; use tensorboard, wandb or none")
        return problems

    # --- derived sizes, computed once
    @property
    def num_processes(self) -> int:
        return launch_size()

    @property
    def mini_batch_size(self) -> int:
        return self.rollout_batch_size // self.num_mini_batches

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.mini_batch_size // (self.per_device_train_batch_size * self.num_processes)

    @property
    def local_rollout_batch_size(self) -> int:
        return self.rollout_batch_size // self.num_processes

    @property
    def updates(self) -> int:
        return self.num_updates if self.num_updates is not None else self.total_episodes // self.rollout_batch_size

    @property
    def generations(self) -> int:
        """Samples of each prompt per update: ``num_generations``, or the algorithm's default."""
        if self.num_generations is not None:
            return self.num_generations
        return 1 if self.algorithm == "ppo" else DEFAULT_GROUP

    @property
    def prompts_per_update(self) -> int:
        return self.rollout_batch_size // self.generations

    @property
    def uses_value_model(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches

    def batch_arithmetic(self) -> str:
        """The derived sizes, in one block, printed at start."""
        n = self.num_processes
        return "\n".join([
            f"{self.algorithm.upper()} batch arithmetic ({n} process{'es' if n > 1 else ''}):",
            f"  episodes per update (rollout_batch_size)    {self.rollout_batch_size}  ({self.local_rollout_batch_size} per process; "
            f"{self.prompts_per_update} prompts x num_generations {self.generations})",
            f"  minibatch = rollout_batch_size / num_mini_batches = {self.rollout_batch_size} / {self.num_mini_batches} = {self.mini_batch_size}",
            f"  micro-batch per process (per_device_train_batch_size) {self.per_device_train_batch_size}",
            f"  gradient accumulation = {self.mini_batch_size} / ({self.per_device_train_batch_size} x {n}) = {self.gradient_accumulation_steps}",
            f"  optimizer steps per update = num_ppo_epochs x num_mini_batches = {self.num_ppo_epochs} x {self.num_mini_batches} = {self.optimizer_steps_per_update}",
            f"  updates {self.updates}, total episodes {self.updates * self.rollout_batch_size}, "
            f"optimizer steps {self.updates * self.optimizer_steps_per_update}",
        ])

    @classmethod
    def help_notes(cls) -> str:
        return __doc__.split("\n\n", 1)[1].strip()

"""What the TRL stages (SFT, reward model, DPO) share: config fields, TRL arguments, data and
model loading, checkpoint discovery for resume, run-time checks, and the stage outputs.

Each is a thin layer over a TRL trainer (``SFTTrainer``, ``RewardTrainer``, ``DPOTrainer``) on the
stage skeleton of ``rlhfkit.stage`` (``run_trainer_stage``); the code here only decides defaults,
validates, resumes and writes artifacts:

- ``StageConfig``: the fields both stage configs have (model, data, output_dir, seed,
  LoRA, resume) plus ``trl_args`` (every field of the TRL config, under its TRL name).
- ``resolve_trl_kwargs`` / ``build_trl_args``: rlhfkit's CPU-friendly defaults, overridden
  by anything the user set, checked by TRL itself.
- ``find_resume_checkpoint``: the last *complete* Trainer checkpoint (docs/pitfalls.md#9).
- ``make_stage_callback``: stops on a NaN/inf loss or grad norm (docs/pitfalls.md#12), logs the final step.
- ``run_training``: resume, time, train; ``save_final_model``: LoRA merged, atomic folder.

Output layout of a stage folder::

    output_dir/
      stage_config.json   the config the stage ran with
      checkpoints/        Trainer checkpoints (checkpoint-N), resumed from after a kill
      model/              final Hugging Face folder (safetensors + tokenizer), atomic
      log_history.json    every logged step (losses, grad norms, eval), across resumes
      metrics.json        written last: its presence means the stage completed
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from rlhfkit.artifacts import (atomic_dir, check_output_dir, claim_dir, length_problem, model_positions, positions_of,
                               read_json, refuse_non_generative, refuse_other_stage, refuse_pickle_only,
                               resolve_model_path, sanitize, write_json_atomic)
from rlhfkit.config import Passthrough, field, to_dict
from rlhfkit.errors import ConfigError, DataError, TrainingError, first_line
from rlhfkit.processes import launch_size
from rlhfkit.stage import METRICS_FILE

logger = logging.getLogger("rlhfkit")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STAGE_CONFIG_FILE = "stage_config.json"
LOG_HISTORY_FILE = "log_history.json"


# -- config ---------------------------------------------------------------------------------


@dataclasses.dataclass
class StageConfig(Passthrough):
    """Fields shared by the SFT and reward-model stage configs."""

    output_dir: str = field(
        help="stage folder: model/ (final), checkpoints/, log_history.json, metrics.json (written last)"
    )
    model: str = field(
        "",
        help="hub id, local Hugging Face folder, a `model init` output, or a previous stage's output folder",
    )
    data: str = field("", help="a `data build` output folder (optional when datasets are passed in Python)")
    seed: int = field(0, help="seed of model init, LoRA init, data order and dropout (TRL's `seed`)")
    resume: bool = field(
        True,
        help="resume from the last complete checkpoint in output_dir/checkpoints; false refuses to run "
        "over existing checkpoints",
    )
    lora: bool = field(False, help="train LoRA adapters (peft); they are merged into the saved model")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA scaling alpha")
    lora_dropout: float = field(0.05, help="dropout on the LoRA path")
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        help="module names to adapt, comma-separated or a list; 'all-linear' = every linear layer but the output head",
    )
    trl_args: dict = field(default_factory=dict, help="fields of the TRL config, under their TRL names")

    stage_name: ClassVar[str] = "stage"

    def validate(self) -> list[str]:
        """Every inconsistency found, before any model loads (docs/pitfalls.md#14)."""
        problems: list[str] = []
        if not str(self.output_dir or "").strip():
            problems.append("output_dir: must not be empty")
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        if self.lora:
            if self.lora_r < 1:
                problems.append(f"lora_r: must be >= 1, got {self.lora_r}")
            if self.lora_alpha <= 0:
                problems.append(f"lora_alpha: must be > 0, got {self.lora_alpha}")
            if not 0.0 <= self.lora_dropout < 1.0:
                problems.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_target_modules:
                problems.append("lora_target_modules: must name at least one module (or 'all-linear')")
        problems.extend(_check_trl_args(self.trl_args))
        problems.extend(chat_template_path_problems(self.trl_args.get("chat_template_path")))
        return problems


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_trl_args(a: dict[str, Any]) -> list[str]:
    """Cheap value checks of common TRL/Trainer fields (types were checked by load_config)."""
    problems: list[str] = []

    def positive(key: str, strict: bool = True) -> None:
        v = a.get(key)
        if v is None or not _is_number(v):
            return
        if (strict and not v > 0) or (not strict and v < 0) or not math.isfinite(v):
            problems.append(f"{key}: must be {'>' if strict else '>='} 0, got {v}")

    for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "save_steps", "eval_steps", "max_length"):
        positive(key)
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "center_rewards_coefficient"):
        positive(key, strict=False)
    limit = a.get("save_total_limit")
    if _is_number(limit) and limit < 1:
        problems.append(f"save_total_limit: must be >= 1 (0 would delete the checkpoint to resume from), got {limit}")
    max_steps = a.get("max_steps")
    if _is_number(max_steps) and (max_steps == 0 or max_steps < -1):
        problems.append(f"max_steps: must be > 0, or -1 for num_train_epochs, got {max_steps}")
    if a.get("packing") and "max_length" in a and a["max_length"] is None:
        problems.append("packing: needs max_length (the packed sequence length), got max_length=None")
    if a.get("padding_free") and not a.get("packing") and a.get("max_length") is not None:
        problems.append(
            "padding_free without packing does not truncate: set max_length=null (inputs already short) "
            "or packing=true"
        )
    for key, allowed in (("eval_strategy", ("no", "steps", "epoch")), ("logging_strategy", ("no", "steps", "epoch")),
                         ("save_strategy", ("no", "steps", "epoch", "best"))):
        if key in a and isinstance(a[key], str) and a[key] not in allowed:
            problems.append(f"{key}: must be one of {', '.join(allowed)}, got {a[key]!r}")
    if a.get("fp16") and a.get("bf16"):
        problems.append("fp16 and bf16: choose one")
    if a.get("save_only_model"):
        problems.append("save_only_model: checkpoints without optimizer state cannot be resumed exactly")
    return problems


# -- TRL arguments ----------------------------------------------------------------------------

# rlhfkit's defaults, applied only to keys the user did not set. Why each:
COMMON_TRL_DEFAULTS: dict[str, Any] = {
    "report_to": "none",  # no tracker unless asked; tensorboard/wandb via report_to
    "logging_steps": 5,  # small: a NaN is caught within 5 steps; curves have points
    "logging_first_step": True,  # the first loss, to compare with the last
    "logging_nan_inf_filter": False,  # never hide a NaN loss behind a running mean (docs/pitfalls.md#12)
    "save_strategy": "steps",
    "save_steps": 100,  # resume loses at most 100 steps; a tiny model saves in well under a second
    "save_total_limit": 2,  # the newest checkpoint plus one before it
    "activation_checkpointing": False,  # TRL turns it on (for GPU memory); on small CPU models it costs ~25 %
    "include_num_input_tokens_seen": "non_padding",  # real tokens, for tokens/s
    "dataloader_num_workers": 0,  # two cores: the main process keeps up with tiny batches
}
# Keys that mean the same thing: the user setting either counts as setting both.
ALIASES = {"gradient_checkpointing": "activation_checkpointing"}


def defaults_note(stage_defaults: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The ``--help`` paragraph listing rlhfkit's TRL defaults (generated, so it cannot drift)."""

    def show(v: Any) -> str:
        return "true" if v is True else "false" if v is False else str(v)

    parts = [f"{k}={show(v)}" for k, v in {**COMMON_TRL_DEFAULTS, **stage_defaults}.items()]
    parts += ["eval_strategy=epoch when there is a validation split", "bf16 only on a CUDA GPU that has it",
              "dataloader_pin_memory only with CUDA", *notes]
    return "rlhfkit defaults of TRL fields (any can be overridden): " + ", ".join(parts) + "."


def _cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_trl_kwargs(
    config: StageConfig, stage_defaults: dict[str, Any], *, has_eval: bool
) -> dict[str, Any]:
    """The keyword arguments of the TRL config: rlhfkit defaults < user's ``trl_args``."""
    import torch

    user = dict(config.trl_args)
    user_keys = set(user) | {ALIASES[k] for k in user if k in ALIASES}
    kwargs: dict[str, Any] = {}
    defaults = {
        **COMMON_TRL_DEFAULTS,
        "eval_strategy": "epoch" if has_eval else "no",
        # mixed precision only where it is fast and safe: bf16 on a CUDA GPU that has it, never on CPU
        "bf16": _cuda_bf16(),
        "fp16": False,
        "dataloader_pin_memory": bool(torch.cuda.is_available()),
        **stage_defaults,
    }
    if "fp16" in user_keys and user.get("fp16"):
        defaults["bf16"] = False
    for key, value in defaults.items():
        if key not in user_keys:
            kwargs[key] = value
    kwargs.update(user)
    if not has_eval and kwargs.get("eval_strategy") not in (None, "no"):
        if "eval_strategy" in user:
            raise ConfigError(f"eval_strategy: '{user['eval_strategy']}' needs an evaluation dataset, and none was given")
        kwargs["eval_strategy"] = "no"
    kwargs["output_dir"] = str(Path(config.output_dir) / "checkpoints")
    kwargs["seed"] = config.seed
    return kwargs


def build_trl_args(trl_cls: type, kwargs: dict[str, Any], stage: str):
    """Construct the TRL config; its own validation errors become one-line ConfigErrors.

    Also refuses a launch of N processes that did not form a process group (e.g.
    ``torchrun`` / ``accelerate launch --multi_gpu`` on a CPU without
    ``ACCELERATE_USE_CPU=true``): N independent runs would write the same output_dir.
    """
    try:
        args = trl_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{stage}: {first_line(e)}") from None
    launched = launch_size()
    if launched > 1 and args.world_size != launched:
        raise ConfigError(
            f"{stage}: launched as {launched} processes (WORLD_SIZE) but the Trainer sees {args.world_size}; "
            "on a CPU launch with ACCELERATE_USE_CPU=true (see configs/accelerate/cpu_2proc.yaml)"
        )
    return args


# -- data and models --------------------------------------------------------------------------


def load_split_dict(data_dir: str | os.PathLike, subdir: str, required: Sequence[str]):
    """``(train, validation)`` of ``data_dir/subdir`` (a saved DatasetDict); validation may be None."""
    from datasets import DatasetDict, load_from_disk

    root = Path(data_dir)
    path = root / subdir
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (expected the output of `rlhfkit data build`)")
    if not path.is_dir():
        raise DataError(f"{path}: not found; a `rlhfkit data build` folder has sft/ and pairs/")
    try:
        dd = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a saved dataset ({first_line(e)})") from None
    if not isinstance(dd, DatasetDict):
        raise DataError(f"{path}: expected a DatasetDict with splits train and validation")
    if "train" not in dd:
        raise DataError(f"{path}: split 'train' missing (found: {', '.join(dd) or 'none'})")
    check_columns(dd["train"], required, f"{path} train")
    validation = dd["validation"] if "validation" in dd else None
    if validation is None:
        raise DataError(f"{path}: split 'validation' missing (found: {', '.join(dd)})")
    check_columns(validation, required, f"{path} validation")
    if len(dd["train"]) == 0:
        raise DataError(f"{path}: split 'train' is empty")
    if len(validation) == 0:
        logger.warning("%s: split 'validation' is empty; no evaluation", path)
        validation = None
    return dd["train"], validation


def check_columns(dataset, required: Sequence[str], where: str) -> None:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{where}: column(s) {', '.join(missing)} missing (found: {', '.join(dataset.column_names)})"
        )


def check_before_loading(config: StageConfig, model=None) -> None:
    """Every config problem in one line, then a model folder holding only pickles (unless ``model``
    is given in memory): raised before any data is read or folder touched."""
    problems = config.validate()
    max_length = config.trl_args.get("max_length")
    packed = config.trl_args.get("packing")  # packed documents restart their positions: max_length may exceed them
    if isinstance(max_length, int) and not packed and (model is not None or config.model):
        positions = positions_of(model.config) if model is not None else model_positions(model_source(config))
        problems += [p for p in [length_problem("max_length", max_length, positions)] if p]
    if problems:
        raise ConfigError("; ".join(problems))
    if model is None and config.model:
        refuse_pickle_only(model_source(config))


DEFAULT_MAX_LENGTH = 1024  # TRL's default for SFT and reward models


def default_max_length(model) -> int:
    """TRL's default ``max_length``, capped at the model's ``max_position_embeddings`` (a small model
    has fewer positions than 1024): the SFT and reward stages' default."""
    limit = positions_of(model.config)
    return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH


def model_source(config: StageConfig) -> str:
    if not config.model:
        raise ConfigError(
            f"{config.stage_name}: model is required (a hub id, a model folder or a previous stage's output folder)"
        )
    return resolve_model_path(config.model)


def load_model(path: str, auto_cls, model_init_kwargs: dict[str, Any] | None, trust_remote_code: bool, **extra):
    """Load like TRL does from a string (float32 unless ``dtype`` is given), with one-line errors."""
    from accelerate import PartialState
    from trl.trainer.utils import create_model_from_path

    from rlhfkit.engine.sharding import every_process_loads

    kwargs = dict(model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    kwargs.update(extra, use_safetensors=True)  # never a pickle (refuse_pickle_only says how to convert one)
    refuse_pickle_only(path)
    if auto_cls.__name__ == "AutoModelForCausalLM":  # the reward stage starts its new head on purpose
        refuse_non_generative(path)
    try:
        if PartialState().distributed_type == "FSDP":  # accelerate shards it: rank 0 may load alone and broadcast
            return create_model_from_path(path, auto_cls, **kwargs)
        with every_process_loads():  # an FSDP launch on the CPU is data parallel in accelerate: no broadcast
            return create_model_from_path(path, auto_cls, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot load the model ({first_line(e)})") from None


def chat_template_path_problems(path: Any) -> list[str]:
    """A ``chat_template_path`` file rendered once on a sample conversation, as transformers renders it (its
    sandbox, ``raise_exception``): a template that fails does so here, before any folder is written or any
    stage trains. A tokenizer folder or hub id is left to TRL (and ``ensure_chat_template``)."""
    if not isinstance(path, str) or not path.endswith((".jinja", ".j2")):
        return []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"chat_template_path: {path}: cannot read the template ({first_line(e)})"]
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    from rlhfkit.engine.sampling import SAMPLE_CONVERSATION, chat_template_error

    tokens = {name: f"<{name}>" for name in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token",
                                             "cls_token", "mask_token")}  # stand-ins for the tokenizer's
    try:
        for messages, prompt in ((SAMPLE_CONVERSATION, False), (SAMPLE_CONVERSATION[:1], True)):
            render_jinja_template([messages], chat_template=text, add_generation_prompt=prompt, **tokens)
    except jinja2.exceptions.UndefinedError:
        return []  # a variable only the stage's tokenizer gives: ensure_chat_template renders it with that one
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # its own code failed (a TypeError: 'a' + 1)
        return [f"chat_template_path: {chat_template_error(path, e)}"]
    return []


def ensure_chat_template(stage: str, tokenizer, args, source: str | None, model=None, *, apply: bool = False):
    """Conversational rows need a chat template: the tokenizer's own or TRL's ``chat_template_path``.

    With ``apply`` (the reward stage, which tokenizes pairs itself before the trainer
    exists) the path is applied here, as TRL would, and cleared from ``args``.
    Returns ``(model, tokenizer)``.
    """
    from rlhfkit.engine.sampling import TEMPLATE_SOURCE, check_chat_template

    path = getattr(args, "chat_template_path", None)
    if path is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"{stage}: the tokenizer of {source or 'the given model'} has no chat template; give one with "
                "chat_template_path (a .jinja file or a tokenizer folder)"
            )
        check_chat_template(tokenizer)  # the model's own template (a user's folder, a hub model)
        return model, tokenizer
    if not apply:
        if os.path.isfile(path) and path.endswith((".jinja", ".j2")):  # TRL applies it; checked with this tokenizer
            check_chat_template(tokenizer, Path(path).read_text(encoding="utf-8"), path)
    else:
        if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
            tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        else:
            from trl.chat_template_utils import clone_chat_template

            try:
                model, tokenizer, _ = clone_chat_template(model, tokenizer, path)
            except (OSError, ValueError) as e:
                raise ConfigError(f"chat_template_path: {path}: {first_line(e)}") from None
        setattr(tokenizer, TEMPLATE_SOURCE, path)  # errors name this file, not the model folder's template
        check_chat_template(tokenizer)
        args.chat_template_path = None
    return model, tokenizer


def lora_config(config: StageConfig, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    targets = config.lora_target_modules
    target: str | list[str] = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def checkpoint_is_complete(path: Path) -> bool:
    """A Trainer checkpoint is complete when weights, optimizer state and trainer_state.json
    (written last by the Trainer) are all there and the state names this step."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if state.get("global_step") != checkpoint_step(path):
        return False
    if not any((path / f).is_file() and (path / f).stat().st_size > 0 for f in WEIGHT_FILES):
        return False
    optimizer = path / "optimizer.pt"
    has_optimizer = (optimizer.is_file() and optimizer.stat().st_size > 0) or any(
        p.is_dir() for p in path.glob("global_step*")  # DeepSpeed
    ) or any(path.glob("optimizer_0*"))  # FSDP
    return has_optimizer and _files_intact(path)


def _files_intact(path: Path) -> bool:
    """Truncated or damaged files (a full disk, a copy cut short): every safetensors header covers its
    file, and every torch zip archive (optimizer.pt, ...) passes its CRC checks. Logs what is wrong."""
    import zipfile

    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            logger.warning("checkpoint %s: %s is damaged (%s)", path, file.name, first_line(e))
            return False
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            bad = str(e)
        if bad is not None:
            logger.warning("checkpoint %s: %s is damaged (%s)", path, file.name, bad)
            return False
    return True


def find_resume_checkpoint(checkpoints_dir: str | os.PathLike, *, remove_incomplete: bool = False) -> Path | None:
    """The complete checkpoint with the highest step, or None.

    Half-written checkpoints (killed during save: no trainer_state.json, no weights or no
    optimizer state) are ignored, and removed when ``remove_incomplete`` (main process),
    so the resumed run never writes into or rotates around them (docs/pitfalls.md#9).
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    found = sorted(
        (step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None
    )
    complete = [(step, p) for step, p in found if checkpoint_is_complete(p)]
    best_step, best = complete[-1] if complete else (-1, None)
    for step, p in found:
        if (step, p) in complete:
            continue
        logger.warning("ignoring incomplete checkpoint %s", p)
        # A resumed run would write into (or rotate around) a later half-written folder: remove it.
        # Earlier incomplete folders are left alone; they are never chosen.
        if remove_incomplete and step > best_step:
            shutil.rmtree(p, ignore_errors=True)
    return best


# -- callbacks --------------------------------------------------------------------------------


def make_stage_callback(stage: str, *, skip_final_eval: bool = False, check_grad_norm: bool = True):
    """A TrainerCallback: NaN/inf checks on every log, a log at the last step, and (reward)
    no Trainer evaluation at the end because the stage scores the whole split itself."""
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
                if skip_final_eval:
                    control.should_evaluate = False
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if skip_final_eval and state.global_step >= state.max_steps:
                control.should_evaluate = False
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            keys = ["loss", "eval_loss"] + (["grad_norm"] if check_grad_norm else [])
            for key in keys:
                value = (logs or {}).get(key)
                if _is_number(value) and not math.isfinite(value):
                    raise TrainingError(
                        f"{stage}: {key} is {value} at step {state.global_step}; training stopped "
                        "(try a lower learning_rate, max_grad_norm, or check the data)"
                    )
            return control

    return StageCallback()


# -- running ----------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainSession:
    """What one ``trainer.train()`` call did (a resumed run counts only its own work)."""

    train_time_s: float
    resumed_from: str | None
    start_step: int
    start_epoch: float
    start_tokens: int


def prepare_output_dir(config: StageConfig, is_main: bool) -> Path | None:
    """Check resume policy, record the config; returns the checkpoint to resume from."""
    out = Path(config.output_dir)
    # the skeleton checked these (step 2); again here for a stage's public build_* called on its own,
    # since half-written checkpoints are removed below
    refuse_other_stage(out, config.stage_name)
    check_output_dir(out, config.stage_name)
    checkpoints = out / "checkpoints"
    resume_from = find_resume_checkpoint(checkpoints, remove_incomplete=is_main)
    if resume_from is not None and not config.resume:
        raise ConfigError(
            f"{checkpoints}: holds checkpoints from an earlier run; remove them or set resume=true"
        )
    if is_main:
        claim_dir(out, config.stage_name)
        # A new run invalidates an earlier completion marker before recording its own config.
        (out / METRICS_FILE).unlink(missing_ok=True)
        write_json_atomic(out / STAGE_CONFIG_FILE, to_dict(config))
    return resume_from


def already_finished(config: StageConfig, given: Sequence[Any] = ()) -> Any:
    """The ``StageResult`` of an earlier completed run of exactly this config in its folder (said once), else None.

    None as well when in-memory objects are ``given`` (model, tokenizer, datasets: the folder cannot
    tell whether they are the ones it was trained on). Called after ``check_before_loading``, which
    has refused an invalid config."""
    from rlhfkit.artifacts import StageResult

    if any(x is not None for x in given):
        return None
    done = completed_result(config)
    if done is None:
        return None
    logger.warning("%s: %s already holds a completed run of this config", config.stage_name, config.output_dir)
    return StageResult(Path(config.output_dir), done)


def final_evaluations(trainer) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The Trainer's evaluation at the final step (one is run when its last is older) and the one at
    step 0 (``eval_on_start``; None without it): ``eval_*`` dicts as the Trainer logs them."""
    state = trainer.state
    evals = [e for e in state.log_history if "eval_loss" in e]
    last = evals[-1] if evals and evals[-1].get("step") == state.global_step else trainer.evaluate()
    return last, next((e for e in evals if e.get("step") == 0), None)


def trained_metrics(config: StageConfig, state, session: "TrainSession", started: float) -> dict[str, Any]:
    """The figures every Trainer-based stage reports, in its metrics.json: losses, steps, times, resume."""
    first_loss, last_loss = train_losses(state.log_history)
    return {
        "train_loss": last_loss,
        "train_loss_first": first_loss,
        "train_time_s": session.train_time_s,
        "wall_time_s": time.perf_counter() - started,
        "steps": state.global_step,
        "steps_this_run": state.global_step - session.start_step,
        "epochs": state.epoch,
        "lora": config.lora,
        "resumed_from": session.resumed_from,
    }


@dataclasses.dataclass
class PreparedTrainer:
    """A Trainer built by a stage's load step (config checked, data and model loaded), and the figures the
    stage reports: ``before_save(trainer, session)`` of the trained model (SFT: eval loss),
    ``after_save(final_model, session)`` of exactly the saved model (reward: held-out pairs)."""

    trainer: Any
    args: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    resume_from: Path | None
    before_save: Callable[[Any, "TrainSession"], dict[str, Any]] | None = None
    after_save: Callable[[Any, "TrainSession"], dict[str, Any]] | None = None


def run_trainer_stage(config: StageConfig, build: Callable[..., PreparedTrainer], **given: Any):
    """A TRL Trainer stage on the stage skeleton (``rlhfkit.stage``):

    1. validate: ``check_before_loading`` (the config; a model folder holding only pickles, unless
       a ``model`` is given in memory);
    3. finished: ``already_finished`` (never when in-memory objects are given: model, tokenizer, datasets);
    4. load: ``build(config, **given)``, the stage's own: data, TRL arguments, tokenizer and model, the Trainer;
    5. train, resuming from the last complete checkpoint; a non-finite final loss stops the stage;
    6. ``before_save``, the final model saved (LoRA merged) into ``output_dir/model``, ``after_save``,
       log_history.json; 7. metrics.json.
    """
    from rlhfkit.engine.zero import without_deepspeed_on_cpu
    from rlhfkit.stage import Stage, run_stage

    started = time.perf_counter()
    stage, out = config.stage_name, Path(config.output_dir)

    def train(prepared: PreparedTrainer) -> tuple[PreparedTrainer, TrainSession]:
        session = run_training(prepared.trainer, prepared.resume_from, config.trl_args.get("resume_from_checkpoint"))
        require_finite(stage, train_loss=train_losses(prepared.trainer.state.log_history)[1])
        return prepared, session

    def save(trained: tuple[PreparedTrainer, TrainSession]) -> dict[str, Any]:
        prepared, session = trained
        trainer = prepared.trainer
        metrics: dict[str, Any] = {"stage": stage}
        if prepared.before_save is not None:
            metrics.update(prepared.before_save(trainer, session))
        final_model = unwrap_for_saving(trainer)
        save_final_model(trainer, final_model, prepared.tokenizer, out / "model")
        if prepared.after_save is not None:
            metrics.update(prepared.after_save(final_model, session))
        metrics.update(trained_metrics(config, trainer.state, session, started))
        if trainer.accelerator.is_main_process:
            write_json_atomic(out / LOG_HISTORY_FILE, sanitize(trainer.state.log_history))
        return metrics

    in_memory = [given.get(k) for k in ("model", "tokenizer", "train_dataset", "eval_dataset")]
    with without_deepspeed_on_cpu():
        return run_stage(Stage(stage, out, validate=lambda: check_before_loading(config, given.get("model")),
                               finished=lambda: already_finished(config, in_memory), load=lambda: build(config, **given),
                               train=train, save=save))


def completed_result(config: StageConfig) -> dict[str, Any] | None:
    """Metrics of an earlier completed run of exactly this config, else None."""
    out = Path(config.output_dir)
    try:
        if read_json(out / STAGE_CONFIG_FILE) != json.loads(json.dumps(to_dict(config))):
            return None
        if not (out / "model" / "config.json").is_file():
            return None
        return read_json(out / METRICS_FILE)
    except (OSError, ValueError):
        return None


def run_training(trainer, resume_from: Path | None, explicit_resume: Any = None) -> TrainSession:
    """Run ``trainer.train`` (resuming when there is a checkpoint) and time it."""
    target = explicit_resume if explicit_resume not in (None, False) else (str(resume_from) if resume_from else None)
    start_step = start_epoch = start_tokens = 0
    if target:
        logger.warning("resuming from %s", target)
        try:
            state = json.loads((Path(str(target)) / "trainer_state.json").read_text(encoding="utf-8"))
            start_step = int(state.get("global_step") or 0)
            start_epoch = float(state.get("epoch") or 0.0)
            start_tokens = int(state.get("num_input_tokens_seen") or 0)
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=target)
    train_time = time.perf_counter() - t0
    return TrainSession(train_time, str(target) if target else None, start_step, start_epoch, start_tokens)


def train_losses(log_history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """First and last logged training loss (mean over their logging windows)."""
    losses = [e["loss"] for e in log_history if "loss" in e and _is_number(e["loss"])]
    return (losses[0], losses[-1]) if losses else (None, None)


def require_finite(stage: str, **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise TrainingError(f"{stage}: final {name} is {value}; the model diverged (try a lower learning_rate)")


def unwrap_for_saving(trainer):
    """The trained model as a plain transformers model: LoRA adapters merged (peft)."""
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        model = model.merge_and_unload()
    return model


def save_final_model(trainer, model, tokenizer, out_dir: Path) -> None:
    """Write ``out_dir`` (HF folder, safetensors + tokenizer) atomically, main process only."""
    state_dict = None
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: every rank
    if trainer.accelerator.is_main_process:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    trainer.accelerator.wait_for_everyone()

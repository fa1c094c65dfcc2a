"""Direct Preference Optimization (Rafailov et al. 2023), through TRL's DPOTrainer.

The alternative third stage: ``sft -> dpo`` instead of ``sft -> reward -> ppo``. It trains the
SFT model on the data stage's preference pairs (the ``pairs`` split: conversational
``prompt`` / ``chosen`` / ``rejected``, TRL's format) with TRL's loss

    L = -log sigmoid( beta * [ (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)) ] )

where the reference pi_ref is the SFT model itself: a frozen copy, or, with ``lora=true``, the
same weights with the adapter disabled (TRL does this when it gets a ``peft_config`` and no
``ref_model``). Its metrics are TRL's implicit rewards on the held-out pairs: ``rewards/accuracies``
(the fraction of pairs whose chosen reply gets the larger implicit reward; 0.5 is chance) and
``rewards/margins``, measured before training and after. The saved policy is an ordinary
causal-LM folder (adapter merged), which the chain's evaluation compares with SFT.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jinja2

from rlhfkit.artifacts import StageResult, load_tokenizer, locks_output
from rlhfkit.data.output import PAIR_COLUMNS
from rlhfkit.engine.sampling import chat_template_error, template_source
from rlhfkit.errors import ConfigError, first_line
from rlhfkit.training import (
    PreparedTrainer,
    StageConfig,
    build_trl_args,
    check_before_loading,
    defaults_note,
    ensure_chat_template,
    final_evaluations,
    load_model,
    load_split_dict,
    lora_config,
    make_stage_callback,
    model_source,
    prepare_output_dir,
    require_finite,
    resolve_trl_kwargs,
    run_trainer_stage,
)

# DPO-specific defaults (see rlhfkit.training.COMMON_TRL_DEFAULTS for the shared ones)
DPO_TRL_DEFAULTS: dict[str, Any] = {
    "eval_on_start": True,  # the held-out reward accuracy before training: the stage's baseline (0.5 = chance)
}
# TRL's evaluation keys (logged with an eval_ prefix) -> this stage's metrics.json names
EVAL_NAMES = {"loss": "eval_loss", "rewards/accuracies": "eval_reward_accuracy", "rewards/margins": "eval_reward_margin",
              "rewards/chosen": "eval_reward_chosen", "rewards/rejected": "eval_reward_rejected"}


@dataclasses.dataclass
class DPOStageConfig(StageConfig):
    """Config of ``rlhfkit dpo``: rlhfkit's fields below, and any field of trl.DPOConfig (``beta``, ``loss_type``, ...)."""

    stage_name: ClassVar[str] = "dpo"
    passthrough_name: ClassVar[str] = "trl.DPOConfig"

    @classmethod
    def help_notes(cls) -> str:
        return defaults_note(DPO_TRL_DEFAULTS, ["the reference is the SFT model: a frozen copy, or the adapter "
                                                "disabled with lora=true"])


def build_dpo_trainer(config: DPOStageConfig, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
                      callbacks: Sequence[Any] = ()) -> PreparedTrainer:
    """Validate, load pairs and model, and construct the DPOTrainer (nothing trained yet)."""
    check_before_loading(config, model)
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    stage = config.stage_name
    # 1. data, before any model loads
    if train_dataset is None:
        if not config.data:
            raise ConfigError(f"{stage}: data is required (a `rlhfkit data build` folder)")
        train_dataset, loaded_eval = load_split_dict(config.data, "pairs", list(PAIR_COLUMNS))
        if eval_dataset is None:
            eval_dataset = loaded_eval
    train_dataset = train_dataset.select_columns(list(PAIR_COLUMNS))
    if eval_dataset is not None:
        eval_dataset = eval_dataset.select_columns(list(PAIR_COLUMNS))
    defaults = dict(DPO_TRL_DEFAULTS) if eval_dataset is not None else {}
    args = build_trl_args(DPOConfig, resolve_trl_kwargs(config, defaults, has_eval=eval_dataset is not None), stage)
    trust = bool(config.trl_args.get("trust_remote_code", False))
    source = None if (model is not None and tokenizer is not None) else model_source(config)
    resume_from = prepare_output_dir(config, is_main=args.process_index == 0)

    # 2. tokenizer and model (the reference: TRL copies the model, or disables the adapter with LoRA)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust)
    ensure_chat_template(stage, tokenizer, args, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by TRL
    if model is None:
        model = load_model(source, AutoModelForCausalLM, args.model_init_kwargs, trust)
    peft_config = lora_config(config, "CAUSAL_LM") if config.lora else None

    # 3. trainer; TRL's own checks become one-line errors
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[make_stage_callback(stage, check_grad_norm=not args.fp16), *callbacks])
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{stage}: {first_line(e)}") from None
    except jinja2.TemplateError as e:  # a template that fails on some rows only (the stage checked a sample)
        raise chat_template_error(args.chat_template_path or template_source(tokenizer), e) from None

    # 4. the figures this stage reports (run_trainer_stage calls it after training)
    def figures(trainer, session) -> dict[str, Any]:
        if eval_dataset is None:
            return {"pairs": len(train_dataset), "eval_pairs": 0, "algorithm": "dpo"}
        last, start = final_evaluations(trainer)
        out = _eval_figures(last)
        out.update({f"{k}_start": v for k, v in _eval_figures(start).items()})
        require_finite(config.stage_name, eval_loss=out["eval_loss"])
        return {**out, "pairs": len(train_dataset), "eval_pairs": len(eval_dataset),
                "algorithm": "dpo", "beta": args.beta}

    return PreparedTrainer(trainer, args, tokenizer, train_dataset, eval_dataset, resume_from, before_save=figures)


def _eval_figures(entry: dict[str, Any] | None) -> dict[str, Any]:
    """TRL's eval_* keys of one evaluation -> this stage's names (``eval_rewards/accuracies`` -> ``eval_reward_accuracy``)."""
    return {name: (entry or {}).get(f"eval_{key}") for key, name in EVAL_NAMES.items()}


@locks_output("output_dir")
def train_dpo(config: DPOStageConfig, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
              callbacks: Sequence[Any] = ()) -> StageResult:
    """Train ``config.model`` (the SFT folder) with DPO on the pairs of ``config.data``; see the module docstring.

    In-memory ``model`` / ``tokenizer`` / datasets (prompt / chosen / rejected) override the paths.
    metrics.json: ``eval_reward_accuracy`` and ``eval_reward_margin`` after training and
    (``_start``) before it, ``eval_loss``, the train losses and times.
    """
    return run_trainer_stage(config, build_dpo_trainer, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, callbacks=callbacks)

"""Supervised fine-tuning on assistant replies, through TRL's SFTTrainer.

Each SFT row of a data folder is a conversation whose last message is the assistant reply
to learn. It is given to TRL as a conversational prompt-completion pair (prompt = every
message before the reply, completion = the reply), so:

- the loss covers exactly the reply's tokens and its closing eos: TRL's
  ``completion_only_loss`` (on for prompt-completion data) intersected with
  ``assistant_only_loss`` (the chat template's ``{% generation %}`` markers). Earlier
  assistant turns are context; each of them is the last message of its own row. Set
  ``completion_only_loss=false`` to train on every assistant turn instead;
- the eos is a label (the embedded template puts it inside the generation block; pad is a
  distinct token), and there is one BOS, from the template (docs/pitfalls.md#1, #2).

With ``lora=true`` the adapters are merged into the saved model, so later stages load a
plain model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jinja2

from rlhfkit.artifacts import StageResult, load_tokenizer, locks_output
from rlhfkit.engine.sampling import chat_template_error, template_source
from rlhfkit.errors import ConfigError, DataError, first_line
from rlhfkit.training import (
    PreparedTrainer,
    StageConfig,
    build_trl_args,
    check_before_loading,
    default_max_length,
    defaults_note,
    ensure_chat_template,
    final_evaluations,
    load_model,
    load_split_dict,
    logger,
    lora_config,
    make_stage_callback,
    model_source,
    prepare_output_dir,
    require_finite,
    resolve_trl_kwargs,
    run_trainer_stage,
)

# SFT-specific defaults (see rlhfkit.training.COMMON_TRL_DEFAULTS for the shared ones).
SFT_TRL_DEFAULTS: dict[str, Any] = {
    "assistant_only_loss": True,  # loss on assistant tokens only (generation markers)
}


@dataclasses.dataclass
class SFTStageConfig(StageConfig):
    """Config of ``rlhfkit sft``: rlhfkit's fields below, and any field of trl.SFTConfig."""

    stage_name: ClassVar[str] = "sft"
    passthrough_name: ClassVar[str] = "trl.SFTConfig"

    @classmethod
    def help_notes(cls) -> str:
        return defaults_note(SFT_TRL_DEFAULTS, ["max_length=min(1024, the model's max_position_embeddings)"])


def to_prompt_completion(dataset, where: str = "sft"):
    """``messages`` rows -> conversational ``prompt`` / ``completion`` (the last assistant reply)."""
    cols = dataset.column_names
    if "prompt" in cols and "completion" in cols:
        return dataset.select_columns(["prompt", "completion"])
    if "messages" not in cols:
        raise DataError(f"{where}: expected a 'messages' column (or prompt/completion), found {', '.join(cols)}")

    def split(example: dict[str, Any]) -> dict[str, Any]:
        messages = example["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            ident = example.get("message_id") or example.get("tree_id") or "?"
            raise DataError(f"{where}: row {ident}: the last message must be an assistant reply")
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return dataset.map(split, remove_columns=cols, desc=f"Preparing {where} conversations")


def build_sft_trainer(
    config: SFTStageConfig,
    *,
    model=None,
    tokenizer=None,
    train_dataset=None,
    eval_dataset=None,
    callbacks: Sequence[Any] = (),
) -> PreparedTrainer:
    """Validate, load data and model, and construct the SFTTrainer (nothing trained yet).

    Every config or data problem is raised before the model loads. Used by ``train_sft``;
    public so that tests and tools can inspect the exact tokenized training examples.
    """
    check_before_loading(config, model)
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    stage = config.stage_name

    # 1. data (no model loaded yet: every data or config problem surfaces first)
    if train_dataset is None:
        if not config.data:
            raise ConfigError(f"{stage}: data is required (a `rlhfkit data build` folder)")
        train_dataset, loaded_eval = load_split_dict(config.data, "sft", ["messages"])
        if eval_dataset is None:
            eval_dataset = loaded_eval

    # 2. TRL arguments (validated by TRL itself)
    user_max_length = "max_length" in config.trl_args
    defaults = dict(SFT_TRL_DEFAULTS)
    if config.trl_args.get("padding_free") and not config.trl_args.get("packing"):
        defaults["max_length"] = None  # padding-free without packing cannot truncate
        user_max_length = True
    args = build_trl_args(SFTConfig, resolve_trl_kwargs(config, defaults, has_eval=eval_dataset is not None), stage)
    with args.main_process_first(desc="preparing SFT conversations"):
        train_dataset = to_prompt_completion(train_dataset, f"{stage} train")
        if eval_dataset is not None:
            eval_dataset = to_prompt_completion(eval_dataset, f"{stage} validation")
    trust = bool(config.trl_args.get("trust_remote_code", False))
    source = None if (model is not None and tokenizer is not None) else model_source(config)
    resume_from = prepare_output_dir(config, is_main=args.process_index == 0)

    # 3. tokenizer and model
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust)
    ensure_chat_template(stage, tokenizer, args, source)
    if model is None:
        model = load_model(source, AutoModelForCausalLM, args.model_init_kwargs, trust)
    if not user_max_length:
        args.max_length = default_max_length(model)
    peft_config = lora_config(config, "CAUSAL_LM") if config.lora else None

    # 4. trainer; TRL's own checks become one-line errors
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[make_stage_callback(stage, check_grad_norm=not args.fp16), *callbacks],
        )
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{stage}: {first_line(e)}") from None
    except jinja2.TemplateError as e:  # a template that fails on some rows only (the stage checked a sample)
        raise chat_template_error(args.chat_template_path or template_source(tokenizer), e) from None
    lost = len(train_dataset) - len(trainer.train_dataset)
    if not args.packing and lost:
        logger.warning(
            "%s: %d of %d training examples have no reply token left within max_length=%s and were dropped",
            stage, lost, len(train_dataset), args.max_length,
        )

    # 5. the figures this stage reports (run_trainer_stage calls it after training)
    def figures(trainer, session) -> dict[str, Any]:
        """The evaluation loss at the final step (the Trainer's, if it just evaluated), and what was trained on."""
        state = trainer.state
        last, start = final_evaluations(trainer) if eval_dataset is not None else ({}, None)
        eval_loss = last.get("eval_loss")
        require_finite(stage, eval_loss=eval_loss)
        tokens = None
        if args.include_num_input_tokens_seen not in ("no", False):
            tokens = int(state.num_input_tokens_seen - session.start_tokens)
        return {
            "eval_loss": eval_loss,
            # with eval_on_start: the loss of the model before this stage trained it
            "eval_loss_start": start["eval_loss"] if start else None,
            "train_tokens": tokens,
            "train_tokens_per_s": tokens / session.train_time_s if tokens is not None and session.train_time_s else None,
            "examples": len(train_dataset),
            # TRL drops examples whose reply is truncated away entirely (max_length); count them
            "examples_dropped": None if args.packing else len(train_dataset) - len(trainer.train_dataset),
            "train_sequences": len(trainer.train_dataset),
            "eval_examples": len(eval_dataset) if eval_dataset is not None else 0,
            "max_length": args.max_length,
            "packing": bool(args.packing),
        }

    return PreparedTrainer(trainer, args, tokenizer, train_dataset, eval_dataset, resume_from, before_save=figures)


@locks_output("output_dir")
def train_sft(
    config: SFTStageConfig,
    *,
    model=None,
    tokenizer=None,
    train_dataset=None,
    eval_dataset=None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Fine-tune ``config.model`` on the SFT rows of ``config.data``; see the module docstring.

    In-memory ``model`` / ``tokenizer`` / datasets (rows with ``messages``, or TRL's
    prompt/completion) override the paths in ``config``. ``callbacks`` are extra
    transformers ``TrainerCallback`` objects. Returns the stage folder and its metrics.
    """
    return run_trainer_stage(config, build_sft_trainer, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, callbacks=callbacks)

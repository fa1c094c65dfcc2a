"""Bradley-Terry reward model, through TRL's RewardTrainer.

The model is the SFT model (or any causal LM folder) loaded as
``AutoModelForSequenceClassification(num_labels=1)``: a scalar head on the last hidden
state, read at the last non-pad token. ``config.pad_token_id`` is set from a pad token
distinct from eos (the unknown token when the model pads with eos), so the head never reads
a padding or an earlier eos (docs/pitfalls.md#3).

Pairs are tokenized here, as TRL would (``apply_chat_template(prompt + reply,
tokenize=True)``) but cut after the reply's EOS (``conversation_ids``), so that pairs that are too long or identical after tokenization are
dropped *and counted* (docs/pitfalls.md#5), and an optional margin column is added:
``margin = margin_scale * (rejected_rank - chosen_rank)`` (lower rank = better), used by
TRL as ``-logsigmoid(r_c - r_r - margin)``. ``center_rewards_coefficient`` (TRL) adds the
centring term.

After training, every held-out pair is scored by the final (merged) model:
``eval_accuracy`` = fraction with r(chosen) > r(rejected), ``eval_loss`` = mean
``-logsigmoid(r_c - r_r)`` (no margin, no centring), and, when the embedded world's gold
judge recognises the prompts, ``gold_agreement`` = fraction of pairs with unequal gold
whose reward order matches the gold order.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from rlhfkit.artifacts import StageResult, load_tokenizer, locks_output, write_text_atomic
from rlhfkit.config import field
from rlhfkit.data.output import PAIR_COLUMNS
from rlhfkit.engine.forward import reward_scores
from rlhfkit.engine.sampling import conversation_ids
from rlhfkit.errors import ConfigError, DataError, first_line
from rlhfkit.reward.ensemble import SCORES_FILE, agreement_with_gold
from rlhfkit.training import (
    PreparedTrainer,
    StageConfig,
    build_trl_args,
    check_before_loading,
    default_max_length,
    defaults_note,
    ensure_chat_template,
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

REWARD_TRL_DEFAULTS: dict[str, Any] = {
    "disable_dropout": True,  # a reward is a deterministic function of the text
}
_DROP = "_rlhfkit_drop"


@dataclasses.dataclass
class RewardStageConfig(StageConfig):
    """Config of ``rlhfkit reward``: rlhfkit's fields below, and any field of trl.RewardConfig."""

    margin_scale: float = field(
        0.0,
        help="0: no margin; > 0: margin = margin_scale * (rejected_rank - chosen_rank) in the Bradley-Terry loss",
    )
    gold_agreement: Literal["auto", "on", "off"] = field(
        "auto",
        help="agreement with the embedded world's gold judge on held-out pairs: auto = when it recognises the prompts",
    )

    stage_name: ClassVar[str] = "reward"
    passthrough_name: ClassVar[str] = "trl.RewardConfig"

    @classmethod
    def help_notes(cls) -> str:
        return defaults_note(REWARD_TRL_DEFAULTS, [
            "max_length=min(1024, the model's max_position_embeddings) (longer pairs are dropped and counted)",
            "the final evaluation is rlhfkit's own, over the whole validation split",
        ])

    def validate(self) -> list[str]:
        problems = super().validate()
        if not (math.isfinite(self.margin_scale) and self.margin_scale >= 0):
            problems.append(f"margin_scale: must be >= 0, got {self.margin_scale}")
        if self.gold_agreement == "on" and importlib.util.find_spec("rlhfkit.world.gold") is None:
            problems.append("gold_agreement: 'on' needs rlhfkit.world.gold, which is not installed")
        return problems


# -- data -------------------------------------------------------------------------------------


def _check_pair(example: dict[str, Any], where: str) -> None:
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    ident = example.get("tree_id", "?")
    if not isinstance(prompt, list) or not prompt or prompt[-1].get("role") != "user":
        raise DataError(f"{where}: pair in tree {ident}: prompt must be a list of messages ending with a user turn")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(reply, list) or len(reply) != 1 or reply[0].get("role") != "assistant":
            raise DataError(f"{where}: pair in tree {ident}: {name} must be a one-element list with an assistant message")


def tokenize_pairs(dataset, tokenizer, *, margin_scale: float, max_length: int | None, num_proc: int | None, where: str):
    """Add ``chosen_ids`` / ``rejected_ids`` (and ``margin``); drop too-long and identical pairs.

    Returns ``(dataset, {"too_long": n, "identical": m})``.
    """
    missing = [c for c in PAIR_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: column(s) {', '.join(missing)} missing (found: {', '.join(dataset.column_names)})")
    if margin_scale > 0:
        missing = [c for c in ("chosen_rank", "rejected_rank") if c not in dataset.column_names]
        if missing:
            raise DataError(f"{where}: margin_scale > 0 needs column(s) {', '.join(missing)}")

    def tokenize(example: dict[str, Any]) -> dict[str, Any]:
        _check_pair(example, where)
        out = {"chosen_ids": conversation_ids(tokenizer, example["prompt"] + example["chosen"]),
               "rejected_ids": conversation_ids(tokenizer, example["prompt"] + example["rejected"])}
        if margin_scale > 0:
            out["margin"] = float(margin_scale * (example["rejected_rank"] - example["chosen_rank"]))
        longest = max(len(out["chosen_ids"]), len(out["rejected_ids"]))
        # why a pair is dropped: 0 kept, 1 too long, 2 identical after tokenization
        if max_length is not None and longest > max_length:
            out[_DROP] = 1
        elif out["chosen_ids"] == out["rejected_ids"]:
            out[_DROP] = 2
        else:
            out[_DROP] = 0
        return out

    n = len(dataset)
    dataset = dataset.map(tokenize, num_proc=num_proc, desc=f"Tokenizing {where} pairs")
    codes = list(dataset[_DROP])
    dropped = {"too_long": codes.count(1), "identical": codes.count(2)}
    if dropped["too_long"] or dropped["identical"]:
        dataset = dataset.filter(
            lambda drop: [d == 0 for d in drop], input_columns=[_DROP], batched=True, num_proc=num_proc,
            desc=f"Dropping too long and identical {where} pairs",
        )
        logger.warning(
            "%s: dropped %d pairs longer than max_length=%s and %d identical pairs (of %d)",
            where, dropped["too_long"], max_length, dropped["identical"], n,
        )
    return dataset.remove_columns(_DROP), dropped


def trainer_columns(dataset, with_length: bool = False):
    """The columns RewardTrainer reads, plus ``length`` (the longer side of each pair) for
    ``train_sampling_strategy: group_by_length``, which batches pairs of similar length."""
    keep = [c for c in ("chosen_ids", "rejected_ids", "margin") if c in dataset.column_names]
    if with_length:
        dataset = dataset.map(lambda chosen, rejected: {"length": [max(len(c), len(r)) for c, r in zip(chosen, rejected)]},
                              input_columns=["chosen_ids", "rejected_ids"], batched=True)
        keep.append("length")
    return dataset.select_columns(keep)


def gold_agreement(mode: str, prompts, chosen_texts, rejected_texts, r_chosen, r_rejected):
    """``(agreement | None, pairs counted, per-pair (gold_chosen, gold_rejected) | None)``.

    A pair counts when the gold judge recognises its prompt and scores the two replies
    differently; it agrees when the reward model orders them the same way (a reward tie
    disagrees).
    """
    if mode == "off":
        return None, 0, None
    try:
        gold = importlib.import_module("rlhfkit.world.gold")
    except ImportError:
        if mode == "on":
            raise ConfigError("gold_agreement: 'on' needs rlhfkit.world.gold, which is not installed") from None
        return None, 0, None
    known = [gold.task_family(p) is not None for p in prompts]
    if not any(known):
        if mode == "on":
            logger.warning("gold_agreement: the gold judge recognises none of the validation prompts")
        return None, 0, None
    golds = [(float(gold.gold_score(p, c)), float(gold.gold_score(p, r))) if ok else None
             for ok, p, c, r in zip(known, prompts, chosen_texts, rejected_texts)]
    agreement, counted = agreement_with_gold(r_chosen, r_rejected, golds)
    return agreement, counted, golds


# -- the stage --------------------------------------------------------------------------------


def build_reward_trainer(
    config: RewardStageConfig,
    *,
    model=None,
    tokenizer=None,
    train_dataset=None,
    eval_dataset=None,
    callbacks: Sequence[Any] = (),
) -> PreparedTrainer:
    """Validate, load and tokenize the pairs, load the model, and construct the RewardTrainer (nothing
    trained yet), with the held-out figures the stage reports of the saved model."""
    check_before_loading(config, model)
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    stage = config.stage_name

    # 1. data and TRL arguments, before any model loads
    required = list(PAIR_COLUMNS) + (["chosen_rank", "rejected_rank"] if config.margin_scale > 0 else [])
    if train_dataset is None:
        if not config.data:
            raise ConfigError(f"{stage}: data is required (a `rlhfkit data build` folder)")
        train_dataset, loaded_eval = load_split_dict(config.data, "pairs", required)
        if eval_dataset is None:
            eval_dataset = loaded_eval
    user_max_length = "max_length" in config.trl_args
    kwargs = resolve_trl_kwargs(config, REWARD_TRL_DEFAULTS, has_eval=eval_dataset is not None)
    args = build_trl_args(RewardConfig, kwargs, stage)
    trust = bool(config.trl_args.get("trust_remote_code", False))
    source = None if (model is not None and tokenizer is not None) else model_source(config)
    resume_from = prepare_output_dir(config, is_main=args.process_index == 0)

    # 2. tokenizer and model (a distinct pad token, and the head reads at the last non-pad token)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust)
    ensure_chat_template(stage, tokenizer, args, source)  # checked before the model loads
    if args.pad_token is not None:  # TRL's (deprecated) pad_token: applied here, before pairs are tokenized
        if args.pad_token not in tokenizer.get_vocab():
            raise ConfigError(f"pad_token: {args.pad_token!r} is not in the vocabulary of {source or 'the tokenizer'}")
        tokenizer.pad_token = args.pad_token
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Many hub models pad with eos; the head would then read before the final eos. Their unknown
        # token (never produced by a byte-level tokenizer) pads as well, and no embedding is added.
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in (tokenizer.eos_token_id,
                                                                                  tokenizer.bos_token_id):
            logger.warning("%s: pad = eos (%r) in %s; padding with the unknown token %r instead, so the score is "
                           "read at the last real token", stage, tokenizer.eos_token, source or "the tokenizer",
                           tokenizer.unk_token)
            tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(
            f"{stage}: the tokenizer's pad token must exist and differ from eos ({tokenizer.eos_token!r}), "
            "or rewards are read at the wrong token; add a pad token and resize the embeddings"
        )
    if model is None:
        set_seed(config.seed)  # the new score head is initialised randomly
        with suppress_seqcls_warning():
            model = load_model(
                source, AutoModelForSequenceClassification, args.model_init_kwargs, trust, num_labels=1
            )
    model, tokenizer = ensure_chat_template(stage, tokenizer, args, source, model, apply=True)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if not user_max_length:
        args.max_length = default_max_length(model)

    # 3. pairs -> token ids (+ margin); too long / identical pairs dropped and counted
    eval_tok, eval_dropped = None, {"too_long": 0, "identical": 0}
    with args.main_process_first(desc="tokenizing pairs"):
        train_tok, train_dropped = tokenize_pairs(
            train_dataset, tokenizer, margin_scale=config.margin_scale, max_length=args.max_length,
            num_proc=args.dataset_num_proc, where=f"{stage} train",
        )
        if eval_dataset is not None:
            eval_tok, eval_dropped = tokenize_pairs(
                eval_dataset, tokenizer, margin_scale=config.margin_scale, max_length=args.max_length,
                num_proc=args.dataset_num_proc, where=f"{stage} validation",
            )
    if len(train_tok) == 0:
        raise DataError(f"{stage}: no training pairs left after dropping too-long and identical ones")
    if eval_tok is not None and len(eval_tok) == 0:
        logger.warning("%s: no validation pairs left; no evaluation", stage)
        eval_tok = None
        from transformers.trainer_utils import IntervalStrategy

        args.eval_strategy = IntervalStrategy.NO
    peft_config = lora_config(config, "SEQ_CLS", modules_to_save=["score"]) if config.lora else None
    max_length = args.max_length
    args.max_length = None  # already applied above; spares TRL a second pass over both splits
    group_by_length = args.train_sampling_strategy == "group_by_length"
    if group_by_length:  # the train and eval samplers both group; they read `length` (the collator ignores it)
        args.remove_unused_columns = False

    # 4. trainer; TRL's own checks become one-line errors
    try:
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=trainer_columns(train_tok, with_length=group_by_length),
            eval_dataset=trainer_columns(eval_tok, with_length=group_by_length) if eval_tok is not None else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[
                make_stage_callback(stage, skip_final_eval=True, check_grad_norm=not args.fp16),
                *callbacks,
            ],
        )
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{stage}: {first_line(e)}") from None

    out = Path(config.output_dir)

    # 5. the figures this stage reports of exactly the saved model (run_trainer_stage calls it)
    def held_out(final_model, session) -> dict[str, Any]:
        """Every held-out pair scored by exactly the saved model (every rank scores: no collective to
        wait on; the main one writes the scores), and what was trained on."""
        metrics: dict[str, Any] = {}
        if eval_tok is not None:
            batch = args.per_device_eval_batch_size
            r_c = reward_scores(final_model, eval_tok["chosen_ids"], tokenizer.pad_token_id, batch_size=batch)
            r_r = reward_scores(final_model, eval_tok["rejected_ids"], tokenizer.pad_token_id, batch_size=batch)
            diff = r_c - r_r
            eval_loss = float(-F.logsigmoid(diff).mean())
            eval_accuracy = float((diff > 0).float().mean())
            require_finite(stage, eval_loss=eval_loss)
            agreement, gold_pairs, golds = gold_agreement(
                config.gold_agreement,
                eval_tok["prompt"],
                [c[0]["content"] for c in eval_tok["chosen"]],
                [r[0]["content"] for r in eval_tok["rejected"]],
                r_c.tolist(),
                r_r.tolist(),
            )
            all_r = torch.cat([r_c, r_r])
            metrics.update(
                eval_accuracy=eval_accuracy,
                # binomial, pairs independent; undefined for one pair (null, shown as "–")
                eval_accuracy_se=math.sqrt(eval_accuracy * (1 - eval_accuracy) / len(diff)) if len(diff) > 1 else None,
                eval_loss=eval_loss,
                eval_pairs=len(eval_tok),
                eval_reward_mean=float(all_r.mean()),
                eval_reward_std=float(all_r.std()) if len(all_r) > 1 else 0.0,
                gold_agreement=agreement,
                gold_pairs=gold_pairs,
            )
            if trainer.accelerator.is_main_process:
                _write_scores(out / SCORES_FILE, eval_tok, r_c.tolist(), r_r.tolist(), golds)
        else:
            metrics.update(eval_accuracy=None, eval_accuracy_se=None, eval_loss=None, eval_pairs=0, gold_agreement=None,
                           gold_pairs=0)
        pairs_done = (float(trainer.state.epoch or 0.0) - session.start_epoch) * len(train_tok)
        metrics.update(
            pairs_per_s=pairs_done / session.train_time_s if session.train_time_s else None,
            train_pairs=len(train_tok),
            train_pairs_dropped=train_dropped,
            eval_pairs_dropped=eval_dropped,
            max_length=max_length,
            margin_scale=config.margin_scale,
            center_rewards_coefficient=args.center_rewards_coefficient,
        )
        return metrics

    return PreparedTrainer(trainer, args, tokenizer, train_tok, eval_tok, resume_from, after_save=held_out)


@locks_output("output_dir")
def train_reward(
    config: RewardStageConfig,
    *,
    model=None,
    tokenizer=None,
    train_dataset=None,
    eval_dataset=None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Train a Bradley-Terry reward model on the pairs of ``config.data``; see the module docstring.

    In-memory ``model`` (a sequence-classification model with ``num_labels=1``),
    ``tokenizer`` and datasets (rows with prompt / chosen / rejected, and the ranks when
    ``margin_scale > 0``) override the paths in ``config``. ``callbacks`` are extra
    transformers ``TrainerCallback`` objects. Returns the stage folder and its metrics.
    """
    return run_trainer_stage(config, build_reward_trainer, model=model, tokenizer=tokenizer, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, callbacks=callbacks)


def _write_scores(path: Path, pairs, r_c: list[float], r_r: list[float], golds) -> None:
    trees = pairs["tree_id"] if "tree_id" in pairs.column_names else [None] * len(pairs)
    lines = []
    for i, (tree, c, r) in enumerate(zip(trees, r_c, r_r)):
        row: dict[str, Any] = {"pair": i, "tree_id": tree, "chosen_reward": c, "rejected_reward": r}
        if golds is not None and golds[i] is not None:
            row["gold_chosen"], row["gold_rejected"] = golds[i]
        lines.append(json.dumps(row))
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))

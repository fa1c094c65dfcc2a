"""Forwards over padded token rows: the log-probs of responses, per-token values, reward scores.

Rows are ``[query | response]``: queries left-padded, responses right-padded. Position ids
come from the attention mask in every forward (and in sampling), so padding on either side
shifts nothing, and a score is read at the last real token found from the mask, never by
searching for a pad id (which may equal EOS: docs/pitfalls.md#3).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from rlhfkit.engine.sharding import is_partitioned


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights live (accelerate moves them): new tensors for its forward go there."""
    return next(model.parameters()).device


def pad_rows(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None,
             side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, W], mask [B, W]) padded on ``side``, built on the CPU and moved to ``device`` once."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device="cpu")
    for i, seq in enumerate(sequences):
        if seq:
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[i, cols] = torch.tensor(list(seq), dtype=torch.long, device="cpu")
            mask[i, cols] = 1
    if device is None:
        return ids, mask
    return ids.to(device), mask.to(device)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a batch to sample from: ``pad_rows`` on the left."""
    return pad_rows(sequences, pad_id, device, "left")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; padding gets 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# Scoring and training forwards run on [query | response] rows whose queries are left-padded
# to the longest prompt of the batch: often a third of the tokens are padding. The rows are
# sorted by their extent (first real token to the right edge) and cut into groups, each
# trimmed to its own widest row; a group costs (rows x width) tokens plus a fixed overhead
# (GROUP_OVERHEAD_TOKENS) for its extra forward, and the partition minimising the total is
# found exactly (sorted rows, O(B^2)). Dropping a column of padding changes no output:
# position ids come from the mask and padded keys are masked.
GROUP_OVERHEAD_TOKENS = 64


def row_groups(attention_mask: torch.Tensor, min_width: int = 1,
               overhead_tokens: int | None = None) -> list[tuple[torch.Tensor, int]] | None:
    """Groups ``[(row indices, first column), ...]`` that skip left padding; None if nothing to skip.

    Every group keeps at least the last ``min_width`` columns.
    """
    batch, width = attention_mask.shape
    if batch == 0 or width <= min_width:
        return None
    if overhead_tokens is None:
        overhead_tokens = GROUP_OVERHEAD_TOKENS
    real = attention_mask.bool()
    first = torch.where(real.any(1), real.to(torch.uint8).argmax(1), 0)
    extent = (width - first).clamp(min=min(min_width, width))
    extents, order = extent.sort(stable=True)
    e = extents.tolist()
    if e[-1] == e[0] and e[0] == width:
        return None
    best = [0] + [None] * batch
    cut = [0] * (batch + 1)
    for j in range(1, batch + 1):  # rows order[i:j] as one group, padded to e[j - 1]
        widest = e[j - 1]
        for i in range(j):
            cost = best[i] + (j - i) * widest + overhead_tokens
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = batch
    while j > 0:
        i = cut[j]
        groups.append((order[i:j], width - e[j - 1]))
        j = i
    groups.reverse()
    if len(groups) == 1 and groups[0][1] == 0:
        return None
    return groups


def _grouped(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
             attention_mask: torch.Tensor, min_width: int, model: torch.nn.Module) -> torch.Tensor:
    """``fn(ids, mask)`` (batch-first output) over padding-trimmed row groups, in the original row order.

    A sharded ``model`` (FSDP, ZeRO-3) gets one forward for the whole batch: each of its forwards is a
    collective that every process must join, and the number of groups depends on each process's rows."""
    groups = None if is_partitioned(model) else row_groups(attention_mask, min_width)
    if groups is None:
        return fn(input_ids, attention_mask)
    if len(groups) == 1:
        first = groups[0][1]
        return fn(input_ids[:, first:], attention_mask[:, first:])
    outputs, rows = [], []
    for index, first in groups:
        outputs.append(fn(input_ids[index, first:], attention_mask[index, first:]))
        rows.append(index)
    inverse = torch.empty(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    inverse[torch.cat(rows)] = torch.arange(input_ids.shape[0], device=input_ids.device)
    return torch.cat(outputs)[inverse]


def response_logits(model: torch.nn.Module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Logits that predict each response token: positions P-1 .. P+R-2 -> [B, R, V].

    ``logits_to_keep`` skips the LM head on prompt positions; left padding is skipped (``row_groups``).
    """
    def forward(ids, mask):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                    logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1, :]

    return _grouped(forward, input_ids, attention_mask, response_length + 1, model)


def token_values(value_model: torch.nn.Module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Per-token values V(s_t) from a sequence-classification model's backbone and head -> [B, R]."""
    backbone = getattr(value_model, value_model.base_model_prefix)

    def forward(ids, mask):
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                          use_cache=False).last_hidden_state
        hidden = hidden[:, -response_length - 1:-1, :]
        return value_model.score(hidden).squeeze(-1).float()

    return _grouped(forward, input_ids, attention_mask, response_length + 1, value_model)


def sequence_scores(reward_model: torch.nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The reward model's score read at each row's last real token -> [B] (docs/pitfalls.md#3).

    The index comes from the attention mask, so it is right for left and right padding
    alike and never confuses a pad with an EOS. A ``*ForSequenceClassification`` with a
    ``score`` head (decoders) is read there; other models (an encoder such as BERT, which
    pools its first token) give their own logits.
    """
    backbone = getattr(reward_model, getattr(reward_model, "base_model_prefix", ""), None)
    head = getattr(reward_model, "score", None)

    def forward(ids, mask):
        positions = position_ids(mask)
        if backbone is None or not isinstance(head, torch.nn.Module):
            return reward_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.squeeze(-1).float()
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        width = mask.shape[1]
        last = width - 1 - mask.flip(-1).long().argmax(-1)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return head(picked).squeeze(-1).float()

    return _grouped(forward, input_ids, attention_mask, 1, reward_model)


@torch.no_grad()
def reward_scores(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int, *,
                  batch_size: int = 32, padding_side: str = "right") -> torch.Tensor:
    """Scalar reward of each token sequence (``sequence_scores`` over batches of similar length) -> float [N] on the CPU.

    The reward stage scores its held-out pairs with it and a reward model with its own
    tokenizer scores re-encoded conversations with it; left and right padding give the same
    scores. The model is put in eval mode for the call.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding per batch
    scores = torch.empty(len(sequences), dtype=torch.float32)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_rows([sequences[i] for i in idx], pad_token_id, device, padding_side)
            scores[torch.tensor(idx)] = sequence_scores(model, ids, mask).cpu()
    finally:
        model.train(was_training)
    return scores

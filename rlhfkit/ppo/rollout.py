"""Rollouts: sample responses, then score them with the reference, value and reward models.

Sequences are ``[query | response]``: queries left-padded to a common length P, responses
right-padded after their EOS to R tokens. Position ids come from the attention mask in
sampling and in every scoring forward, so left padding cannot shift them (the log-probs
used for training then match the sampled ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from rlhfkit.ppo.core import logprobs_from_logits, mask_after_eos

RewardFn = Callable[[list[Any], list[str]], Sequence[float]]


@dataclass
class Rollout:
    """One batch of episodes. B = episodes, P = query length, R = response length."""

    query_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    response_ids: torch.Tensor  # [B, R] sampled tokens, pad after EOS
    response_mask: torch.Tensor  # [B, R] 1 up to and including EOS (a prefix)
    logprobs: torch.Tensor  # [B, R] log pi_old(a_t | s_t) at the sampling temperature, 0 on padding
    ref_logprobs: torch.Tensor  # [B, R] log pi_ref(a_t | s_t), same temperature, 0 on padding
    values: torch.Tensor  # [B, R] V(s_t) of the state before each response token, 0 on padding
    scores: torch.Tensor  # [B] reward for the whole response (EOS penalty and clipping applied)
    raw_scores: torch.Tensor  # [B] reward before penalty and clipping
    has_eos: torch.Tensor  # [B] bool: the response ended with EOS within R tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; padding gets 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class _LlamaDecoder:
    """Hand-rolled one-token decode step of a plain ``LlamaForCausalLM`` over preallocated K/V buffers.

    It calls the model's own submodules (embedding, norms, projections, MLP, rotary embedding,
    the sdpa attention function) in the order of ``LlamaModel.forward``, so the logits are the
    model's own (bit for bit in our checks); what it skips is the per-step work around them:
    building the attention mask, growing a ``DynamicCache`` with ``torch.cat`` (a copy of the
    whole cache per token and layer) and the output/decorator plumbing -- 7-17% of a decode
    step on CPU for small models. Its prefill skips the prompts' left padding (``row_groups``).
    Any other model (or attention implementation) takes the generic path of ``sample``.
    """

    def __init__(self, model, apply_rotary, attention):
        self.model, self.inner = model, model.model
        self.apply_rotary, self.attention = apply_rotary, attention
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "_LlamaDecoder | None":
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            from transformers.models.llama import modeling_llama as llama
        except ImportError:  # pragma: no cover - transformers without these modules
            return None
        if type(model) is not llama.LlamaForCausalLM or type(getattr(model, "model", None)) is not llama.LlamaModel:
            return None
        config = model.config
        if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(DynamicCache(), "layers"):
            return None
        if model.training and getattr(config, "attention_dropout", 0.0):
            return None
        for layer in model.model.layers:
            if type(layer) is not llama.LlamaDecoderLayer or type(layer.self_attn) is not llama.LlamaAttention:
                return None
        return cls(model, llama.apply_rotary_pos_emb, ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None))

    def prefill(self, query_ids, query_mask, capacity: int) -> torch.Tensor:
        """Run the prompts (in padding-trimmed row groups), keep their K/V; return the last logits [B, V]."""
        batch, width = query_ids.shape
        groups = row_groups(query_mask, 1) or [(torch.arange(batch), 0)]
        last_logits = None
        for rows, first in groups:
            mask = query_mask[rows, first:]
            cache = DynamicCache()
            out = self.model(input_ids=query_ids[rows, first:], attention_mask=mask, position_ids=position_ids(mask),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            if last_logits is None:
                last_logits = out.logits.new_empty((batch, out.logits.shape[-1]))
                for layer in cache.layers:  # zeros where a row's prompt is shorter than the batch's (masked)
                    k, v = layer.keys, layer.values
                    self.keys.append(k.new_zeros((batch, k.shape[1], capacity, k.shape[-1])))
                    self.values.append(v.new_zeros((batch, v.shape[1], capacity, v.shape[-1])))
            last_logits[rows] = out.logits[:, -1, :]
            for layer, keys, values in zip(cache.layers, self.keys, self.values):
                keys[rows, :, first:width] = layer.keys
                values[rows, :, first:width] = layer.values
        return last_logits

    def step(self, token: torch.Tensor, position: torch.Tensor, length: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] after feeding ``token`` [B] at ``position`` [B, 1]; the cache holds ``length`` positions."""
        inner = self.inner
        hidden = inner.embed_tokens(token[:, None])
        cos, sin = inner.rotary_emb(hidden, position)
        for layer, key_buffer, value_buffer in zip(inner.layers, self.keys, self.values):
            attn = layer.self_attn
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            shape = (hidden.shape[0], 1, -1, attn.head_dim)
            query = attn.q_proj(hidden).view(shape).transpose(1, 2)
            key = attn.k_proj(hidden).view(shape).transpose(1, 2)
            value = attn.v_proj(hidden).view(shape).transpose(1, 2)
            query, key = self.apply_rotary(query, key, cos, sin)
            key_buffer[:, :, length:length + 1] = key
            value_buffer[:, :, length:length + 1] = value
            out, _ = self.attention(attn, query, key_buffer[:, :, :length + 1], value_buffer[:, :, :length + 1], mask,
                                    dropout=0.0, scaling=attn.scaling)
            hidden = residual + attn.o_proj(out.reshape(hidden.shape[0], 1, -1).contiguous())
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(inner.norm(hidden))[:, -1, :]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` with a KV cache; stop rows at EOS and pad after it.

    Returns (response_ids [B, R], logprobs [B, R]) where logprobs are log-softmax(logits / T)
    of the sampled tokens, 0 after EOS. R <= max_new_tokens: the loop ends when every row
    has emitted EOS.

    A plain Llama policy runs a prefill that skips the prompts' left padding and a hand-rolled
    decode step over its own submodules and preallocated K/V buffers (``_LlamaDecoder``);
    other models go through their ``forward`` with a ``DynamicCache``. No forward is run
    after the last token. Sampling itself (``torch.multinomial`` on exp(log-softmax(logits/T)))
    is unchanged, so the tokens for a given generator state are the same on either path.
    """
    batch, width = query_ids.shape
    capacity = width + max_new_tokens
    attention = torch.ones((batch, capacity), dtype=query_mask.dtype)
    attention[:, :width] = query_mask
    positions = position_ids(query_mask)
    decoder = _LlamaDecoder.for_model(model)
    if decoder is not None:
        logits = decoder.prefill(query_ids, query_mask, capacity)
        # as the model's sdpa mask: none when no row is padded, else True where attended
        step_mask = None if bool(query_mask.all()) else attention.bool()[:, None, None, :]
    else:
        cache = DynamicCache()
        logits = model(input_ids=query_ids, attention_mask=query_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32)
    steps = 0
    for step in range(max_new_tokens):
        logits = logits.float()
        if greedy:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits / temperature, -1).gather(-1, token[:, None])[:, 0]
        else:
            log_probs = torch.log_softmax(logits / temperature, -1)
            token = torch.multinomial(log_probs.exp(), 1, generator=generator)[:, 0]
            logp = log_probs.gather(-1, token[:, None])[:, 0]
        token = token.masked_fill_(finished, pad_id)
        tokens[:, step] = token
        logprobs[:, step] = logp.masked_fill_(finished, 0.0)
        steps = step + 1
        finished |= token == eos_id
        if step + 1 == max_new_tokens or bool(finished.all()):
            break  # the last token needs no forward
        length = width + step  # positions in the cache before this token
        if decoder is not None:
            logits = decoder.step(token, next_position, length,
                                  None if step_mask is None else step_mask[..., :length + 1])
        else:
            logits = model(input_ids=token[:, None], attention_mask=attention[:, :length + 1],
                           position_ids=next_position, past_key_values=cache, use_cache=True).logits[:, -1, :]
        next_position = next_position + 1
    return tokens[:, :steps], logprobs[:, :steps]


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
    first = torch.where(real.any(1), real.to(torch.uint8).argmax(1), torch.zeros(batch, dtype=torch.long))
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
             attention_mask: torch.Tensor, min_width: int) -> torch.Tensor:
    """``fn(ids, mask)`` (batch-first output) over padding-trimmed row groups, in the original row order."""
    groups = row_groups(attention_mask, min_width)
    if groups is None:
        return fn(input_ids, attention_mask)
    if len(groups) == 1:
        first = groups[0][1]
        return fn(input_ids[:, first:], attention_mask[:, first:])
    outputs, rows = [], []
    for index, first in groups:
        outputs.append(fn(input_ids[index, first:], attention_mask[index, first:]))
        rows.append(index)
    inverse = torch.empty(input_ids.shape[0], dtype=torch.long)
    inverse[torch.cat(rows)] = torch.arange(input_ids.shape[0])
    return torch.cat(outputs)[inverse]


def response_logits(model: torch.nn.Module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Logits that predict each response token: positions P-1 .. P+R-2 -> [B, R, V].

    ``logits_to_keep`` skips the LM head on prompt positions; left padding is skipped (``row_groups``).
    """
    def forward(ids, mask):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                    logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1, :]

    return _grouped(forward, input_ids, attention_mask, response_length + 1)


def token_values(value_model: torch.nn.Module, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """Per-token values V(s_t) from a sequence-classification model's backbone and head -> [B, R]."""
    backbone = getattr(value_model, value_model.base_model_prefix)

    def forward(ids, mask):
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                          use_cache=False).last_hidden_state
        hidden = hidden[:, -response_length - 1:-1, :]
        return value_model.score(hidden).squeeze(-1).float()

    return _grouped(forward, input_ids, attention_mask, response_length + 1)


def sequence_scores(reward_model: torch.nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """The reward model's score read at each row's last real token -> [B] (pitfall 3).

    The index comes from the attention mask, so it is right for left and right padding
    alike and never confuses a pad with an EOS.
    """
    backbone = getattr(reward_model, reward_model.base_model_prefix)

    def forward(ids, mask):
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                          use_cache=False).last_hidden_state
        width = mask.shape[1]
        last = width - 1 - mask.flip(-1).long().argmax(-1)
        picked = hidden[torch.arange(hidden.shape[0]), last]
        return reward_model.score(picked).squeeze(-1).float()

    return _grouped(forward, input_ids, attention_mask, 1)


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask everything after the first EOS: (ids with pad after EOS, mask [B, R], has_eos [B])."""
    mask = mask_after_eos(response_ids, eos_id)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    has_eos = (ids == eos_id).any(-1)
    return ids, mask.long(), has_eos

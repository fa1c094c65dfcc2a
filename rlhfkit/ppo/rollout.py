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

from rlhfkit.ppo.core import mask_after_eos

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
    score_std: torch.Tensor  # [B] disagreement of a reward-model ensemble (std of standardised scores; 0 for one)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) padded on the left, built on the CPU and moved to ``device`` once."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device="cpu")
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long, device="cpu")
            mask[i, width - len(seq):] = 1
    if device is None:
        return ids, mask
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; padding gets 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _exponential_noise(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The Exp(1) noise ``torch.empty_like(probs).exponential_(1, generator)`` draws, drawn ~3x faster.

    On CPU ``exponential_`` takes a 53-bit uniform u per element from the generator and
    returns -log1p(-u) computed in double (one element at a time); drawing the same uniforms
    with ``uniform_`` on a float64 tensor and applying a vectorised log1p gives the same
    numbers and leaves the generator in the same state (``_fast_multinomial_ok`` checks it).
    """
    uniform = torch.empty(probs.shape, dtype=torch.float64, device=probs.device).uniform_(generator=generator)
    return torch.log1p(uniform.neg_()).neg_().to(probs.dtype)


def _multinomial_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)[:, 0]`` for a [B, V] ``probs``.

    torch draws one sample per row as argmax(p / q) with q ~ Exp(1) (the exponential race);
    this is that computation without its validity scans of ``probs`` (``sample`` checks the
    log-probs for NaN/inf instead) and with the faster noise of ``_exponential_noise``.
    """
    return torch.argmax(probs / _exponential_noise(probs, generator), dim=-1)


_FAST_MULTINOMIAL_OK: bool | None = None


def _fast_multinomial_ok() -> bool:
    """Whether ``_multinomial_one`` reproduces ``torch.multinomial`` on the CPU (tokens and generator state); checked once.

    Only the CPU kernels are checked (and used): other devices' ``multinomial`` draws differently.
    """
    global _FAST_MULTINOMIAL_OK
    if _FAST_MULTINOMIAL_OK is None:
        ok = True
        data = torch.Generator("cpu").manual_seed(1234)
        for seed in range(4):
            logits = torch.randn((8, 997), generator=data, device="cpu") * 3
            logits[:, :5] = float("-inf")  # zero probabilities too
            probs = torch.log_softmax(logits / 0.7, -1).exp()
            reference, fast = torch.Generator("cpu").manual_seed(seed), torch.Generator("cpu").manual_seed(seed)
            expected = torch.multinomial(probs, 1, generator=reference)[:, 0]
            got = _multinomial_one(probs, fast)
            ok = ok and torch.equal(expected, got) and torch.equal(reference.get_state(), fast.get_state())
        _FAST_MULTINOMIAL_OK = ok
    return _FAST_MULTINOMIAL_OK


def _split_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [out, in] as two halves of its transpose, [2, in, out / 2] (one piece if out is odd)."""
    pieces = 2 if weight.shape[0] % 2 == 0 else 1
    return torch.stack(weight.t().chunk(pieces, dim=1)).contiguous()


def _split_linear(x: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for x [B, in] and ``pieces = _split_weight(weight)``, as one batched matmul.

    For a few rows a matmul is bound by reading the weight, and one ``F.linear`` reads it on
    one core; ``bmm`` over the two halves reads them on two (1.5-2x faster with 2 threads).
    """
    if pieces.shape[0] == 1:
        return x @ pieces[0]
    return torch.bmm(x.expand(pieces.shape[0], *x.shape), pieces).transpose(0, 1).reshape(x.shape[0], -1)


class _LlamaDecoder:
    """Hand-rolled one-token decode step of a plain ``LlamaForCausalLM`` over preallocated K/V buffers.

    The step follows ``LlamaModel.forward`` with the model's own embedding, norms, rotary
    embedding, activation and sdpa attention function; what it changes is the plumbing
    around them: no attention mask is rebuilt and no ``DynamicCache`` grows by ``torch.cat``
    (a copy of the whole cache per token and layer) at each step, and the projections run
    as batched matmuls over weights laid out once per ``sample`` call (q/k/v stacked,
    gate/up stacked, o/down/LM head split in halves: ``_split_linear``), so that the two
    threads each read part of the weights. The logits are those of the model's forward (bit
    for bit in our checks). The prefill (HF forward) skips the prompts' left padding
    (``row_groups``). Any other model or attention implementation takes the generic path.
    """

    def __init__(self, model, apply_rotary, attention):
        self.model, self.inner = model, model.model
        self.apply_rotary, self.attention = apply_rotary, attention
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.weights = []
        for layer in self.inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
            qkv = torch.stack([q.t(), k.t(), v.t()]).contiguous() if q.shape == k.shape == v.shape else None
            self.weights.append({
                "qkv": qkv,
                "q": None if qkv is not None else _split_weight(q),
                "kv": None if qkv is not None else torch.stack([k.t(), v.t()]).contiguous(),
                "o": _split_weight(attn.o_proj.weight),
                "gate_up": torch.stack([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()]).contiguous(),
                "down": _split_weight(mlp.down_proj.weight),
            })
        self.lm_head = _split_weight(model.lm_head.weight)

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
        linear = torch.nn.Linear
        for layer in model.model.layers:
            if type(layer) is not llama.LlamaDecoderLayer or type(layer.self_attn) is not llama.LlamaAttention \
                    or type(layer.mlp) is not llama.LlamaMLP:
                return None
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if type(proj) is not linear or proj.bias is not None:
                    return None
        if type(model.lm_head) is not linear or model.lm_head.bias is not None:
            return None
        return cls(model, llama.apply_rotary_pos_emb, ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None))

    def prefill(self, query_ids, query_mask, capacity: int) -> torch.Tensor:
        """Run the prompts (in padding-trimmed row groups), keep their K/V; return the last logits [B, V]."""
        batch, width = query_ids.shape
        groups = row_groups(query_mask, 1) or [(torch.arange(batch, device=query_ids.device), 0)]
        last_logits = None
        for rows, first in groups:
            mask = query_mask[rows, first:]
            cache = DynamicCache()
            out = self.model(input_ids=query_ids[rows, first:], attention_mask=mask, position_ids=position_ids(mask),
                             cache=cache, use_cache=True, logits_to_keep=1)
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
        hidden = inner.embed_tokens(token[:, None])  # [B, 1, D]
        cos, sin = inner.rotary_emb(hidden, position)
        batch = hidden.shape[0]
        for layer, weights, key_buffer, value_buffer in zip(inner.layers, self.weights, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)[:, 0]  # [B, D]
            if weights["qkv"] is not None:
                query, key, value = torch.bmm(x.expand(3, *x.shape), weights["qkv"])
            else:
                query = _split_linear(x, weights["q"])
                key, value = torch.bmm(x.expand(2, *x.shape), weights["kv"])
            shape = (batch, 1, -1, attn.head_dim)
            query, key = self.apply_rotary(query.view(shape).transpose(1, 2), key.view(shape).transpose(1, 2), cos, sin)
            key_buffer[:, :, length:length + 1] = key
            value_buffer[:, :, length:length + 1] = value.view(shape).transpose(1, 2)
            out, _ = self.attention(attn, query, key_buffer[:, :, :length + 1], value_buffer[:, :, :length + 1], mask,
                                    dropout=0.0, scaling=attn.scaling)
            hidden = hidden + _split_linear(out.reshape(batch, -1), weights["o"])[:, None]
            x = layer.post_attention_layernorm(hidden)[:, 0]
            gate, up = torch.bmm(x.expand(2, *x.shape), weights["gate_up"])
            hidden = hidden + _split_linear(layer.mlp.act_fn(gate) * up, weights["down"])[:, None]
        return _split_linear(inner.norm(hidden)[:, 0], self.lm_head)


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
    after the last token. Sampling draws exactly what ``torch.multinomial`` on
    exp(log-softmax(logits/T)) draws for the same generator state (``_multinomial_one``,
    self-checked against it once per process, else ``torch.multinomial`` itself).
    """
    batch, width = query_ids.shape
    device = query_ids.device
    capacity = width + max_new_tokens
    attention = torch.ones((batch, capacity), dtype=query_mask.dtype, device=device)
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
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    fast_multinomial = (not greedy and generator is not None and device.type == "cpu"
                        and generator.device.type == "cpu" and _fast_multinomial_ok())
    invalid = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        logits = logits.float()
        if greedy:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits / temperature, -1).gather(-1, token[:, None])[:, 0]
        else:
            log_probs = torch.log_softmax(logits / temperature, -1)
            if fast_multinomial:
                token = _multinomial_one(log_probs.exp(), generator)
            else:
                token = torch.multinomial(log_probs.exp(), 1, generator=generator)[:, 0]
            logp = log_probs.gather(-1, token[:, None])[:, 0]
            invalid |= ~torch.isfinite(logp)  # NaN/inf logits make every log-prob of their row NaN
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
                           position_ids=next_position, cache=cache, use_cache=True).logits[:, -1, :]
        next_position = next_position + 1
    if bool(invalid.any()):  # what torch.multinomial raises on such probabilities
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0 (non-finite policy logits)")
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
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return reward_model.score(picked).squeeze(-1).float()

    return _grouped(forward, input_ids, attention_mask, 1)


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask everything after the first EOS: (ids with pad after EOS, mask [B, R], has_eos [B])."""
    mask = mask_after_eos(response_ids, eos_id)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    has_eos = (ids == eos_id).any(-1)
    return ids, mask.long(), has_eos

"""The CPU fast path of sampling: used only where it is proven to give what the generic path gives.

Two pieces, each behind a check:

* ``multinomial_one`` draws what ``torch.multinomial(probs, 1)`` draws (same tokens, same
  generator state after) about 3x faster per draw; ``fast_multinomial_ok`` checks that once
  per process on the CPU kernels, else sampling calls ``torch.multinomial`` itself.
* ``LlamaDecoder`` is a one-token decode step of a plain ``LlamaForCausalLM`` (sdpa
  attention, no biases) over preallocated K/V buffers; ``LlamaDecoder.for_model`` returns
  None for any other model, which then takes the generic path (its ``forward`` with a
  ``DynamicCache``). Its logits are the model's forward's up to float32 summation order
  (the same products added in another order: log-probs ~1e-6 apart); tests check the same
  tokens, and log-probs within 1e-4, against the generic path and a full forward, on the
  micro model and on SmolLM2-135M.

Speed-up: measured by ``benchmarks/sampler.py`` (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from rlhfkit.engine.forward import position_ids, row_groups


def exponential_noise(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The Exp(1) noise ``torch.empty_like(probs).exponential_(1, generator)`` draws, drawn ~3x faster.

    On CPU ``exponential_`` takes a 53-bit uniform u per element from the generator and
    returns -log1p(-u) computed in double (one element at a time); drawing the same uniforms
    with ``uniform_`` on a float64 tensor and applying a vectorised log1p gives the same
    numbers and leaves the generator in the same state (``fast_multinomial_ok`` checks it).
    """
    uniform = torch.empty(probs.shape, dtype=torch.float64, device=probs.device).uniform_(generator=generator)
    return torch.log1p(uniform.neg_()).neg_().to(probs.dtype)


def multinomial_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)[:, 0]`` for a [B, V] ``probs``.

    torch draws one sample per row as argmax(p / q) with q ~ Exp(1) (the exponential race);
    this is that computation without its validity scans of ``probs`` (``sampling.sample`` checks
    the log-probs for NaN/inf instead) and with the faster noise of ``exponential_noise``.
    """
    return torch.argmax(probs / exponential_noise(probs, generator), dim=-1)


_FAST_MULTINOMIAL_OK: bool | None = None


def fast_multinomial_ok() -> bool:
    """Whether ``multinomial_one`` reproduces ``torch.multinomial`` on the CPU (tokens and generator state); checked once.

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
            got = multinomial_one(probs, fast)
            ok = ok and torch.equal(expected, got) and torch.equal(reference.get_state(), fast.get_state())
        _FAST_MULTINOMIAL_OK = ok
    return _FAST_MULTINOMIAL_OK


def split_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [out, in] as two halves of its transpose, [2, in, out / 2] (one piece if out is odd)."""
    pieces = 2 if weight.shape[0] % 2 == 0 else 1
    return torch.stack(weight.t().chunk(pieces, dim=1)).contiguous()


def split_linear(x: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for x [B, in] and ``pieces = split_weight(weight)``, as one batched matmul.

    For a few rows a matmul is bound by reading the weight, and one ``F.linear`` reads it on
    one core; ``bmm`` over the two halves reads them on two (1.5-2x faster with 2 threads).
    """
    if pieces.shape[0] == 1:
        return x @ pieces[0]
    return torch.bmm(x.expand(pieces.shape[0], *x.shape), pieces).transpose(0, 1).reshape(x.shape[0], -1)


class LlamaDecoder:
    """Hand-rolled one-token decode step of a plain ``LlamaForCausalLM`` over preallocated K/V buffers.

    The step follows ``LlamaModel.forward`` with the model's own embedding, norms, rotary
    embedding, activation and sdpa attention function; what it changes is the plumbing
    around them: no attention mask is rebuilt and no ``DynamicCache`` grows by ``torch.cat``
    (a copy of the whole cache per token and layer) at each step, and the projections run
    as batched matmuls over weights laid out once per ``sample`` call (q/k/v stacked,
    gate/up stacked, o/down/LM head split in halves: ``split_linear``), so that the two
    threads each read part of the weights. The logits are those of the model's forward up to
    float32 summation order. The prefill (HF forward) skips the prompts' left padding
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
                "q": None if qkv is not None else split_weight(q),
                "kv": None if qkv is not None else torch.stack([k.t(), v.t()]).contiguous(),
                "o": split_weight(attn.o_proj.weight),
                "gate_up": torch.stack([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()]).contiguous(),
                "down": split_weight(mlp.down_proj.weight),
            })
        self.lm_head = split_weight(model.lm_head.weight)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "LlamaDecoder | None":
        try:
            from transformers import DynamicCache
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
        from transformers import DynamicCache

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
                query = split_linear(x, weights["q"])
                key, value = torch.bmm(x.expand(2, *x.shape), weights["kv"])
            shape = (batch, 1, -1, attn.head_dim)
            query, key = self.apply_rotary(query.view(shape).transpose(1, 2), key.view(shape).transpose(1, 2), cos, sin)
            key_buffer[:, :, length:length + 1] = key
            value_buffer[:, :, length:length + 1] = value.view(shape).transpose(1, 2)
            out, _ = self.attention(attn, query, key_buffer[:, :, :length + 1], value_buffer[:, :, :length + 1], mask,
                                    dropout=0.0, scaling=attn.scaling)
            hidden = hidden + split_linear(out.reshape(batch, -1), weights["o"])[:, None]
            x = layer.post_attention_layernorm(hidden)[:, 0]
            gate, up = torch.bmm(x.expand(2, *x.shape), weights["gate_up"])
            hidden = hidden + split_linear(layer.mlp.act_fn(gate) * up, weights["down"])[:, None]
        return split_linear(inner.norm(hidden)[:, 0], self.lm_head)

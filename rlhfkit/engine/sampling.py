"""Sampling: prompts in, responses with their log-probs and masks out.

Prompts are chat-templated and left-padded to a common length P; responses are sampled
with a KV cache at temperature T and right-padded after their EOS to R tokens. The
log-probs are those of the sampled tokens at T (PPO's old log-probs). A plain Llama on
the CPU takes the fast path of ``rlhfkit.engine.fast_cpu``; every other model its own
``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jinja2
import torch

from rlhfkit.core import mask_after_eos
from rlhfkit.errors import ConfigError, first_line
from rlhfkit.engine.fast_cpu import LlamaDecoder, fast_multinomial_ok, multinomial_one
from rlhfkit.engine.forward import left_pad, model_device, position_ids


# The file a chat template was read from when it is not the tokenizer folder's own (a stage's
# chat_template_path), recorded on the tokenizer by ``rlhfkit.training.ensure_chat_template``.
TEMPLATE_SOURCE = "rlhfkit_chat_template_file"


def template_source(tokenizer) -> str:
    """Where ``tokenizer``'s chat template comes from, for error messages: the file it was read from."""
    named = getattr(tokenizer, TEMPLATE_SOURCE, None)
    if named:
        return str(named)
    folder = str(getattr(tokenizer, "name_or_path", "") or "")
    for name in ("chat_template.jinja", "tokenizer_config.json"):  # where transformers reads it from
        if folder and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return f"the chat template of {folder or 'the tokenizer'}"


def chat_template_error(where: str, e: Exception) -> ConfigError:
    """One line for a chat template that failed: its raise_exception, a syntax error, or an operation
    Jinja's sandbox refused (the sandbox holds; the template is the user's to fix)."""
    line = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
    if isinstance(e, jinja2.exceptions.SecurityError):
        return ConfigError(f"{where}: the chat template did something Jinja's sandbox forbids{line} ({first_line(e)}); "
                           "a chat template may only format the messages it is given")
    return ConfigError(f"{where}: the chat template failed{line} ({first_line(e)}); fix the template")


def apply_chat_template(tokenizer, messages: list[dict], **kwargs) -> Any:
    """``tokenizer.apply_chat_template``; a template that raises is one line naming its file, not a traceback."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateError as e:  # SecurityError (the sandbox) included
        raise chat_template_error(template_source(tokenizer), e) from None


# The conversations rlhfkit gives a chat template: a reply to train on or score, a prompt to answer.
SAMPLE_CONVERSATION = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


def check_chat_template(tokenizer, template: str | None = None, where: str | None = None) -> None:
    """``template`` (default: the tokenizer's own) rendered with ``tokenizer`` on a sample conversation, so
    that a template that fails on any conversation does so before a model loads: a ConfigError naming its
    file (``where``, default the tokenizer's). No template: nothing to check."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        return
    try:
        tokenizer.apply_chat_template(SAMPLE_CONVERSATION, chat_template=template, tokenize=False)
        tokenizer.apply_chat_template(SAMPLE_CONVERSATION[:1], chat_template=template, add_generation_prompt=True,
                                      tokenize=False)
    except jinja2.TemplateError as e:
        raise chat_template_error(where or template_source(tokenizer), e) from None


def as_messages(prompt: Any) -> list[dict]:
    """A prompt given as text becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_prompts(tokenizer, prompts: Sequence[Any], max_prompt_length: int) -> list[list[int]]:
    """Chat-template each prompt with the generation prompt; keep its last max_prompt_length tokens.

    Tokenizing through the template in one go avoids a second BOS (docs/pitfalls.md#2).
    """
    encoded = []
    for prompt in prompts:
        if tokenizer.chat_template:
            ids = apply_chat_template(tokenizer, as_messages(prompt), add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt if isinstance(prompt, str) else prompt[-1]["content"])["input_ids"]
        encoded.append(list(ids)[-max_prompt_length:])
    return encoded


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation ending with a reply, as the reward model reads it: the chat template, cut after
    the reply's EOS.

    Templates such as ChatML write a newline after each turn's EOS (``<|im_end|>\\n``); a response
    the policy samples ends at the EOS. Cut there, training and PPO read the score at the same token.
    """
    ids = list(apply_chat_template(tokenizer, messages, tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        ids = ids[:last + 1]
    return ids


def truncate_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask everything after the first EOS: (ids with pad after EOS, mask [B, R], has_eos [B])."""
    mask = mask_after_eos(response_ids, eos_id)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    has_eos = (ids == eos_id).any(-1)
    return ids, mask.long(), has_eos


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
    decode step over its own submodules and preallocated K/V buffers (``fast_cpu.LlamaDecoder``);
    other models go through their ``forward`` with a ``DynamicCache``. No forward is run
    after the last token. Sampling draws exactly what ``torch.multinomial`` on
    exp(log-softmax(logits/T)) draws for the same generator state (``fast_cpu.multinomial_one``,
    self-checked against it once per process, else ``torch.multinomial`` itself).
    """
    from transformers import DynamicCache  # imported here: the engine's import stays light

    batch, width = query_ids.shape
    device = query_ids.device
    capacity = width + max_new_tokens
    attention = torch.ones((batch, capacity), dtype=query_mask.dtype, device=device)
    attention[:, :width] = query_mask
    positions = position_ids(query_mask)
    decoder = LlamaDecoder.for_model(model)
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
                        and generator.device.type == "cpu" and fast_multinomial_ok())
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
                token = multinomial_one(log_probs.exp(), generator)
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


@dataclass
class Sequences:
    """``[query | response]`` rows of one batch. B = rows, P = query length, R = response length."""

    query_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    response_ids: torch.Tensor  # [B, R] sampled tokens, pad after EOS
    response_mask: torch.Tensor  # [B, R] 1 up to and including EOS (a prefix)
    logprobs: torch.Tensor  # [B, R] log pi(a_t | s_t) of the sampling policy at its temperature, 0 on padding

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


@dataclass
class Generation(Sequences):
    """Sampled responses to one batch of prompts, as ``generate`` returns them."""

    has_eos: torch.Tensor  # [B] bool: the response ended with EOS within R tokens
    texts: list[str]  # the responses decoded without special tokens


def generate(policy: torch.nn.Module, tokenizer, prompt_ids: Sequence[Sequence[int]], response_length: int,
             temperature: float, generator: torch.Generator | None, greedy: bool = False) -> Generation:
    """Left-pad ``prompt_ids`` (from ``encode_prompts``), sample, cut each response after its first EOS, decode."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    query_ids, query_mask = left_pad(prompt_ids, pad, device=model_device(policy))
    response_ids, logprobs = sample(policy, query_ids, query_mask, response_length, temperature, eos, pad,
                                    generator, greedy=greedy)
    response_ids, response_mask, has_eos = truncate_at_eos(response_ids, eos, pad)
    texts = tokenizer.batch_decode(response_ids.cpu(), skip_special_tokens=True)
    return Generation(query_ids, query_mask, response_ids, response_mask, logprobs * response_mask, has_eos, texts)

"""The embedded tokenizer and model: built locally, nothing downloaded.

A byte-level BPE tokenizer trained with ``tokenizers`` on a corpus, and an untrained
Llama causal LM sized ``tiny`` (~3 M parameters) or ``small`` (~20 M), saved as a normal
Hugging Face folder (safetensors) that ``AutoTokenizer`` / ``AutoModelForCausalLM`` load
offline. Designed against the pitfalls: pad is distinct from eos (docs/pitfalls.md#1); BOS comes
only from the chat template, never from ``add_special_tokens`` (docs/pitfalls.md#2); the
assistant's closing eos sits inside ``{% generation %}`` so it is a trained label.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from rlhfkit.artifacts import StageResult, atomic_dir, check_output_dir, locks_output
from rlhfkit.config import field
from rlhfkit.errors import ConfigError, DataError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_TOKENS.values()]

# One template for SFT, reward model and PPO. An assistant turn is
# <|assistant|>{content}<|eos|>, and the eos is inside the generation block so that
# assistant-only loss trains the model to stop; other turns end with <|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['user', 'system'] %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# name -> (hidden, layers, heads, intermediate); "micro" is for tests and smoke runs.
MODEL_SIZES = {"micro": (64, 2, 2, 128), "tiny": (192, 4, 4, 512), "small": (512, 6, 8, 1376)}
TEXT_KEYS = {"text", "content", "value", "instruction", "input", "output", "prompt", "completion", "chosen", "rejected"}


@dataclass
class ModelInitConfig:
    out: str = field(help="output folder: tokenizer + untrained model, Hugging Face format")
    corpus: str = field(help="JSONL (optionally .gz) to train the tokenizer on: data synth output or any export")
    vocab_size: int = field(4096, help="BPE vocabulary size asked for (a small corpus may give fewer merges)")
    size: str = field("tiny", help="model size: tiny (~3M parameters), small (~20M), or micro (tests)")
    seed: int = field(0, help="seed of the model's random initialisation")
    max_position_embeddings: int = field(512, help="longest sequence the model accepts")

    def validate(self) -> list[str]:
        problems = []
        if self.size not in MODEL_SIZES:
            problems.append(f"size: must be one of {', '.join(MODEL_SIZES)}, got {self.size!r}")
        if self.vocab_size < 300:
            problems.append(f"vocab_size: must be at least 300 (256 bytes + special tokens), got {self.vocab_size}")
        return problems


def iter_corpus_texts(path: str | os.PathLike) -> Iterator[str]:
    """Every text field in a JSONL file, recursively (trees nest replies)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield from _texts(record)


def _texts(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in TEXT_KEYS and isinstance(value, str):
                yield value
            else:
                yield from _texts(value)
    elif isinstance(node, list):
        for item in node:
            yield from _texts(item)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Byte-level BPE with distinct pad/bos/eos and the rlhfkit chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS.values()],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=512,
    )


def build_model(tokenizer, size: str = "tiny", seed: int = 0, max_position_embeddings: int = 512):
    """An untrained Llama causal LM whose special-token ids match the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, intermediate = MODEL_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@locks_output("out")
def init_model(config: ModelInitConfig, *, texts: Iterable[str] | None = None) -> StageResult:
    """Train the tokenizer on ``config.corpus`` (or ``texts``) and save tokenizer + model."""
    problems = config.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    check_output_dir(config.out, "model")  # a user's folder, or one inside a run or stage, is refused before any work
    corpus = list(texts) if texts is not None else list(iter_corpus_texts(config.corpus))
    if not corpus:
        raise DataError(f"{config.corpus}: no text found to train the tokenizer on")
    tokenizer = train_tokenizer(corpus, config.vocab_size)
    model = build_model(tokenizer, config.size, config.seed, config.max_position_embeddings)
    with atomic_dir(config.out, "model") as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    return StageResult(Path(config.out), {"vocab_size": len(tokenizer), "parameters": parameters, "size": config.size})

"""Import a GGUF checkpoint (llama.cpp's format) as a normal model folder every stage accepts.

transformers reads GGUF files itself (``from_pretrained(dir, gguf_file=...)``, needs the
``gguf`` package): it dequantises the weights to float32 and rebuilds the config and the
tokenizer, chat template included, from the file's metadata. What it keeps that would
break a normal folder is the ``quantization_config`` that points back at the GGUF file;
that is dropped. Everything else of the config (rope_theta, grouped-query attention, tied
embeddings, pad = eos) is saved as read. The folder holds safetensors, the tokenizer and
its chat template, and ``gguf_import.json`` (source file, its SHA-256, the check below).

The import checks itself: the saved folder is loaded back and must give the same logits
as the model read from the GGUF file, bit for bit, on a chat-formatted prompt.

    rlhfkit model import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from rlhfkit.artifacts import StageResult, atomic_dir, check_output_dir, output_lock, sha256_file, write_json_atomic
from rlhfkit.errors import ConfigError, RlhfkitError, first_line

GGUF_MAGIC = b"GGUF"


def _check_source(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{path}: not a GGUF file (it does not start with 'GGUF'); give a .gguf checkpoint")
    if importlib.util.find_spec("gguf") is None:  # transformers reads the file with it
        raise ConfigError("reading GGUF files needs the gguf package: pip install gguf")


def import_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike) -> StageResult:
    """Write ``out``: the GGUF checkpoint as float32 safetensors + tokenizer + chat template.

    Returns the folder and its metrics (parameters, architecture, rope_theta, seconds).
    """
    source = Path(gguf_file)
    _check_source(source)
    with output_lock(out):  # one writer per folder, as for every stage
        return _import(source, Path(out))


def _import(source: Path, out: Path) -> StageResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_output_dir(out, "model")  # before minutes of work: a user's folder, or one inside a run, is refused now
    start = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{source}: transformers cannot read this GGUF file ({first_line(e)})") from None
    config = model.config
    # The weights are plain float32 tensors now; what still points at the GGUF file goes.
    model.hf_quantizer = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the hub checkpoints of these models do; masks tell pads apart
        config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    probe = _probe_ids(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    with atomic_dir(out, "model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        with torch.no_grad():
            got = reloaded(input_ids=probe).logits
        if not torch.equal(expected, got):  # pragma: no cover - a transformers regression
            diff = (expected - got).abs().max().item()
            raise RlhfkitError(f"{out}: the saved folder's logits differ from the GGUF model's (max |diff| {diff:.3g}); "
                               "nothing was written")
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
        metrics = {
            "stage": "gguf_import",
            "source": str(source.resolve()),
            "source_sha256": sha256_file(source),
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rope_theta": rope,
            "chat_template": bool(tokenizer.chat_template),
            "check": f"logits of the saved folder equal the GGUF model's on {probe.shape[1]} tokens",
            "seconds": round(time.time() - start, 1),
        }
        write_json_atomic(tmp / "gguf_import.json", metrics)
    return StageResult(out, metrics)


def _probe_ids(tokenizer):
    """A short chat prompt as [1, T] ids, encoded as PPO encodes its prompts."""
    import torch

    from rlhfkit.engine.sampling import encode_prompts

    [ids] = encode_prompts(tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], 10**9)
    return torch.tensor([ids], dtype=torch.long)

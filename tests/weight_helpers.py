"""Shared helper of the tests that compare two runs' weight files (1 process against 2, data
parallel against FSDP, killed-and-resumed against straight)."""

from __future__ import annotations

from pathlib import Path

import torch


def same_weights(a_dir: Path, b_dir: Path, name: str, atol: float = 1e-5) -> dict[str, torch.Tensor]:
    """File ``name`` of two runs holds the same tensors under the same names, equal to ``atol``
    (the float32 rounding the caller's comparison allows); returns a's."""
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
    assert sorted(a) == sorted(b), name  # ordinary files: the same tensors under the same names
    for key in a:
        assert a[key].shape == b[key].shape, (name, key)
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=f"{name} {key}")
    return a

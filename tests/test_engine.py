"""Sampling internals of the rollout engine that the trainer tests only see through their results."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.engine import fast_cpu, sampling


def test_fast_multinomial_draws_what_torch_multinomial_draws():
    """Same tokens and the same generator state afterwards, so a run's samples (and a resumed
    run's) do not depend on which of the two drew them."""
    assert fast_cpu.fast_multinomial_ok()
    data = torch.Generator().manual_seed(7)
    for seed in range(20):
        logits = torch.randn((16, 4096), generator=data) * 4
        logits[:3, 100:] = float("-inf")  # rows with few candidates
        probs = torch.log_softmax(logits / 0.7, -1).exp()
        reference, fast = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(probs, 1, generator=reference)[:, 0]
        assert torch.equal(fast_cpu.multinomial_one(probs, fast), expected)
        assert torch.equal(fast.get_state(), reference.get_state())


class _NanLogits(torch.nn.Module):
    """A policy whose logits are NaN: sampling must fail as torch.multinomial fails."""

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.full((*input_ids.shape, 11), float("nan")))


def test_sampling_non_finite_logits_raises():
    ids, mask = sampling.left_pad([[1, 2, 3], [4]], 0)
    with pytest.raises(RuntimeError, match="probability tensor"):
        sampling.sample(_NanLogits(), ids, mask, 1, 0.7, eos_id=5, pad_id=0, generator=torch.Generator().manual_seed(0))


def test_the_sampler_benchmark_runs_and_finds_the_fast_path_equal():
    """benchmarks/sampler.py on the micro model: every way (generic, fast decode step, fast
    multinomial, both) gives the same tokens, and the fast path is taken."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "sampler.py"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "micro", "--batch", "6", "--response-length", "5",
                           "--repeats", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("machine: ")
    [row] = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert row["fast_path_taken"] and row["same_tokens_and_logprobs"] and row["rows_with_other_tokens"] == 0
    assert set(row["median_s"]) == {"generic", "fast_decoder", "fast_multinomial", "both (rlhfkit)"}

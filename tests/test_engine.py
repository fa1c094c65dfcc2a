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


# --- sharding helpers (the 2-process FSDP run is in test_ppo_trainer.py) ---------------------
def _tied_micro_model(seed: int):
    from rlhfkit.world.model import build_model, train_tokenizer

    tokenizer = train_tokenizer(["one two three four five six seven eight nine ten"] * 20, 300)
    return build_model(tokenizer, "micro", seed=seed)


def test_full_state_writes_a_tied_weight_once_as_save_model_does(tmp_path):
    from safetensors.torch import load_file, save_model

    from rlhfkit.engine.sharding import full_state, load_full_state, tied_names

    model = _tied_micro_model(seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tied_names(model)["lm_head.weight"] == ["lm_head.weight", "model.embed_tokens.weight"]
    save_model(model, str(tmp_path / "w.safetensors"))
    written = load_file(str(tmp_path / "w.safetensors"))
    full = full_state(model)
    assert sorted(full) == sorted(written)  # the same names: a checkpoint is the same file under FSDP
    for key, value in written.items():
        assert torch.equal(full[key], value)
    every = full_state(model, all_names=True)  # as save_pretrained takes them: each name, one tensor
    assert set(every) == set(model.state_dict()) and every["model.embed_tokens.weight"] is every["lm_head.weight"]

    other = _tied_micro_model(seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    load_full_state(other, full)  # the tied weight filled from the one name the file holds
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    assert other.lm_head.weight is other.model.embed_tokens.weight
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_full_state(other, {k: v for k, v in full.items() if k != "lm_head.weight"})


def test_fsdp_is_what_the_launcher_asks_for(monkeypatch):
    from rlhfkit.engine.sharding import every_process_loads, fsdp_requested
    from rlhfkit.errors import ConfigError

    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.delenv(key, raising=False)
    assert not fsdp_requested("MULTI_CPU")
    assert fsdp_requested("FSDP")  # accelerate's own type (GPUs)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --use_fsdp` on the CPU: MULTI_CPU
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested("MULTI_CPU")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="--fsdp_version 2"):
        fsdp_requested("MULTI_CPU")
    # loading inside reads the weights on every process; the launcher's setting comes back after
    import os

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with every_process_loads():
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"

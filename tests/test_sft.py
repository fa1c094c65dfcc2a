"""SFT stage: real Open Assistant sample, assistant-only labels token by token, resume
equivalence after a kill, half-written checkpoints, gradient accumulation, NaN stop,
LoRA merge, packing, config errors via the API and the CLI.

Also holds the small helpers test_reward.py imports (``write_stage_data``, configs).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError, DataError

import trl  # noqa: F401,E402  (a dependency: missing it must fail, not skip)

# -- helpers shared with test_reward.py -----------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: these micro models gain little from two, and on a machine shared
    with other jobs two spinning threads run several times slower (results are identical)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def oasst_rows(path: Path, val_every: int = 5) -> tuple[dict, dict]:
    """The data contract's sft and pairs rows from an Open Assistant tree export.

    Every ``val_every``-th tree goes to validation. SFT: one row per assistant message,
    ``messages`` = the path from the root to it. Pairs: every two ranked sibling replies.
    """
    sft: dict[str, list] = {"train": [], "validation": []}
    pairs: dict[str, list] = {"train": [], "validation": []}
    trees = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, tree in enumerate(trees):
        split = "validation" if i % val_every == 0 else "train"
        tree_id = tree["message_tree_id"]

        def walk(node: dict, path: list) -> None:
            role = "user" if node["role"] == "prompter" else "assistant"
            messages = path + [{"role": role, "content": node["text"]}]
            if role == "assistant":
                sft[split].append({"messages": messages, "tree_id": tree_id, "message_id": node["message_id"]})
            else:
                ranked = sorted((r for r in node.get("replies", []) if r.get("rank") is not None), key=lambda r: r["rank"])
                for better, worse in itertools.combinations(ranked, 2):
                    pairs[split].append({
                        "prompt": messages,
                        "chosen": [{"role": "assistant", "content": better["text"]}],
                        "rejected": [{"role": "assistant", "content": worse["text"]}],
                        "tree_id": tree_id,
                        "chosen_rank": better["rank"],
                        "rejected_rank": worse["rank"],
                    })
            for reply in node.get("replies", []):
                walk(reply, messages)

        walk(tree["prompt"], [])
    return sft, pairs


def write_stage_data(sft: dict, pairs: dict, out: Path) -> Path:
    """A `data build`-style folder: out/sft and out/pairs, DatasetDicts saved to disk."""
    from datasets import Dataset, DatasetDict

    DatasetDict({k: Dataset.from_list(v) for k, v in sft.items()}).save_to_disk(str(out / "sft"))
    DatasetDict({k: Dataset.from_list(v) for k, v in pairs.items()}).save_to_disk(str(out / "pairs"))
    return out


def shortest(rows: list, n: int, key) -> list:
    return sorted(rows, key=key)[:n]


@pytest.fixture(scope="session")
def oasst_data(oasst_sample, tmp_path_factory) -> Path:
    """The real sample as a data folder, trimmed to short rows so that steps are fast."""
    sft, pairs = oasst_rows(oasst_sample)
    msg_len = lambda r: sum(len(m["content"]) for m in r["messages"])  # noqa: E731
    pair_len = lambda r: sum(len(m["content"]) for m in r["prompt"] + r["chosen"] + r["rejected"])  # noqa: E731
    sft = {"train": shortest(sft["train"], 96, msg_len), "validation": shortest(sft["validation"], 24, msg_len)}
    pairs = {"train": shortest(pairs["train"], 48, pair_len), "validation": shortest(pairs["validation"], 24, pair_len)}
    return write_stage_data(sft, pairs, tmp_path_factory.mktemp("oasst_data"))


@pytest.fixture(scope="session")
def micro_model_dir(oasst_sample, tmp_path_factory) -> Path:
    """`model init` on the sample: a BPE tokenizer trained on its texts and a micro Llama."""
    from rlhfkit.world.model import ModelInitConfig, init_model

    out = tmp_path_factory.mktemp("micro") / "model"
    init_model(ModelInitConfig(out=str(out), corpus=str(oasst_sample), vocab_size=1024, size="micro", seed=0))
    return out


def sft_config(out: Path, model: Path, data: Path | None = None, **overrides):
    from rlhfkit.sft import SFTStageConfig

    base = {
        "output_dir": str(out),
        "model": str(model),
        "data": str(data) if data else "",
        "learning_rate": 3e-3,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 24,
        "max_length": 128,
        "logging_steps": 1,
        "save_steps": 2,
        "disable_tqdm": True,
    }
    base.update(overrides)
    return load_config(SFTStageConfig, base)


def step_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "log_history.json").read_text())
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


class SimulatedKill(Exception):
    """Raised from a callback right after a checkpoint is complete: the process 'dies'."""


def kill_after_checkpoint(step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise SimulatedKill(f"killed after checkpoint-{step}")

    return Kill()


def make_half_written_checkpoint(checkpoints: Path, step: int, source: Path) -> Path:
    """A checkpoint folder as a kill during save leaves it: weights, no trainer_state.json."""
    half = checkpoints / f"checkpoint-{step}"
    half.mkdir()
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (source / name).is_file():
            (half / name).write_bytes((source / name).read_bytes()[:1000])
    return half


# -- tests ----------------------------------------------------------------------------------


def test_sft_on_real_sample(oasst_data, micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.artifacts import resolve_model_path
    from rlhfkit.sft import train_sft

    out = tmp_path / "sft"
    result = train_sft(sft_config(out, micro_model_dir, oasst_data, max_steps=8, per_device_train_batch_size=8,
                                  eval_on_start=True))
    m = result.metrics
    for key in ("train_loss", "train_loss_first", "eval_loss", "eval_loss_start", "train_tokens_per_s", "wall_time_s"):
        assert m[key] is not None and math.isfinite(m[key]), key
    assert m["train_loss"] < m["train_loss_first"] and m["eval_loss"] < m["eval_loss_start"]  # held-out loss fell
    assert m["steps"] == 8 and m["examples"] == 96 and m["train_tokens"] > 0
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["eval_loss"] == pytest.approx(m["eval_loss"])
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    # the final folder is a plain HF model + tokenizer that loads offline, also via the stage folder
    assert resolve_model_path(out) == str(out / "model")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(out))
    tok = AutoTokenizer.from_pretrained(resolve_model_path(out))
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert not list((out / "model").glob("adapter_*"))
    # re-running the same config finds the completed run instead of training again
    again = train_sft(sft_config(out, micro_model_dir, oasst_data, max_steps=8, per_device_train_batch_size=8,
                                 eval_on_start=True))
    assert again.metrics == on_disk


def test_labels_are_exactly_the_reply_and_its_eos(oasst_data, micro_model_dir, tmp_path):
    """Pitfalls 1 and 2, token by token, on the examples the trainer will really see."""
    import torch

    from rlhfkit.sft import build_sft_trainer

    prepared = build_sft_trainer(sft_config(tmp_path / "sft", micro_model_dir, oasst_data, max_length=512))
    tok, trainer = prepared.tokenizer, prepared.trainer
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    rows = trainer.train_dataset
    assert len(rows) == len(prepared.train_dataset)  # nothing truncated away at 512
    for row, source in zip(rows, prepared.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # one BOS (docs/pitfalls.md#2)
        assert tok.pad_token_id not in ids
        start = len(ids) - ids[::-1].index(assistant_id)  # first token after the last <|assistant|>
        trained = [i for i, label in enumerate(labels) if label != -100]
        assert trained == list(range(start, len(ids)))  # exactly the reply + eos, nothing before
        assert [labels[i] for i in trained] == ids[start:]
        assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # eos is a label (docs/pitfalls.md#1)
        reply = source["completion"][0]["content"]
        assert tok.decode(ids[start:-1]) == reply
    # padding in a batch keeps the eos label and masks only the padding
    batch = trainer.data_collator([rows[0], rows[1]])
    lengths = [len(rows[0]["input_ids"]), len(rows[1]["input_ids"])]
    for b, n in enumerate(lengths):
        assert batch["labels"][b, n - 1].item() == tok.eos_token_id
        assert torch.all(batch["labels"][b, n:] == -100) and torch.all(batch["input_ids"][b, n:] == tok.pad_token_id)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_kill_equals_straight_run(oasst_data, micro_model_dir, tmp_path, lora):
    """Pitfalls 9 and 10: N steps straight == k steps, kill, half-written checkpoint, resume
    (for LoRA too: the adapters are restored, not re-initialised)."""
    import torch

    from rlhfkit.sft import train_sft

    extra = {"eval_strategy": "no", "lora": lora, "lora_r": 4}
    straight = train_sft(sft_config(tmp_path / "a", micro_model_dir, oasst_data, **extra))
    out = tmp_path / "b"
    with pytest.raises(SimulatedKill):
        train_sft(sft_config(out, micro_model_dir, oasst_data, **extra), callbacks=[kill_after_checkpoint(4)])
    assert not (out / "metrics.json").exists() and not (out / "model").exists()
    half = make_half_written_checkpoint(out / "checkpoints", 6, out / "checkpoints" / "checkpoint-4")
    resumed = train_sft(sft_config(out, micro_model_dir, oasst_data, **extra))
    assert resumed.metrics["resumed_from"].endswith("checkpoint-4")
    assert resumed.metrics["steps"] == 6 and resumed.metrics["steps_this_run"] == 2
    assert (half / "trainer_state.json").is_file()  # rewritten complete by the resumed run
    a, b = step_losses(tmp_path / "a"), step_losses(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    wa, wb = weights(tmp_path / "a" / "model"), weights(out / "model")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)
    assert straight.metrics["train_loss"] == pytest.approx(resumed.metrics["train_loss"], rel=1e-5)


def test_half_written_checkpoints_are_never_chosen(tmp_path):
    from rlhfkit.training import find_resume_checkpoint

    import torch
    from safetensors.torch import save_file

    def checkpoint(step: int, state: str | None = "ok", weights: bool = True, optimizer: bool = True,
                   cut: str | None = None) -> Path:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if weights:
            save_file({"w": torch.ones(64, 64)}, str(d / "model.safetensors"))
        if optimizer:
            torch.save({"state": {0: {"exp_avg": torch.ones(64, 64)}}}, d / "optimizer.pt")
        if cut is not None:  # a full disk cut this file short: present, non-empty, and damaged
            (d / cut).write_bytes((d / cut).read_bytes()[: (d / cut).stat().st_size // 2])
        if state == "ok":
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        elif state is not None:
            (d / "trainer_state.json").write_text(state)
        return d

    assert find_resume_checkpoint(tmp_path / "absent") is None
    early_broken = checkpoint(1, state=None)
    good = checkpoint(2)
    later = [checkpoint(4, state=None), checkpoint(6, optimizer=False), checkpoint(8, weights=False),
             checkpoint(10, state='{"global_st'), checkpoint(12, state=json.dumps({"global_step": 3})),
             checkpoint(14, cut="model.safetensors"), checkpoint(16, cut="optimizer.pt")]
    (tmp_path / "checkpoint-x").mkdir()
    assert find_resume_checkpoint(tmp_path) == good
    assert all(p.exists() for p in later)  # only reading: nothing removed
    assert find_resume_checkpoint(tmp_path, remove_incomplete=True) == good
    assert not any(p.exists() for p in later)  # later half-written folders would be written into: gone
    assert early_broken.exists() and good.exists()


def test_gradient_accumulation_does_not_change_the_update(oasst_data, micro_model_dir, tmp_path):
    """Pitfall 8: batch 8 x GA 1 and batch 2 x GA 4 give the same loss and the same update.

    The step is plain SGD, so the update is -lr x gradient: what accumulation must keep
    invariant. (Adam's first step, lr x g / (|g| + eps), turns a gradient entry near eps into
    a coin flip of float32 rounding: one weight of 65,536 differed by 7e-6 on some CPUs.)
    The two groupings sum the same per-token terms in another order, so the gradients agree
    to float32 accumulation error, ~1e-6 relative; a wrong loss scaling (e.g. no division by
    the accumulation steps) would be off by a factor of 4.
    """
    import torch
    from datasets import load_from_disk

    from rlhfkit.sft import train_sft

    train = load_from_disk(str(oasst_data / "sft"))["train"]
    start = weights(micro_model_dir)
    runs, updates = {}, {}
    for name, (batch, ga) in {"8x1": (8, 1), "2x4": (2, 4)}.items():
        cfg = sft_config(tmp_path / name, micro_model_dir, max_steps=1, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=ga, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                         weight_decay=0.0)
        runs[name] = train_sft(cfg, train_dataset=train).metrics
        after = weights(tmp_path / name / "model")
        updates[name] = {k: after[k] - start[k] for k in after}
    assert runs["8x1"]["train_loss"] == pytest.approx(runs["2x4"]["train_loss"], rel=1e-5)
    scale = max(u.abs().max().item() for u in updates["8x1"].values())
    assert scale > 1e-3  # the step did move the weights
    for name, update in updates["8x1"].items():
        torch.testing.assert_close(updates["2x4"][name], update, rtol=1e-3, atol=1e-5 * scale)


def test_packed_batches_keep_documents_apart(oasst_data, micro_model_dir, tmp_path):
    """packing=true (padding-free on CPU attention): same token-mean loss as a padded batch."""
    from datasets import load_from_disk

    from rlhfkit.sft import build_sft_trainer

    train = load_from_disk(str(oasst_data / "sft"))["train"].select(range(4))
    losses = {}
    for packing in (False, True):
        prepared = build_sft_trainer(
            # packed: one row of all four documents (positions restart per document); padded: each within the
            # model's 512 positions, untruncated
            sft_config(tmp_path / f"p{packing}", micro_model_dir, packing=packing, max_length=2048 if packing else 512),
            train_dataset=train,
        )
        trainer = prepared.trainer
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]))
        trainer.model.eval()
        losses[packing] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_packing_run(oasst_data, micro_model_dir, tmp_path):
    from rlhfkit.sft import train_sft

    m = train_sft(sft_config(tmp_path / "packed", micro_model_dir, oasst_data, packing=True, max_steps=2,
                             max_length=256, save_steps=10)).metrics
    assert m["packing"] is True and math.isfinite(m["train_loss"]) and m["train_sequences"] < m["examples"]


def test_lora_is_merged_into_a_plain_model(oasst_data, micro_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.sft import train_sft

    out = tmp_path / "lora"
    m = train_sft(sft_config(out, micro_model_dir, oasst_data, lora=True, lora_r=4, max_steps=2, save_steps=1,
                             eval_strategy="no")).metrics
    assert m["lora"] is True and math.isfinite(m["train_loss"])
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not list((out / "model").glob("adapter_*"))
    merged, base = weights(out / "model"), weights(micro_model_dir)
    assert set(merged) == set(base)  # no lora_A / lora_B / base_layer keys
    assert any(not (merged[k] == base[k]).all() for k in merged if "q_proj" in k)  # adapters were merged in
    AutoModelForCausalLM.from_pretrained(str(out / "model"))


def test_nan_loss_stops_with_one_line(oasst_data, micro_model_dir, tmp_path):
    """Pitfall 12: a NaN loss is not averaged away; the stage stops with one line."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.sft import train_sft
    from rlhfkit.errors import TrainingError

    model = AutoModelForCausalLM.from_pretrained(str(micro_model_dir))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    tok = AutoTokenizer.from_pretrained(str(micro_model_dir))
    train = load_from_disk(str(oasst_data / "sft"))["train"].select(range(8))
    out = tmp_path / "nan"
    with pytest.raises(TrainingError) as e:
        train_sft(sft_config(out, micro_model_dir, max_steps=3), model=model, tokenizer=tok, train_dataset=train)
    assert "nan" in str(e.value) and "\n" not in str(e.value)
    assert not (out / "metrics.json").exists() and not (out / "model").exists()


def test_config_errors_api(oasst_data, micro_model_dir, tmp_path):
    from rlhfkit.sft import SFTStageConfig, train_sft

    with pytest.raises(ConfigError, match="unknown key 'learnin_rate' \\(did you mean 'learning_rate'\\?\\)"):
        sft_config(tmp_path, micro_model_dir, oasst_data, learnin_rate=1e-3)
    with pytest.raises(ConfigError, match="learning_rate: expected a number"):
        sft_config(tmp_path, micro_model_dir, oasst_data, learning_rate="fast")
    with pytest.raises(ConfigError, match="lora_r: expected an integer"):
        sft_config(tmp_path, micro_model_dir, oasst_data, lora_r="big")
    # inconsistent values, all reported at once, before any model loads
    with pytest.raises(ConfigError) as e:
        sft_config(tmp_path, micro_model_dir, oasst_data, lora=True, lora_r=0, save_total_limit=0, max_steps=0)
    assert all(k in str(e.value) for k in ("lora_r", "save_total_limit", "max_steps"))
    with pytest.raises(ConfigError, match="lora_dropout"):  # configs built in Python are validated too
        train_sft(SFTStageConfig(output_dir=str(tmp_path / "x"), model=str(micro_model_dir), data=str(oasst_data),
                                 lora=True, lora_dropout=1.5))
    with pytest.raises(DataError, match="data folder not found"):
        train_sft(sft_config(tmp_path / "x", micro_model_dir, tmp_path / "no-data"))
    with pytest.raises(ConfigError, match="no-model"):
        train_sft(sft_config(tmp_path / "x", tmp_path / "no-model", oasst_data))
    with pytest.raises(ConfigError, match="model is required"):
        train_sft(sft_config(tmp_path / "x", "", oasst_data))
    with pytest.raises(ConfigError, match="eval_strategy"):  # TRL's own validation, as one line
        train_sft(sft_config(tmp_path / "x", micro_model_dir, oasst_data, eval_strategy="sometimes"))


def test_data_errors(micro_model_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    from rlhfkit.sft import train_sft

    data = tmp_path / "data"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(data / "sft"))
    with pytest.raises(DataError, match="split 'validation' missing"):
        train_sft(sft_config(tmp_path / "x", micro_model_dir, data))
    bad = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="last message must be an assistant reply"):
        train_sft(sft_config(tmp_path / "y", micro_model_dir), train_dataset=Dataset.from_list(bad))


def test_cli_errors_are_one_line(oasst_data, micro_model_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {micro_model_dir}\ndata: {oasst_data}\nlearnin_rate: 0.001\n")
    assert main(["sft", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'learning_rate'" in err
    config.write_text(f"model: {micro_model_dir}\ndata: {tmp_path / 'nowhere'}\n")
    assert main(["sft", str(config), "num_train_epochs=two", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_train_epochs: expected a number" in err
    assert main(["sft", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data folder not found" in err


def test_a_launch_without_a_process_group_is_refused(oasst_data, micro_model_dir, tmp_path, monkeypatch):
    """N processes that each train alone would write the same output_dir: refused up front."""
    from rlhfkit.sft import train_sft

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched as 2 processes .* ACCELERATE_USE_CPU=true"):
        train_sft(sft_config(tmp_path / "x", micro_model_dir, oasst_data))
    assert not (tmp_path / "x").exists()

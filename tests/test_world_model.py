"""The embedded tokenizer and model: round trip, chat template, docs/pitfalls.md#1 and #2, offline load."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.world import ModelInitConfig, SynthConfig, init_model, synth_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    synth_data(SynthConfig(out=str(root / "world.jsonl"), trees=300, seed=0))
    result = init_model(ModelInitConfig(out=str(root / "model"), corpus=str(root / "world.jsonl"), size="micro"))
    return result.output_dir


def test_folder_loads_offline_with_safetensors(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".bin") for n in names)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_tokenizer_round_trip_and_distinct_specials(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    for text in ["reverse: apple banana cherry", "Sorry, I can't help with that.", "Umlaute: äöü ß 😀", "  spaced  "]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3  # docs/pitfalls.md#1: pad != eos
    assert tok("hello")["input_ids"][0] != tok.bos_token_id  # BOS comes only from the template


def test_chat_template_assistant_mask_covers_exactly_assistant_tokens(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    conversation = [
        {"role": "user", "content": "reverse: apple banana"},
        {"role": "assistant", "content": "banana apple"},
        {"role": "user", "content": "Now in uppercase."},
        {"role": "assistant", "content": "BANANA APPLE"},
    ]
    out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # docs/pitfalls.md#2
    masked = [i for i, m in zip(ids, mask) if m]
    expected = (tok("banana apple")["input_ids"] + [tok.eos_token_id]
                + tok("BANANA APPLE")["input_ids"] + [tok.eos_token_id])
    assert masked == expected  # the eos closing each assistant turn is a trained label (docs/pitfalls.md#1)
    prompt = tok.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]  # prompt + reply = conversation


def test_model_sizes(tmp_path, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.decode(list(range(260, 300)))] * 5
    tiny = init_model(ModelInitConfig(out=str(tmp_path / "t"), corpus="unused", size="tiny"), texts=texts)
    assert 1.0e6 < tiny.metrics["parameters"] < 4.0e6
    model = AutoModelForCausalLM.from_pretrained(tiny.output_dir)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_bad_config_and_missing_corpus(tmp_path, capsys):
    with pytest.raises(ConfigError, match="size: must be one of"):
        init_model(ModelInitConfig(out=str(tmp_path / "m"), corpus="x", size="huge"))
    assert main(["model", "init", "--out", str(tmp_path / "m"), "--corpus", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "none.jsonl: corpus file not found" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    assert main(["model", "init", "--out", str(tmp_path / "m"), "--corpus", str(bad)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

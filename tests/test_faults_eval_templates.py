"""A careless user's inputs, evaluation and chat templates.

- Held-out data with one prompt (or none): every figure is still written; a standard error of
  fewer than two samples, a mean over nothing, a reward without a reward model are null in the
  JSON and "–" in the report and the summary text, never NaN.
- A chat template that calls raise_exception, or tries to leave Jinja's sandbox: one line at the
  CLI naming the template file, exit 2, no traceback; checked before any folder is written when
  the template is a stage's chat_template_path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError

RAISES = "{{ raise_exception('no system prompts, please') }}"
ESCAPES = "{{ ''.__class__.__mro__[1].__subclasses__() }}"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strict_json(path: Path):
    """The file's JSON; NaN or Infinity fail the test (they are not JSON)."""
    def refuse(constant):
        pytest.fail(f"{path}: {constant} in the JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two synthetic trees, one of them held out (one distinct held-out prompt), and micro models:
    reference, policy, reward model (seconds to build)."""
    from transformers import LlamaForSequenceClassification

    from rlhfkit.data import DataBuildConfig, build_data, prompts_from_data_dir
    from rlhfkit.world import SynthConfig, synth_data
    from rlhfkit.world.model import build_model, train_tokenizer

    root = tmp_path_factory.mktemp("small")
    synth_data(SynthConfig(out=str(root / "trees.jsonl"), trees=2, seed=0))
    build_data(DataBuildConfig(sources=[str(root / "trees.jsonl")], out=str(root / "data"), val_fraction=0.5, seed=2))
    assert len(prompts_from_data_dir(root / "data", "validation")) == 1
    tok = train_tokenizer((root / "trees.jsonl").read_text().splitlines(), 400)
    for name, seed in (("sft", 0), ("ppo", 1)):
        build_model(tok, "micro", seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    base = build_model(tok, "micro", seed=2)
    torch.manual_seed(2)
    rm = LlamaForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1}))
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def eval_config(small: Path, out: Path, **changes):
    from rlhfkit.evaluate import EvalStageConfig

    base = dict(policy=str(small / "ppo"), reference=str(small / "sft"), reward_model=str(small / "rm"),
                data=str(small / "data"), output_dir=str(out), samples_per_prompt=2, response_length=4, batch_size=4)
    return EvalStageConfig(**{**base, **changes})


# -- statistics of fewer than two samples -----------------------------------------------------------


def test_mean_and_standard_error_are_undefined_below_two_samples():
    from rlhfkit.evaluate import mean_se

    assert mean_se([]) == (None, None)
    assert mean_se([2.5]) == (2.5, None)  # one sample: a mean, no spread
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)  # sd sqrt(2), / sqrt(2)
    assert mean_se([1.0, float("nan")]) == (None, None)  # an unscored sample: no figure
    assert mean_se([1.0, float("inf")]) == (None, None)


def test_win_rate_and_paired_gain_over_one_prompt_and_over_none():
    from rlhfkit.evaluate import _paired_gain, _win_rate

    assert _win_rate([[1.0, 0.0]], [[0.0, 0.0]]) == (0.75, None)  # a win and a tie on one prompt
    assert _win_rate([], []) == (None, None)
    assert _win_rate([[float("nan")]], [[0.0]]) == (None, None)  # no reward model: no winner
    assert _paired_gain([[1.0, 2.0]], [[0.5, 0.5]]) == (1.0, None)
    assert _paired_gain([], []) == (None, None)


def test_verdict_reads_undefined_standard_errors_as_a_dash():
    from rlhfkit.evaluate import verdict

    text = verdict({"ppo": {"kl": 0.5}, "reward_gain": 0.25, "reward_gain_se": None, "gold_gain": 0.125,
                    "gold_gain_se": None, "greedy_gold_gain": -0.5, "greedy_gold_gain_se": None})
    # no standard error: no gain can be called significant
    assert text == ("No significant change in the true score (gold gain sampled +0.125 ± –, greedy -0.500 ± –; "
                    "KL 0.50 nats).")
    text = verdict({"ppo": {"kl": None}, "reward_gain": None, "reward_gain_se": None, "gold_gain": None,
                    "gold_gain_se": None})
    assert text.startswith("No gold judge: the reward-model score changed by – ± – at KL – nats")


def test_report_shows_a_dash_for_an_undefined_standard_error(tmp_path):
    from rlhfkit.report import best_budget_sentence, summary_text, write_report
    from rlhfkit.summary import collect

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    ev = {"prompts": 1, "samples_per_prompt": 2, "temperature": 1.0,
          "sft": {"reward": 0.5, "reward_se": None, "gold": 0.25, "gold_se": None, "length": 3.0, "length_se": None},
          "ppo": {"reward": 0.75, "reward_se": None, "gold": 0.375, "gold_se": None, "length": 4.0, "length_se": None,
                  "kl": 0.25, "kl_se": None},
          "reward_gain": 0.25, "reward_gain_se": None, "gold_gain": 0.125, "gold_gain_se": None,
          "win_rate_gold": 0.5, "win_rate_gold_se": None, "win_rate_reward": 1.0, "win_rate_reward_se": None}
    (run / "eval" / "eval.json").write_text(json.dumps(ev))
    (run / "eval" / "examples.json").write_text(json.dumps([{
        "prompt": "p", "sft": "a", "sft_reward": None, "sft_gold": 0.25, "ppo": "b", "ppo_reward": None,
        "ppo_gold": 0.5}]))
    summary = collect({"sft": {"eval_loss": 1.5}}, ev)
    write_report(run, summary)
    page = (run / "report.html").read_text()
    assert "<td>0.5 ± –</td>" in page and "<td>0.375 ± –</td>" in page and "<td>0.25 ± –</td>" in page
    assert "Gold gain, sampled (PPO − SFT, paired)<b>0.125 ± –</b>" in page
    assert "reward – · gold 0.25" in page and "nan" not in page.lower()
    assert "| PPO | 0.75 ± – | 0.375 ± – | 4 ± – | 0.25 ± – |" in (run / "report.md").read_text()
    text = summary_text(run, summary)
    assert "0.125 ± –" in text and "0.375 ± –" in text and "nan" not in text.lower()
    # a figure without a standard error at all is shown alone, as before
    assert "SFT eval loss" in text and "1.5\n" in text
    # the KL-budget sentence of a curve whose points have no standard error
    point = {"update": 2, "kl": 0.5, "sqrt_kl": math.sqrt(0.5), "gold": 0.5, "gold_se": None, "reward": None}
    assert best_budget_sentence({"ppo": [point], "best": point}) == (
        "Gold peaked at update 2 (KL 0.50 nats, sqrt(KL) 0.71): gold 0.500 ± –, proxy –. "
        "At the end (update 2, KL 0.50): gold 0.500 ± –, proxy –.")


# -- the evaluation, end to end, on one held-out prompt -----------------------------------------------


def test_evaluation_of_one_held_out_prompt_writes_every_figure(small, tmp_path):
    """Data of two trees, one held out: every stage trained, then eval.json failed on NaN."""
    from rlhfkit.evaluate import evaluate_stage
    from rlhfkit.report import summary_text, write_report
    from rlhfkit.summary import collect

    out = tmp_path / "run" / "eval"
    result = evaluate_stage(eval_config(small, out, best_of_n=[1, 2]))
    ev = strict_json(out / "eval.json")
    assert ev == json.loads(json.dumps(result.metrics)) and ev["prompts"] == 1
    for name in ("sft", "ppo"):
        assert isinstance(ev[name]["reward"], float) and isinstance(ev[name]["gold"], float)
        assert ev[name]["reward_se"] is None and ev[name]["gold_se"] is None and ev[name]["length_se"] is None
        assert isinstance(ev[name]["greedy"]["reward"], float) and ev[name]["greedy"]["reward_se"] is None
    assert isinstance(ev["ppo"]["kl"], float) and ev["ppo"]["kl_se"] is None
    assert 0 <= ev["win_rate_reward"] <= 1 and ev["win_rate_reward_se"] is None
    assert ev["reward_gain"] == pytest.approx(ev["ppo"]["reward"] - ev["sft"]["reward"])
    assert ev["reward_gain_se"] is None
    assert ev["gold_gain_se"] is None and ev["greedy_reward_gain_se"] is None
    assert "± –" in ev["verdict"] and "nan" not in ev["verdict"]
    curve = strict_json(out / "curve.json")
    assert [p["n"] for p in curve["best_of_n"]] == [1, 2] and all(p["gold_se"] is None for p in curve["best_of_n"])
    assert curve["best"]["gold"] is not None
    assert len(strict_json(out / "scatter.json")) == 2 * 2  # one prompt, two samples, two policies
    # the report and the summary text of that run
    run = out.parent
    summary = collect({}, ev)
    write_report(run, summary)
    page = (run / "report.html").read_text()
    assert f"<td>{ev['ppo']['gold']:.4g} ± –</td>" in page and "nan" not in page.lower()
    assert "KL budget" in page  # the curve's sentence, with its undefined standard errors
    assert f"{ev['ppo']['gold']:.4g} ± –" in summary_text(run, summary)


def test_evaluation_without_a_reward_model_writes_null_rewards(small, tmp_path):
    """``reward_model: null`` is allowed: the reward figures are null, the gold ones are measured."""
    from rlhfkit.evaluate import evaluate_stage

    out = tmp_path / "ev"
    evaluate_stage(eval_config(small, out, reward_model=None, greedy=False))
    ev = strict_json(out / "eval.json")
    assert ev["sft"]["reward"] is None and ev["ppo"]["reward"] is None
    assert ev["win_rate_reward"] is None and ev["reward_gain"] is None
    assert isinstance(ev["sft"]["gold"], float) and 0 <= ev["win_rate_gold"] <= 1
    examples = strict_json(out / "examples.json")
    assert examples[0]["sft_reward"] is None and isinstance(examples[0]["sft_gold"], float)
    assert strict_json(out / "scatter.json") == []  # reward against gold: nothing to plot without a reward


def test_evaluate_over_no_prompts_gives_null_figures(small):
    """``rlhfkit.evaluate.evaluate`` called from Python with an empty prompt list (the stage refuses one)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.artifacts import load_tokenizer
    from rlhfkit.evaluate import EvalConfig, evaluate

    tok = load_tokenizer(small / "sft")
    policy = AutoModelForCausalLM.from_pretrained(small / "sft")
    rm = AutoModelForSequenceClassification.from_pretrained(small / "rm", num_labels=1)
    gold = lambda prompt, response: 1.0  # noqa: E731
    metrics, examples = evaluate(policy, policy, rm, tok, [], EvalConfig(samples_per_prompt=2), 1.0, 4, gold)
    assert metrics["prompts"] == 0 and examples == [] and metrics["scatter"] == []
    assert metrics["sft"]["reward"] is None and metrics["ppo"]["kl"] is None and metrics["win_rate_gold"] is None
    json.dumps(metrics, allow_nan=False)  # writable as eval.json
    assert "nan" not in metrics["verdict"]


# -- chat templates -------------------------------------------------------------------------------


def write_template(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, says", [
    (RAISES, "no system prompts, please"),
    (ESCAPES, "sandbox"),
])
def test_a_broken_chat_template_path_is_one_line_before_any_folder_is_written(small, tmp_path, capsys, text, says):
    template = write_template(tmp_path, "chat.jinja", text)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {small / 'sft'}\ndata: {small / 'data'}\nchat_template_path: {template}\n"
                      "assistant_only_loss: false\nmax_steps: 1\n")
    assert main(["sft", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhfkit: error: ") and err.count("\n") == 1, err
    assert str(template) in err and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_chain_checks_the_sft_template_before_any_stage(tmp_path, capsys):
    template = write_template(tmp_path, "chat.jinja", ESCAPES)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nsft:\n  chat_template_path: {template}\n"
                      "ppo:\n  num_updates: 1\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sft.chat_template_path: {template}" in err and "sandbox" in err
    assert not (tmp_path / "run").exists()


def test_a_models_own_broken_template_is_one_line_naming_its_file(small, tmp_path, capsys):
    """A template that came with the model folder (not a stage's chat_template_path): the evaluation
    names the file; the sandbox holds."""
    import shutil

    ref = tmp_path / "sft"
    shutil.copytree(small / "sft", ref)
    write_template(ref, "chat_template.jinja", ESCAPES)
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({"policy": str(small / "ppo"), "reference": str(ref), "data": str(small / "data"),
                                  "reward_model": None, "response_length": 4}))
    assert main(["eval", str(config), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ref / "chat_template.jinja") in err and "sandbox" in err, err
    assert "Traceback" not in err and not (tmp_path / "ev").exists()


def test_a_template_failing_on_some_conversations_names_its_file(small, tmp_path):
    """A template that passes a plain exchange but raises on one conversation (here a system turn),
    where rlhfkit applies templates itself: prompts (PPO, evaluation) and reward-model pairs."""
    import shutil

    from rlhfkit.artifacts import load_tokenizer
    from rlhfkit.engine.sampling import conversation_ids, encode_prompts

    folder = tmp_path / "tok"
    shutil.copytree(small / "sft", folder)
    write_template(folder, "chat_template.jinja", (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system turns are not supported') }}"
        "{% endif %}{{ m['content'] + eos_token }}{% endfor %}"))
    tok = load_tokenizer(folder)
    user = {"role": "user", "content": "hi"}
    assert len(encode_prompts(tok, [[user]], 100)[0]) > 0
    system = [{"role": "system", "content": "be brief"}, user]
    expected = f"{folder / 'chat_template.jinja'}: the chat template failed \\(system turns are not supported\\)"
    with pytest.raises(ConfigError, match=expected):
        encode_prompts(tok, [system], 100)
    with pytest.raises(ConfigError, match=expected):
        conversation_ids(tok, system + [{"role": "assistant", "content": "ok"}])


def test_the_training_stages_check_the_template_they_will_use(small, tmp_path):
    """``ensure_chat_template`` (SFT, reward, DPO, before the model loads): the model folder's own
    template is rendered once; a chat_template_path the reward stage applies is the file later
    errors name."""
    import shutil
    from types import SimpleNamespace

    from rlhfkit.artifacts import load_tokenizer
    from rlhfkit.engine.sampling import conversation_ids
    from rlhfkit.training import ensure_chat_template

    folder = tmp_path / "model"
    shutil.copytree(small / "sft", folder)
    write_template(folder, "chat_template.jinja", RAISES)
    with pytest.raises(ConfigError, match=f"^{folder / 'chat_template.jinja'}: the chat template failed "
                                          r"\(no system prompts, please\); fix the template$"):
        ensure_chat_template("sft", load_tokenizer(folder), SimpleNamespace(chat_template_path=None), str(folder))
    path = write_template(tmp_path, "picky.jinja", (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system turns are not supported') }}"
        "{% endif %}{{ m['content'] + eos_token }}{% endfor %}"))
    args = SimpleNamespace(chat_template_path=str(path))
    _, tok = ensure_chat_template("reward", load_tokenizer(folder), args, str(folder), apply=True)
    assert args.chat_template_path is None and tok.chat_template == path.read_text()
    with pytest.raises(ConfigError, match=f"^{path}: the chat template failed"):
        conversation_ids(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


def test_a_template_reading_a_token_only_the_tokenizer_has_is_checked_with_that_tokenizer(small, tmp_path):
    """At validation no tokenizer is loaded: a variable only a tokenizer gives (the shipped encoder
    template's sep_token) passes there, and the stage renders the file with its own tokenizer."""
    from types import SimpleNamespace

    from rlhfkit.artifacts import load_tokenizer
    from rlhfkit.training import chat_template_path_problems, ensure_chat_template

    repo = Path(__file__).resolve().parents[1]
    for shipped in sorted((repo / "configs" / "templates").glob("*.jinja")):
        assert chat_template_path_problems(str(shipped)) == [], shipped
    path = write_template(tmp_path, "odd.jinja", "{% for m in messages %}{{ m['content'] + odd_token }}{% endfor %}")
    assert chat_template_path_problems(str(path)) == []
    assert chat_template_path_problems(str(tmp_path / "missing.jinja"))[0].startswith(
        f"chat_template_path: {tmp_path / 'missing.jinja'}: cannot read the template")
    with pytest.raises(ConfigError, match=f"^{path}: the chat template failed \\('odd_token' is undefined\\)"):
        ensure_chat_template("sft", load_tokenizer(small / "sft"), SimpleNamespace(chat_template_path=str(path)), "m")

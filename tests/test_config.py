"""Typed configs: YAML + overrides, every error at once in one line, nothing coerced."""

from dataclasses import dataclass

import pytest

from rlhfkit.artifacts import atomic_dir, resolve_model_path, sweep_stale_temps
from rlhfkit.config import Passthrough, describe, field, load_config, parse_overrides
from rlhfkit.errors import ConfigError


@dataclass
class Inner:
    rate: float = field(0.1, help="a rate")


@dataclass
class Toy(Passthrough):
    passthrough_name = "trl.SFTConfig"

    @classmethod
    def passthrough_class(cls):
        from trl import SFTConfig

        return SFTConfig

    model: str = field(help="required")
    epochs: int = field(1, help="an int")
    lora: bool = field(False, help="a bool")
    langs: list[str] | None = field(None, help="a list")
    inner: Inner = field(default_factory=Inner, help="a section")
    trl_args: dict = field(default_factory=dict, help="TRL fields")

    def validate(self):
        return ["epochs must be >= 1"] if self.epochs < 1 else []


def test_yaml_overrides_and_passthrough(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nepochs: 2\ninner:\n  rate: 0.5\nlearning_rate: 1e-4\n")
    cfg = load_config(Toy, path, ["inner.rate=0.25", "lora=true", "langs=en,de", "num_train_epochs=3"])
    assert (cfg.model, cfg.epochs, cfg.lora, cfg.langs, cfg.inner.rate) == ("m", 2, True, ["en", "de"], 0.25)
    # YAML 1.1 reads "1e-4" as a string; a float field takes it as the number it is.
    assert cfg.trl_args == {"learning_rate": 1e-4, "num_train_epochs": 3.0}


def test_every_error_reported_at_once_with_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, {"epochs": "two", "lora": "yes", "learnig_rate": 1, "inner": {"rat": 1}})
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("epochs: expected an integer, got 'two'", "lora: expected true or false",
                 "unknown key 'learnig_rate' (did you mean 'learning_rate'?)", "unknown key 'inner.rat'",
                 "missing required key 'model'"):
        assert part in msg


def test_validate_runs_and_nothing_is_coerced():
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        load_config(Toy, {"model": "m", "epochs": 0})
    with pytest.raises(ConfigError, match="expected an integer, got 1.5"):
        load_config(Toy, {"model": "m", "epochs": 1.5})
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides(["epochs"])


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Toy, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(Toy, bad)


def test_describe_lists_fields_and_passthrough():
    text = describe(Toy)
    assert "model (str (required)): required" in text and "any field of trl.SFTConfig" in text


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == [".rlhfkit", "b.txt"]  # the owner file, and only the new content
    (tmp_path / ".tmp-out-deadbeef").mkdir()
    sweep_stale_temps(tmp_path, "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_resolve_model_path(tmp_path):
    (tmp_path / "stage" / "model").mkdir(parents=True)
    (tmp_path / "stage" / "model" / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path / "stage") == str(tmp_path / "stage" / "model")
    assert resolve_model_path("org/name") == "org/name"


def test_yaml_scalars_are_what_users_mean(tmp_path):
    """YAML 1.1 would read `no`/`off` as False (eval_strategy: no) and 1e-3 as text."""
    from rlhfkit.config import parse_value, read_yaml

    assert parse_value("no") == "no" and parse_value("off") == "off" and parse_value("yes") == "yes"
    assert parse_value("true") is True and parse_value("False") is False and parse_value("null") is None
    assert parse_value("1e-3") == 0.001 and parse_value("-2E5") == -200000.0 and parse_value("3") == 3
    assert parse_value("[en,de]") == ["en", "de"] and parse_value("a: b: c") == "a: b: c"
    path = tmp_path / "c.yaml"
    path.write_text("eval_strategy: no\nlearning_rate: 5e-5\nbf16: true\n")
    assert read_yaml(path) == {"eval_strategy": "no", "learning_rate": 5e-5, "bf16": True}


def test_cli_flags_come_from_the_stage_configs():
    """`data build`, `data synth` and `model init` declare no default of their own: a flag left out
    keeps the dataclass's default, every field has a flag, and each flag sets its field."""
    import dataclasses

    from rlhfkit.cli import _given, make_parser
    from rlhfkit.data import DataBuildConfig
    from rlhfkit.world import ModelInitConfig, SynthConfig

    parser = make_parser()
    bare = {("data", "build"): (["data", "build", "x.jsonl", "--out", "o"], DataBuildConfig),
            ("data", "synth"): (["data", "synth", "--out", "t.jsonl"], SynthConfig),
            ("model", "init"): (["model", "init", "--out", "m", "--corpus", "c.jsonl"], ModelInitConfig)}
    for argv, cls in bare.values():
        given = _given(parser.parse_args(argv), cls)
        config = cls(**given)
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        assert set(given) == required  # nothing else given: the rest are the dataclass's defaults
        assert config == cls(**{k: getattr(config, k) for k in required})
    args = parser.parse_args(["data", "build", "a.jsonl", "b.jsonl", "--out", "o", "--lang", "en,de", "--val-fraction",
                              "0.2", "--seed", "3", "--top-k", "2", "--no-synthetic", "--drop-orphans", "--format",
                              "oasst-trees"])
    assert DataBuildConfig(**_given(args, DataBuildConfig)) == DataBuildConfig(
        sources=["a.jsonl", "b.jsonl"], out="o", lang=["en", "de"], val_fraction=0.2, seed=3, top_k=2,
        include_synthetic=False, drop_orphans=True, format="oasst-trees")
    for command, cls in (("data synth", SynthConfig), ("model init", ModelInitConfig), ("data build", DataBuildConfig)):
        sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
        action = sub._subparsers._group_actions[0].choices[command.split()[1]]
        dests = {a.dest for a in action._actions}
        assert {f.name for f in dataclasses.fields(cls)} <= dests, command

"""The ``rlhfkit`` command: a thin layer over the stage functions.

Each subcommand builds the stage's typed config and calls the same function a Python
script would call. A user mistake (RlhfkitError) or a fault of the machine (a full disk, a
missing permission) becomes one line on stderr and exit 2; anything else is a bug of ours
and says so, with its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import sys
import traceback
from typing import Any, Callable

from rlhfkit.artifacts import launch_main
from rlhfkit.errors import ConfigError, RlhfkitError

# Stages configured by a YAML file plus KEY=VALUE overrides: name -> (module, config class, function).
CONFIG_STAGES: dict[str, tuple[str, str, str, str]] = {
    "sft": ("rlhfkit.sft", "SFTStageConfig", "train_sft", "supervised fine-tuning on assistant turns (TRL SFTTrainer)"),
    "reward": ("rlhfkit.reward", "RewardStageConfig", "train_reward", "Bradley-Terry reward model (TRL RewardTrainer)"),
    "ppo": ("rlhfkit.ppo", "PPOStageConfig", "train_ppo",
            "RL of the SFT policy against the reward model: PPO, RLOO or GRPO (algorithm)"),
    "dpo": ("rlhfkit.dpo", "DPOStageConfig", "train_dpo", "DPO of the SFT policy on the preference pairs (TRL DPOTrainer)"),
    "eval": ("rlhfkit.evaluate", "EvalStageConfig", "evaluate_stage",
             "held-out evaluation of a policy against a reference (sampled, greedy, KL, reward, gold)"),
    "run": ("rlhfkit.pipeline", "RunConfig", "run_chain", "the whole chain: data -> model -> SFT -> reward -> PPO -> eval -> report"),
}


def _load(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config fields given on the command line (flags left out keep the dataclass's default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _field_flag(parser: argparse.ArgumentParser, cls: type, name: str, *flags: str, **kwargs: Any) -> None:
    """A flag for the config field ``name`` of ``cls``: its help and default come from the dataclass only."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
    lead = f"{name} = false: " if kwargs.get("action") == "store_false" else ""
    parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=lead + f.metadata.get("help", "") + default,
                        **kwargs)


def _data_build(args: argparse.Namespace) -> None:
    from rlhfkit.data import DataBuildConfig, build_data

    result = build_data(DataBuildConfig(**_given(args, DataBuildConfig)))
    s = result.metrics
    print(
        f"wrote {result.output_dir}: {s['trees']} trees, {s['messages']} messages, "
        f"{s['sft_examples']} SFT examples, {s['pairs']} pairs"
    )


def _data_synth(args: argparse.Namespace) -> None:
    from rlhfkit.world import SynthConfig, synth_data

    result = synth_data(SynthConfig(**_given(args, SynthConfig)))
    s = result.metrics
    print(f"wrote {result.output_dir}: {s['trees']} trees, {s['messages']} messages, {s['pairs']} ranked pairs")


def _model_init(args: argparse.Namespace) -> None:
    from rlhfkit.world import ModelInitConfig, init_model

    result = init_model(ModelInitConfig(**_given(args, ModelInitConfig)))
    m = result.metrics
    print(f"wrote {result.output_dir}: vocab {m['vocab_size']}, {m['parameters'] / 1e6:.2f} M parameters")


def _model_import(args: argparse.Namespace) -> None:
    from rlhfkit.gguf import import_gguf

    result = import_gguf(args.gguf_file, args.out)
    m = result.metrics
    print(f"wrote {result.output_dir}: {m['architecture']}, {m['parameters'] / 1e6:.1f} M parameters (float32 safetensors), "
          f"rope_theta {m['rope_theta']}, chat template {'kept' if m['chat_template'] else 'absent'}; {m['check']}")


def _sweep(args: argparse.Namespace) -> None:
    from rlhfkit.sweep import parse_grid, run_sweep

    result = run_sweep(args.config, parse_grid(args.grid), args.out, seeds=args.seeds, overrides=args.overrides)
    if launch_main():
        print(f"sweep: {len(result.rows)} runs done, results in {result.output_dir / 'results.csv'}")


def _config_stage(name: str) -> Callable[[argparse.Namespace], None]:
    module, cls_name, fn_name, _ = CONFIG_STAGES[name]

    def run(args: argparse.Namespace) -> None:
        from rlhfkit.config import load_config

        cls = _load(module, cls_name)
        extra: dict[str, Any] = {}
        if getattr(args, "out", None):
            given = [o.strip() for o in args.overrides if o.partition("=")[0].strip() == "output_dir"]
            if given:  # else --out would replace output_dir=... without a word
                raise ConfigError(f"output_dir given twice on the command line ({given[0]}, --out {args.out}); give it once")
            extra["output_dir"] = args.out
        config = load_config(cls, args.config, args.overrides, **extra)
        result = _load(module, fn_name)(config)
        if launch_main():  # under `accelerate launch`, once
            print(f"{name}: done, artifacts in {result.output_dir}")

    return run


class _DescribeConfig(argparse.Action):
    """``--help`` for config stages lists every config field with its help text."""

    def __init__(self, option_strings, dest, stage: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.stage = stage

    def __call__(self, parser, namespace, values, option_string=None):
        from rlhfkit.config import describe

        module, cls_name, _, _ = CONFIG_STAGES[self.stage]
        parser.print_help()
        cls = _load(module, cls_name)
        print(f"\nconfig keys ({cls_name}):")
        print(describe(cls))
        notes = getattr(cls, "help_notes", None)
        if callable(notes):
            print("\n" + notes())
        parser.exit()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit", description="SFT -> reward model -> PPO, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="build training data; synthesise the embedded world")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    from rlhfkit.data import DataBuildConfig
    from rlhfkit.world import ModelInitConfig, SynthConfig

    build = data_sub.add_parser("build", help="Open Assistant / TRL data -> SFT conversations and preference pairs")
    _field_flag(build, DataBuildConfig, "sources", nargs="+", metavar="SOURCE")
    _field_flag(build, DataBuildConfig, "out", "--out", required=True)
    _field_flag(build, DataBuildConfig, "lang", "--lang", type=_csv, metavar="LANG,...")
    _field_flag(build, DataBuildConfig, "val_fraction", "--val-fraction", type=float)
    _field_flag(build, DataBuildConfig, "seed", "--seed", type=int)
    _field_flag(build, DataBuildConfig, "top_k", "--top-k", type=int)
    _field_flag(build, DataBuildConfig, "include_synthetic", "--no-synthetic", action="store_false")
    _field_flag(build, DataBuildConfig, "drop_orphans", "--drop-orphans", action="store_true")
    _field_flag(build, DataBuildConfig, "format", "--format")
    build.set_defaults(func=_data_build)

    synth = data_sub.add_parser("synth", help="write the embedded world's synthetic conversation trees")
    _field_flag(synth, SynthConfig, "out", "--out", required=True)
    _field_flag(synth, SynthConfig, "trees", "--trees", type=int)
    _field_flag(synth, SynthConfig, "seed", "--seed", type=int)
    _field_flag(synth, SynthConfig, "annotator_noise", "--annotator-noise", type=float)
    _field_flag(synth, SynthConfig, "lang_mix", "--lang-mix")
    synth.set_defaults(func=_data_synth)

    model = sub.add_parser("model", help="create the embedded tokenizer and model; import a GGUF checkpoint")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    init = model_sub.add_parser("init", help="train a byte-level BPE tokenizer and create an untrained Llama model")
    _field_flag(init, ModelInitConfig, "out", "--out", required=True)
    _field_flag(init, ModelInitConfig, "corpus", "--corpus", required=True)
    _field_flag(init, ModelInitConfig, "vocab_size", "--vocab-size", type=int)
    _field_flag(init, ModelInitConfig, "size", "--size", choices=["micro", "tiny", "small"])
    _field_flag(init, ModelInitConfig, "seed", "--seed", type=int)
    _field_flag(init, ModelInitConfig, "max_position_embeddings", "--max-position-embeddings", type=int)
    init.set_defaults(func=_model_init)
    imp = model_sub.add_parser("import", help="a GGUF checkpoint (llama.cpp) -> a model folder every stage accepts",
                               description="Dequantises a GGUF checkpoint to float32 and writes a Hugging Face folder: "
                                           "safetensors, tokenizer, chat template, config as read (rope_theta, "
                                           "grouped-query attention, tied embeddings). Needs the gguf package.")
    imp.add_argument("gguf_file", metavar="FILE.gguf")
    imp.add_argument("--out", required=True, help="output folder (appears only when complete)")
    imp.set_defaults(func=_model_import)

    for name, (_, _, _, help_text) in CONFIG_STAGES.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("-h", "--help", action=_DescribeConfig, stage=name, help="show this help and every config key")
        p.add_argument("config", metavar="CONFIG.yaml", help="YAML config of the stage")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (dotted for sections)")
        p.add_argument("--out", help="output folder (overrides output_dir)")
        p.set_defaults(func=_config_stage(name))
    sweep = sub.add_parser("sweep", help="the chain over a grid of config values; identical stages run once",
                           description="Runs `rlhfkit run CONFIG.yaml` for every combination of the --grid values "
                                       "(times --seeds), sharing every stage whose config and inputs are identical. "
                                       "Writes SWEEP_DIR/results.csv (a row per run), SWEEP_DIR/report.html and "
                                       "SWEEP_DIR/runs/NAME/ (one run folder each). Re-run to resume.")
    sweep.add_argument("config", metavar="CONFIG.yaml", help="run config (as for rlhfkit run)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys for every run")
    sweep.add_argument("--out", required=True, metavar="SWEEP_DIR", help="sweep folder")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="values of one config key (dotted); repeat for a cross product; brackets keep commas: "
                            "data.lang=[en],[en,de]. Adds to (and per key replaces) the config's own sweep.grid")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point: seed, seed+1, ... (default 1)")
    sweep.set_defaults(func=_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    given = [a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
    twice = sorted({f for f in given if given.count(f) > 1} - {"--grid"})  # --grid is given once per key
    if twice:  # argparse keeps the last without a word
        print(f"rlhfkit: error: {twice[0]} given twice on the command line; give it once", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow options such as --out
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
        _end_process_group()
    except RlhfkitError as e:
        print(f"rlhfkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhfkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last resort: a fault of the machine, else a bug of ours
        line = machine_fault(e)
        if line is None:
            traceback.print_exc()
            print("rlhfkit: internal error: this is a bug in rlhfkit; please report it with the traceback above",
                  file=sys.stderr)
            return 1
        print(f"rlhfkit: error: {line}", file=sys.stderr)
        return 2
    return 0


def _end_process_group() -> None:
    """Under a multi-process launch, close the process group before exit: left to the interpreter's
    shutdown, gloo's threads sometimes abort the process after its work is done (seen with FSDP:
    "terminate called without an active exception"; pytorch/pytorch PR 179291 explains it)."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has none
    if dist is not None and dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # models in reference cycles still hold gloo work objects: free them while gloo is up
        dist.destroy_process_group()


# A full disk, a missing permission, a read-only file system: the machine's faults, not bugs.
# Every write is atomic and every stage resumes, so the same command continues once fixed.
_FAULTS = {errno.ENOSPC: "the disk is full: free some space", errno.EDQUOT: "the disk quota is exhausted: free some space",
           errno.EACCES: "permission denied: choose a folder you can write", errno.EPERM: "operation not permitted: "
           "choose a folder you can write", errno.EROFS: "the file system is read-only: choose another output folder"}


def machine_fault(e: BaseException) -> str | None:
    """One line for an OS fault anywhere in the chain of causes (libraries re-raise them), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FAULTS:
            where = f"{e.filename}: " if e.filename else ""
            return f"{where}{_FAULTS[e.errno]}, then run the same command again (it resumes; nothing written is lost)"
        if "No space left on device" in str(e) or "StorageFull" in str(e):  # safetensors' Rust errors
            return f"the disk is full ({str(e).splitlines()[0][:200]}): free some space, then run the same command again"
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

"""The chained run: world -> data -> model -> SFT -> reward -> PPO -> eval -> report.

Each stage's output feeds the next. ``RUN_DIR/manifest.json`` records per stage its
status, the hash of its config and inputs, times and metrics; a re-run skips stages that
are done and unchanged, reruns a changed stage and everything after it, and resumes an
interrupted stage from its last checkpoint (the stages checkpoint themselves).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhfkit.artifacts import (RUN, StageResult, claim_dir, damage, file_digests, hub_problem, locks_output,
                               missing_model_folder, not_a_model_folder, read_json, remove_ours, sha256_file,
                               write_json_atomic)
from rlhfkit.config import collect_errors, field, section_of
from rlhfkit.errors import ConfigError
from rlhfkit.processes import Processes
from rlhfkit.evaluate import EvalConfig, EvalStageConfig, evaluate_stage
from rlhfkit.summary import collect

STAGES = ("world", "data", "model", "sft", "reward", "ppo", "eval")
RESULT_FILES = ("summary.json", "report.md", "report.html")  # the run's results, written after the last stage


def stage_inputs(dpo_aligns: bool) -> dict[str, tuple[str, ...]]:
    """Each stage's inputs: its hash covers theirs, and when one runs, every stage after it in this
    graph is out of date. The evaluation reads the reference (sft), the reward model and the data too."""
    return {"world": (), "data": ("world",), "model": ("world",), "sft": ("data", "model"),
            "reward": ("sft", "data"), "ppo": ("sft", "data") if dpo_aligns else ("sft", "reward", "data"),
            "eval": ("ppo", "sft", "reward", "data")}


def downstream(inputs: dict[str, tuple[str, ...]], name: str) -> list[str]:
    """The stages that read ``name``'s output, directly or through others, in chain order."""
    after: set[str] = set()
    for stage in STAGES:  # chain order: a stage's inputs come before it
        if name in inputs[stage] or after & set(inputs[stage]):
            after.add(stage)
    return [s for s in STAGES if s in after]
# Keys the chain fills in for each training stage; a section must not set them, except reward.model:
# another backbone for the reward model (e.g. an encoder with its own tokenizer) instead of the SFT model.
WIRED_KEYS = ("model", "data", "output_dir", "reward_model")


# The chain's world, data and model sections are their stages' configs minus what the chain fills in
# (output paths, the run's seed, the data's sources): one declaration and one default per field.


def _validate_world(self) -> list[str]:
    from rlhfkit.world import SynthConfig

    return SynthConfig(out="<chain>", **dataclasses.asdict(self)).validate()


def _validate_data(self) -> list[str]:
    from rlhfkit.data import DataBuildConfig

    fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}
    return DataBuildConfig(sources=self.source or ["<world>"], out="<chain>", **fields).validate()


def _validate_model(self) -> list[str]:
    from rlhfkit.world import ModelInitConfig

    if self.name is not None:
        if not self.name.strip():
            return ["name: empty; give a hub id or a folder, or null for the embedded model"]
        missing = missing_model_folder(self.name) or not_a_model_folder(self.name)
        return [f"name: {missing}"] if missing else []
    fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
    return ModelInitConfig(out="<chain>", corpus="<world>", **fields).validate()


def _sections():
    from rlhfkit.data import DataBuildConfig
    from rlhfkit.world import ModelInitConfig, SynthConfig

    world = section_of("WorldSection", SynthConfig, ("out", "seed"),
                       namespace={"validate": _validate_world, "__module__": __name__})
    data = section_of("DataSection", DataBuildConfig, ("sources", "out", "seed"), extra=[
        ("source", list[str] | None, field(None, help="Open Assistant export(s) or dataset(s); null = the embedded "
                                                      "synthetic world"))],
        namespace={"validate": _validate_data, "__module__": __name__})
    model = section_of("ModelSection", ModelInitConfig, ("out", "corpus", "seed"), extra=[
        ("name", str | None, field(None, help="policy to start from (hub id or folder); null = build the embedded "
                                              "tokenizer and model"))],
        namespace={"validate": _validate_model, "__module__": __name__})
    return world, data, model


WorldSection, DataSection, ModelSection = _sections()


@dataclass
class RunConfig:
    output_dir: str = field("runs/demo", help="run folder: stage outputs, manifest.json, summary.json, report.html")
    seed: int = field(0, help="seed of every stage")
    world: WorldSection = field(default_factory=WorldSection, help="the embedded world (used when data.source is null)")
    data: DataSection = field(default_factory=DataSection, help="data stage")
    model: ModelSection = field(default_factory=ModelSection, help="starting model")
    sft: dict = field(default_factory=dict, help="SFT stage keys (see rlhfkit sft --help) without model/data/output_dir")
    reward: dict = field(default_factory=dict, help="reward stage keys (see rlhfkit reward --help)")
    ppo: dict = field(default_factory=dict, help="RL stage keys (see rlhfkit ppo --help); ppo.algorithm: ppo, rloo or "
                                                 "grpo, or dpo: the dpo section's stage in its place (sft -> dpo -> eval)")
    dpo: dict = field(default_factory=dict, help="DPO stage keys (see rlhfkit dpo --help), used when ppo.algorithm is dpo")
    reward_ensemble: int = field(1, help="reward models to train (seeds seed, seed+1, ...; member 0 in reward/, the others "
                                         "in reward/members/N); with more than one, PPO optimises their combination "
                                         "(ppo.ensemble_reduction) and logs their disagreement (objective/ensemble_std)")
    eval: EvalConfig = field(default_factory=EvalConfig, help="held-out evaluation")

    def validate(self) -> list[str]:
        """Build every stage config with placeholder paths, so all errors show before any work."""
        problems = []
        for name, cls in self.stage_classes().items():
            section = self.rl_section() if name == "ppo" else getattr(self, name)
            for key in WIRED_KEYS:
                if key in section and not (name == "reward" and key == "model"):
                    problems.append(f"{name}.{key} is set by the chain; remove it")
            problems.extend(collect_errors(cls, {**section, **_placeholders(cls)}, name))
        if self.reward_ensemble < 1:
            problems.append(f"reward_ensemble must be at least 1, got {self.reward_ensemble}")
        problems.extend(self._curve_problems(problems))
        if not problems:
            problems.extend(self._length_problems())
        if self.model.name is None and self.data.source is not None:
            local = [s for s in self.data.source if Path(s).is_file()]
            if not local:
                problems.append("model.name: set a model when data.source is not a local file (the tokenizer is trained on it)")
        from rlhfkit.data.sources import source_problem

        problems += [f"data.source: {p}" for source in self.data.source or [] if (p := source_problem(source))]
        return problems

    def _curve_problems(self, problems: list[str]) -> list[str]:
        """The over-optimisation curve needs every PPO checkpoint kept, with full weights."""
        out = [f"eval.best_of_n: n must be at least 1, got {n}" for n in self.eval.best_of_n or [] if n < 1]
        if self.dpo_aligns and self.eval.checkpoints:
            out.append("eval.checkpoints: the over-optimisation curve follows RL checkpoints; DPO has none (ppo.algorithm: dpo)")
        if problems or not self.eval.checkpoints:
            return out
        from rlhfkit.config import load_config
        from rlhfkit.ppo import PPOStageConfig

        ppo = load_config(PPOStageConfig, {**self.rl_section(), **_placeholders(PPOStageConfig)})
        if ppo.lora:
            out.append("eval.checkpoints needs full fine-tuning (ppo.lora: false)")
        needed = -(-ppo.num_updates // ppo.save_steps) if ppo.save_steps else 0
        if ppo.save_total_limit < needed:
            out.append(f"eval.checkpoints evaluates the kept PPO checkpoints: set ppo.save_total_limit to at least "
                       f"{needed} (num_updates {ppo.num_updates} / save_steps {ppo.save_steps}) to keep them all")
        return out

    def _length_problems(self) -> list[str]:
        """Every length against the starting model's positions, before any stage runs (the stages check again)."""
        from rlhfkit.artifacts import length_problem, model_positions
        from rlhfkit.config import load_config
        from rlhfkit.ppo import PPOStageConfig

        positions = self.model.max_position_embeddings if self.model.name is None else model_positions(self.model.name)
        out = [length_problem(f"{name}.max_length", section["max_length"], positions)
               for name, section in (("sft", self.sft), ("reward", self.reward), ("dpo", self.dpo))
               if isinstance(section.get("max_length"), int) and not section.get("packing")]  # packed: positions restart
        ppo = load_config(PPOStageConfig, {**self.rl_section(), **_placeholders(PPOStageConfig)})
        if not self.dpo_aligns:
            out.append(length_problem("ppo.response_length", ppo.max_prompt_length + ppo.response_length, positions,
                                      f"max_prompt_length {ppo.max_prompt_length} + response_length {ppo.response_length}"))
        if self.eval.max_prompt_length or self.eval.response_length or self.dpo_aligns:  # else the ppo line says it
            prompt = self.eval.max_prompt_length or ppo.max_prompt_length
            response = self.eval.response_length or ppo.response_length
            out.append(length_problem("eval.response_length", prompt + response, positions,
                                      f"max_prompt_length {prompt} + response_length {response}"))
        return [p for p in out if p]

    @property
    def dpo_aligns(self) -> bool:
        """``ppo.algorithm: dpo``: the third stage is DPO on the pairs instead of RL against the reward model."""
        return self.ppo.get("algorithm") == "dpo"

    def rl_section(self) -> dict:
        """The ppo section as PPOStageConfig reads it. With DPO aligning, its other keys still set the
        evaluation's sampling (temperature, response_length, max_prompt_length), as for RL."""
        return {k: v for k, v in self.ppo.items() if k != "algorithm"} if self.dpo_aligns else self.ppo

    @staticmethod
    def stage_classes() -> dict[str, type]:
        from rlhfkit.dpo import DPOStageConfig
        from rlhfkit.ppo import PPOStageConfig
        from rlhfkit.reward import RewardStageConfig
        from rlhfkit.sft import SFTStageConfig

        return {"sft": SFTStageConfig, "reward": RewardStageConfig, "ppo": PPOStageConfig, "dpo": DPOStageConfig}


def _placeholders(cls) -> dict[str, str]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: "<chain>" for k in WIRED_KEYS if k in names}


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    p = Path(path)
    if not p.exists():
        return path  # a hub id: its name is its identity here
    return _hash({p.name: sha256_file(p)} if p.is_file() else file_digests(p))


class Manifest:
    """``RUN_DIR/manifest.json``: stage -> status, hash, times, metrics; rewritten atomically."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print):
        self.path = run_dir / "manifest.json"
        self.data = {"stages": {}}
        if self.path.is_file():
            try:
                data = read_json(self.path)
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and isinstance(data.get("stages"), dict):
                self.data = data
            else:  # written atomically, so only a hand edit or a damaged disk gets here: every stage
                # is then run again (each resumes or replaces its own folder); nothing is deleted
                log(f"{self.path}: unreadable; every stage is checked and run again")

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **entry: Any) -> None:
        self.data["stages"][name] = {**self.data["stages"].get(name, {}), **entry}
        write_json_atomic(self.path, self.data)


@dataclass
class RunResult(StageResult):
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)


class _Chain:
    """Runs stages in order, skipping the done and unchanged ones.

    With a ``store`` (a sweep's shared folder) a stage's output lives at
    ``store/NAME-HASH`` -- the hash covers its config and every upstream hash, so runs with
    identical upstream stages find them done there -- and ``RUN_DIR/NAME`` links to it.

    Under a multi-process launch every process walks the chain: the main process alone decides,
    writes the manifest and runs the world, data and model stages; the training stages (sft,
    reward, ppo) and the evaluation (its draws spread over the processes) run on all, and each
    stage ends with the main process's metrics shared, so no process goes on before it is done.
    """

    def __init__(self, config: RunConfig, log: Callable[[str], None], store: Path | None = None,
                 processes: Processes | None = None):
        self.config = config
        self.inputs = stage_inputs(config.dpo_aligns)
        self.run_dir = Path(config.output_dir)
        self.processes = processes or Processes()
        self.manifest = Manifest(self.run_dir, log) if self.processes.main else None
        self.log = log
        self.store = store
        self.hashes: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        self.kinds: dict[str, str] = {}  # stage -> what writes its folder: its name, or dpo in ppo's place
        self.ran: list[str] = []
        self.changed: set[str] = set()  # stages redone (damaged output) that came out different
        self.skipped: list[str] = []

    def path(self, name: str) -> Path:
        """Where stage ``name``'s output is (its store folder in a sweep)."""
        return self.paths.get(name, self.run_dir / name)

    def stage(self, name: str, spec: Any, fn: Callable[[Path], dict[str, Any]],
              all_processes: bool = False, kind: str | None = None) -> dict[str, Any]:
        """Run ``fn(out_dir)`` unless done with the same hash of config and upstream hashes, and no input ran now.

        ``all_processes``: under a multi-process launch every process runs ``fn`` (else the main one alone);
        ``kind``: the stage that writes the folder, when not ``name`` (DPO in the RL stage's place)."""
        h = _hash(spec, [self.hashes[i] for i in self.inputs[name]])
        self.hashes[name] = h
        self.kinds[name] = kind or name
        if not self.processes.main:  # follow the main process: its decision (_skip or _run), then its metrics
            decision, out = self.processes.share()
            self.paths[name] = Path(out)
            if decision == "run" and all_processes:
                fn(Path(out))
            return self.processes.share()
        return self.processes.share(self._decide(name, h, fn))

    def _decide(self, name: str, h: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        if self.store is not None:
            return self._shared_stage(name, h, fn)
        entry = self.manifest.stage(name)
        out = self.run_dir / name
        if entry.get("status") == "done" and entry.get("hash") == h and out.exists():
            problem = damage(out, entry.get("files")) or self._input_changed(name)
            if problem is None:
                return self._skip(name, entry, "unchanged", out)
            self._discard(name, out, problem)
            return self._run(name, h, out, fn, resumed=False, earlier=0.0, redo=entry.get("files"))
        if entry.get("hash") not in (None, h) and (out.exists() or out.is_symlink()):
            remove_ours(out, recorded=True)  # changed config or inputs: start this stage afresh (the manifest's own)
        resumed = entry.get("hash") == h and entry.get("status") == "running"
        return self._run(name, h, out, fn, resumed, entry.get("wall_time_s", 0.0) if resumed else 0.0)

    def _shared_stage(self, name: str, h: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        out = self.store / f"{name}-{h}"
        marker = self.store / f"{name}-{h}.json"  # written once the stage is done
        self.paths[name] = out
        _link(self.run_dir / name, out)
        if marker.is_file():
            entry = read_json(marker)
            problem = damage(out, entry.get("files")) or self._input_changed(name)
            if problem is None:
                self.manifest.set(name, status="done", hash=h, shared=str(out), wall_time_s=entry["wall_time_s"],
                                  metrics=entry["metrics"], files=entry.get("files"))
                return self._skip(name, entry, "shared", out)
            marker.unlink()
            self._discard(name, out, problem)
            metrics = self._run(name, h, out, fn, resumed=False, earlier=0.0, redo=entry.get("files"))
        else:
            metrics = self._run(name, h, out, fn, resumed=out.exists(), earlier=0.0)
        write_json_atomic(marker, self.manifest.stage(name))
        return metrics

    def _input_changed(self, name: str) -> str | None:
        """An input redone in this run came out other than it was: this stage read the old output."""
        changed = [i for i in self.inputs[name] if i in self.changed]
        return f"its input {changed[0]} came out different when it was redone" if changed else None

    def _withdraw_downstream(self, name: str) -> None:
        """Stage ``name`` starts: every result that read its old output is out of date from now on, so it
        goes now (the later stages would replace it anyway), and an interrupt leaves no old figure shown as
        current: the run's summary and report, and the later stages' folders (a sweep's shared ones are
        only unlinked from this run: other runs may use them)."""
        later = [s for s in downstream(self.inputs, name) if self.manifest.stage(s).get("status") not in (None, "stale")
                 or (self.run_dir / s).exists() or (self.run_dir / s).is_symlink()]
        for stage in later:
            out = self.run_dir / stage
            if out.is_symlink():
                out.unlink()
            elif out.exists():
                remove_ours(out, recorded=True)
            self.manifest.data["stages"][stage] = {"status": "stale"}  # no figure of the old output stays
        self.manifest.set(name)  # written once for all
        withdrawn = [f for f in RESULT_FILES if (self.run_dir / f).is_file()]
        for f in withdrawn:
            (self.run_dir / f).unlink()
        if later or withdrawn:
            self.log(f"    the results after {name} are out of date and were removed: "
                     + ", ".join(later + withdrawn))

    def _discard(self, name: str, out: Path, problem: str) -> None:
        """A finished stage's output changed since (``problem``): say so and remove it (its record proves it ours)."""
        self.log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {problem} since it finished; redoing the stage")
        remove_ours(out, recorded=True)

    def _skip(self, name: str, entry: dict[str, Any], why: str, out: Path) -> dict[str, Any]:
        self.processes.share(("skip", str(out)))
        index = STAGES.index(name) + 1
        self.log(f"[{index}/{len(STAGES)}] {name}: {why}, skipped ({entry.get('wall_time_s', 0):.1f} s last time)")
        self.skipped.append(name)
        return entry.get("metrics", {})

    def _run(self, name: str, h: str, out: Path, fn: Callable[[Path], dict[str, Any]], resumed: bool,
             earlier: float, redo: dict[str, str] | None = None) -> dict[str, Any]:
        """Run the stage. ``redo``: the files a finished run of the same config recorded (its output was damaged):
        the later stages read that output, so they stay valid if the redo writes the same files again."""
        index = STAGES.index(name) + 1
        self.log(f"[{index}/{len(STAGES)}] {name}: {'resuming' if resumed else 'running'}")
        started = time.time()
        self.manifest.set(name, status="running", hash=h, started=started)
        if redo is None:
            self._withdraw_downstream(name)
        claim_dir(out, self.kinds[name])
        self.processes.share(("run", str(out)))  # the other processes join a training stage here
        metrics = fn(out)
        files = file_digests(out, skip=("checkpoints",))
        self.manifest.set(name, status="done", finished=time.time(), wall_time_s=time.time() - started + earlier,
                          metrics=metrics, files=files)
        if redo is not None and files != redo:
            self.changed.add(name)
            self._withdraw_downstream(name)
        self.ran.append(name)
        return metrics


def _link(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target``, replacing whatever is there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    else:
        remove_ours(link)  # a stage folder of an earlier, unshared run; refused if rlhfkit did not write it
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _metrics_only(result: StageResult) -> dict[str, Any]:
    return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool, type(None)))}


@locks_output("output_dir")
def run_chain(config: RunConfig, log: Callable[[str], None] = print, store: str | os.PathLike | None = None) -> RunResult:
    """Run (or resume) the whole chain into ``config.output_dir``; return the summary.

    ``store``: a folder shared by several runs (``rlhfkit sweep``); stages whose config and
    inputs are identical are computed once there and linked into each run.
    """
    from rlhfkit.data import DataBuildConfig, build_data
    from rlhfkit.dpo import DPOStageConfig, train_dpo
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.ppo.config import launch_problems
    from rlhfkit.reward import RewardStageConfig, train_reward
    from rlhfkit.reward.ensemble import ensemble_metrics, member_folders
    from rlhfkit.sft import SFTStageConfig, train_sft
    from rlhfkit.world import ModelInitConfig, SynthConfig, gold_score, init_model, synth_data

    problems = config.validate()
    if not config.dpo_aligns:  # e.g. a DeepSpeed launch: refused before the first stage, not at the RL stage
        problems.extend(launch_problems())
    if config.model.name and not problems:  # a hub id: in the local cache, or the hub answers at once
        problems.extend(f"model.name: {p}" for p in [hub_problem(config.model.name)] if p)
    if problems:
        raise ConfigError("; ".join(problems))
    processes = Processes()  # under `accelerate launch` with N processes: the main one writes, all train
    if not processes.main:
        log = no_log
    chain = _Chain(config, log, Path(store) if store is not None else None, processes)
    run = chain.run_dir
    if processes.main:
        claim_dir(run, RUN)  # refused, before any work: files rlhfkit did not write, another run's or stage's folder
        write_json_atomic(run / "config.json", dataclasses.asdict(config))
    synthetic = config.data.source is None
    c = config

    # world: the synthetic trees (embedded default only)
    if synthetic:
        world_spec = dataclasses.asdict(c.world) | {"seed": c.seed}
        chain.stage("world", world_spec, lambda out: _metrics_only(synth_data(SynthConfig(
            out=str(out / "trees.jsonl"), seed=c.seed, **dataclasses.asdict(c.world)))))
        sources = [str(chain.path("world") / "trees.jsonl")]
    else:
        sources = list(c.data.source)
        chain.hashes["world"] = _hash([_file_digest(s) for s in sources])
    # data
    data_spec = dataclasses.asdict(c.data) | {"seed": c.seed}
    data_fields = {k: v for k, v in dataclasses.asdict(c.data).items() if k != "source"}
    chain.stage("data", data_spec, lambda out: _metrics_only(build_data(DataBuildConfig(
        sources=sources, out=str(out), seed=c.seed, **data_fields))))
    data_path = str(chain.path("data"))
    from rlhfkit.data import prompts_from_data_dir

    if not prompts_from_data_dir(data_path, "validation"):  # the evaluation's prompts: said now, not after training
        raise ConfigError(f"data: {data_path} holds no held-out prompts for the evaluation (data.val_fraction "
                          f"{c.data.val_fraction}); raise data.val_fraction or give more trees")
    # model: the embedded tokenizer + untrained model, or the user's model as is
    if c.model.name is None:
        corpus = next(s for s in sources if Path(s).is_file())
        chain.stage("model", dataclasses.asdict(c.model) | {"seed": c.seed}, lambda out: _metrics_only(
            init_model(ModelInitConfig(out=str(out), corpus=corpus, seed=c.seed,
                                       **{k: v for k, v in dataclasses.asdict(c.model).items() if k != "name"}))))
        model_path = str(chain.path("model"))
    else:
        chain.hashes["model"] = _hash(c.model.name)
        model_path = c.model.name

    def stage_config(cls, section: dict, **wired: str):
        from rlhfkit.config import load_config

        return load_config(cls, {"seed": c.seed, **section, **wired})

    chain.stage("sft", c.sft, lambda out: _metrics_only(train_sft(stage_config(
        SFTStageConfig, c.sft, model=model_path, data=data_path, output_dir=str(out)))), all_processes=True)

    def train_rewards(out: Path) -> dict[str, Any]:
        """Member 0 is the reward stage's folder itself (its metrics are the stage's); member i trains with seed + i.

        The evaluation's reward-model score is member 0's; PPO optimises the combination."""
        members = member_folders(out, c.reward_ensemble)
        for i, member in enumerate(members):
            result = train_reward(stage_config(RewardStageConfig, {**c.reward, "seed": c.seed + i},
                                               model=c.reward.get("model") or str(chain.path("sft")), data=data_path,
                                               output_dir=str(member)))
            if i == 0:
                metrics = _metrics_only(result)
        return metrics

    reward_spec = c.reward if c.reward_ensemble == 1 else {**c.reward, "ensemble": c.reward_ensemble}
    chain.stage("reward", reward_spec, train_rewards, all_processes=True)
    if c.reward_ensemble > 1 and processes.main:
        # the combination PPO optimises is a ppo setting (ensemble_reduction), not one the members trained with:
        # its held-out figures are recomputed from the members' scores on every run (a few hundred rows), so a
        # changed reduction never leaves the other reduction's figures in the summary
        rl = stage_config(PPOStageConfig, c.rl_section(), **_placeholders(PPOStageConfig))
        figures = ensemble_metrics(member_folders(chain.path("reward"), c.reward_ensemble), rl.ensemble_reduction,
                                   rl.ensemble_std_coef)
        chain.manifest.set("reward", metrics={**chain.manifest.stage("reward").get("metrics", {}), **figures})

    def ppo_config(out: Path):
        members = [str(m) for m in member_folders(chain.path("reward"), c.reward_ensemble)]
        return stage_config(PPOStageConfig, c.rl_section(), model=str(chain.path("sft")),
                            reward_model=members[0] if len(members) == 1 else members, data=data_path, output_dir=str(out))

    gold_fn = (lambda prompts, responses: [gold_score(p, r) for p, r in zip(prompts, responses)]) if synthetic else None
    if c.dpo_aligns:  # sft -> dpo: the pairs themselves, no reward model (it still scores the evaluation)
        chain.stage("ppo", {"algorithm": "dpo", **c.dpo}, lambda out: _metrics_only(train_dpo(
            stage_config(DPOStageConfig, c.dpo, model=str(chain.path("sft")), data=data_path, output_dir=str(out)))),
            all_processes=True, kind="dpo")
    else:
        chain.stage("ppo", c.ppo,
                    lambda out: _metrics_only(train_ppo(ppo_config(out), gold_fn=gold_fn)), all_processes=True)

    def run_eval(out: Path) -> dict[str, Any]:
        ppo = ppo_config(chain.path("ppo"))
        # null = the PPO stage's sampling: the gain shows at the temperature and length PPO trained at
        sampling = {"temperature": c.eval.temperature if c.eval.temperature is not None else ppo.temperature,
                    "response_length": c.eval.response_length or ppo.response_length,
                    "max_prompt_length": c.eval.max_prompt_length or ppo.max_prompt_length}
        config = EvalStageConfig(  # scored by member 0 of an ensemble: the reward stage's own model
            **{**dataclasses.asdict(c.eval), **sampling}, policy=str(chain.path("ppo")),
            reference=str(chain.path("sft")), reward_model=str(chain.path("reward")), data=data_path,
            output_dir=str(out), gold="off")
        return evaluate_stage(config, gold_fn=gold_score if synthetic else None).metrics

    chain.stage("eval", dataclasses.asdict(c.eval), run_eval, all_processes=True)  # its draws spread
    summary = None
    if processes.main:
        summary = build_summary(run, chain.manifest)
        write_json_atomic(run / "summary.json", summary)
        from rlhfkit.report import summary_text, write_report

        write_report(run, summary)
        log(summary_text(run, summary))
    summary = processes.share(summary)
    return RunResult(run, summary, summary, chain.ran, chain.skipped)


def no_log(line: str) -> None:
    """The log of the processes other than the main one (which prints the chain's progress)."""


def build_summary(run: Path, manifest: Manifest) -> dict[str, Any]:
    """``summary.json``: the figures of ``rlhfkit.summary.FIGURES``, plus each stage's wall time."""
    stages = manifest.data["stages"]
    m = {name: stages.get(name, {}).get("metrics", {}) for name in STAGES}
    ev = read_json(run / "eval" / "eval.json") if (run / "eval" / "eval.json").is_file() else {}
    return {
        **collect(m, ev),
        "wall_time_s": {name: stages[name].get("wall_time_s") for name in STAGES if name in stages},
    }

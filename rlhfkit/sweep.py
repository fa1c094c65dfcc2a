"""``rlhfkit sweep``: the chained run over a grid of config values, sharing identical stages.

Every point of the grid (times the seeds) is a ``rlhfkit run`` in ``SWEEP_DIR/runs/NAME``.
Stage outputs live in ``SWEEP_DIR/stages/STAGE-HASH``, where the hash covers the stage's
config and all upstream hashes, so a sweep over ``ppo.kl_coef`` trains SFT and the reward
model once and links them into every run. A re-run skips what is done and resumes what was
interrupted, like ``rlhfkit run``. ``results.csv`` (one row per run) is rewritten after each
run; ``report.html`` compares the runs and overlays their over-optimisation curves.
"""

from __future__ import annotations

import csv
import io
import json
import itertools
import os
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rlhfkit.artifacts import SWEEP, StageResult, claim_dir, output_lock, read_json, write_json_atomic, write_text_atomic
from rlhfkit.config import keys_overlap, load_config, parse_overrides, parse_value, read_yaml
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import STAGES, RunConfig, no_log, run_chain
from rlhfkit.processes import Processes
from rlhfkit.summary import RESULT_KEYS

@dataclass
class SweepResult(StageResult):
    rows: list[dict[str, Any]] = dc_field(default_factory=list)
    stage_runs: dict[str, int] = dc_field(default_factory=dict)  # how often each stage was computed


def split_values(text: str) -> list[str]:
    """``'0,0.1,[en,de]'`` -> ``['0', '0.1', '[en,de]']``: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``['ppo.kl_coef=0,0.05', 'seed=1,2']`` -> ``{'ppo.kl_coef': [0, 0.05], 'seed': [1, 2]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid '{item}' is not KEY=V1,V2,... (for example ppo.kl_coef=0.01,0.05)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        texts = split_values(values)
        if any(t == "" for t in texts):
            raise ConfigError(f"--grid {key}: empty value in '{values}'")
        grid[key] = [parse_value(t) for t in texts]
    return grid


def expand_grid(grid: Mapping[str, Sequence[Any]], seeds: int = 1, base_seed: int = 0) -> list[dict[str, Any]]:
    """The cross product of the grid (first key varies slowest), each point with ``seeds`` seeds."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1 and "seed" in grid:
        raise ConfigError("use either --seeds or --grid seed=..., not both")
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if "seed" in grid:
        return points
    return [{**point, "seed": base_seed + i} for point in points for i in range(seeds)]


def run_name(index: int, point: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe folder name: ``003-ppo.kl_coef=0.05-seed=1``."""
    text = "-".join(f"{k}={v}" for k, v in point.items())
    return f"{index:03d}-" + re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:120]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, in first-seen order (runs may differ in their figures)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass
class SweepPlan:
    """What a sweep will run: the merged grid and seeds, and every run's name, grid point and config."""

    config: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: int
    runs: list[tuple[str, dict[str, Any], RunConfig]]


def plan_sweep(
    config: str | os.PathLike | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    output_dir: str | os.PathLike,
    seeds: int = 1,
    overrides: Sequence[str] = (),
) -> SweepPlan:
    """Build and validate every run's config; raise one ConfigError listing all problems."""
    out = Path(output_dir)
    label = "" if isinstance(config, Mapping) else f"{config}: "
    data, grid, seeds = _with_sweep_section(config, grid, seeds)
    for key, value in parse_overrides(overrides):  # refuses a key given twice among the overrides
        if key == "output_dir":
            raise ConfigError(f"output_dir={_yaml_text(value)}: a sweep puts each run in SWEEP_DIR/runs/NAME; remove it")
        clash = next((k for k in grid if keys_overlap(k, key)), None)
        if clash:  # the grid's value would replace the override's without a word
            raise ConfigError(f"{key} is both a KEY=VALUE override ({_yaml_text(value)}) and a grid key ({clash}, from "
                              "--grid or sweep.grid); give it in one place")
    try:
        base = load_config(RunConfig, data, overrides)
    except ConfigError as e:
        raise ConfigError(label + str(e)) from None
    runs, problems = [], []
    for i, point in enumerate(expand_grid(grid, seeds, base.seed)):
        name = run_name(i, point)
        # the point's seed replaces a seed=N override (its base); no other override is a grid key
        own = [o for o in overrides if o.partition("=")[0].strip() not in point]
        try:  # load_config also runs RunConfig.validate
            runs.append((name, point, load_config(
                RunConfig, data, [*own, *(f"{k}={_yaml_text(v)}" for k, v in point.items())],
                output_dir=str(out / "runs" / name))))
        except ConfigError as e:
            problems.append(f"run {name}: {e}")
    if problems:
        raise ConfigError(label + "; ".join(problems))
    return SweepPlan(data, grid, seeds, runs)


def run_sweep(
    config: str | os.PathLike | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    output_dir: str | os.PathLike,
    seeds: int = 1,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run the chain for every grid point and seed into ``output_dir``; see the module docstring.

    ``config``: a RunConfig YAML file or mapping, optionally with a ``sweep`` section;
    ``overrides``: KEY=VALUE for every run. Every run's config is validated before any work.
    """
    out = Path(output_dir)
    plan = plan_sweep(config, grid, out, seeds, overrides)
    main = Processes().main  # under `accelerate launch`: every process runs the chains, the main one writes
    if not main:
        log = no_log
    with output_lock(out):  # one sweep per folder; each run's chain holds its own run folder too
        if main:
            claim_dir(out, SWEEP)  # refused, before any work, if it holds files rlhfkit did not write
            write_json_atomic(out / "sweep.json", {"grid": plan.grid, "seeds": plan.seeds, "overrides": list(overrides),
                                                   "runs": [name for name, _, _ in plan.runs], "base": plan.config})
        rows: list[dict[str, Any]] = []
        stage_runs = {name: 0 for name in STAGES}
        for i, (name, point, cfg) in enumerate(plan.runs):
            log(f"=== run {i + 1}/{len(plan.runs)}: {name}")
            result = run_chain(cfg, log=lambda line: log(f"  {line}"), store=out / "stages")
            for stage in result.ran:
                stage_runs[stage] += 1
            rows.append(_result_row(name, point, result.output_dir, result.summary))
            if main:
                write_text_atomic(out / "results.csv", _csv_text(rows))
        log("stages computed: " + ", ".join(f"{s} {n}" for s, n in stage_runs.items())
            + f" (for {len(plan.runs)} runs; the rest were shared or already done)")
        if main:
            write_sweep_report(out, rows, list(plan.grid) + (["seed"] if "seed" not in plan.grid else []))
        log(f"results: {out / 'results.csv'}; report: {out / 'report.html'}")
        return SweepResult(out, {"runs": len(rows)}, rows, stage_runs)


def _with_sweep_section(config: str | os.PathLike | Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
                        seeds: int) -> tuple[dict[str, Any], dict[str, list[Any]], int]:
    """A config may carry its own ``sweep: {grid: {KEY: [values]}, seeds: N}``; ``grid`` given here wins per key."""
    data = dict(config) if isinstance(config, Mapping) else read_yaml(config)
    section = data.pop("sweep", None) or {}
    if not isinstance(section, dict) or set(section) - {"grid", "seeds"} or not isinstance(section.get("grid", {}), dict):
        raise ConfigError(f"{config if not isinstance(config, Mapping) else 'config'}: sweep must be a mapping "
                          "with grid (KEY: [values]) and seeds")
    merged = {k: list(v) if isinstance(v, list) else [v] for k, v in section.get("grid", {}).items()}
    merged.update({k: list(v) for k, v in grid.items()})
    if not merged:
        raise ConfigError("sweep: nothing to vary; give --grid KEY=V1,V2,... or a sweep.grid section in the config")
    for key, values in merged.items():
        other = next((k for k in merged if k != key and keys_overlap(k, key)), None)
        if other:
            raise ConfigError(f"grid keys {other} and {key} set the same value; vary it under one key")
        seen: dict[Any, Any] = {}
        for v in values:  # 0.1 and 1e-1 parse to the same float: two identical runs
            if _same(v) in seen:
                a, b = _yaml_text(seen[_same(v)]), _yaml_text(v)
                raise ConfigError(f"grid {key}: the value {a} is given twice{f' (as {a} and {b})' if a != b else ''}; "
                                  "give each value once")
            seen[_same(v)] = v
    return data, merged, seeds if seeds != 1 else int(section.get("seeds", 1))


def _same(value: Any) -> Any:
    """A hashable form under which equal config values are equal (1 and 1.0 alike; True is not 1)."""
    if isinstance(value, (list, tuple)):
        return tuple(_same(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _same(v)) for k, v in value.items()))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return (type(value).__name__, value)


def _yaml_text(value: Any) -> str:
    """A grid value back as override text that parses to the same value."""
    return json.dumps(value) if not isinstance(value, str) else value


def _result_row(name: str, point: Mapping[str, Any], run_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": name, **point}
    row.update({k: summary.get(k) for k in RESULT_KEYS})
    walls = summary.get("wall_time_s") or {}
    row["wall_time_s"] = round(sum(v for v in walls.values() if v), 1)
    curve_path = Path(run_dir) / "eval" / "curve.json"
    if curve_path.is_file():
        best = read_json(curve_path).get("best")
        if best:
            row.update({"best.update": best["update"], "best.kl": best["kl"], "best.gold": best["gold"]})
    return row


def write_sweep_report(out: Path, rows: list[dict[str, Any]], varied: list[str]) -> None:
    """``report.html``: the results table, gold vs each varied key, overlaid over-optimisation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhfkit import compare
    from rlhfkit.report import best_budget_sentence, plot_overoptimization, render_page

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    figures: list[tuple[str, str]] = []
    for key in varied:
        pts = [(r[key], r.get("eval.ppo.gold"), r.get("eval.ppo.gold_se")) for r in rows
               if isinstance(r.get(key), (int, float)) and r.get("eval.ppo.gold") is not None]
        if len(pts) < 2 or key == "seed":
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts], fmt="o", capsize=3)
        xs = [p[0] for p in pts]
        if min(xs) > 0 and max(xs) >= 4 * min(xs):  # learning rates, coefficients: readable ticks on a log axis
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("held-out gold score, aligned policy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots / f"gold_vs_{key}.png", dpi=110)
        plt.close(fig)
        figures.append((f"gold_vs_{key}.png", f"Gold score of the aligned policy (PPO, RLOO, GRPO or DPO) against "
                                              f"{key} (one point per run, ± 1 SE)"))
    curves, sentences, seeded_curves = [], [], []
    for r in rows:
        path = out / "runs" / r["run"] / "eval" / "curve.json"
        if path.is_file():
            curve = read_json(path)
            label = ", ".join(f"{k}={r[k]}" for k in varied if k in r)
            curves.append((label, curve))
            seeded_curves.append((r.get("seed"), curve))
            if curve.get("best"):
                sentences.append(f"{label}: {best_budget_sentence(curve)}")
    if curves:
        plot_overoptimization(curves, plots / "overoptimization.png",
                              "Over-optimisation: gold and proxy score vs KL to SFT (held-out prompts)")
        figures.append(("overoptimization.png", "Gold (left) and proxy (right) score against sqrt(KL to SFT); "
                                                "points are PPO checkpoints, dashed lines best-of-n"))
    best_line = ""
    scored = [c for c in curves if c[1].get("best")]
    if scored:
        label, curve = max(scored, key=lambda c: c[1]["best"]["gold"])
        b = curve["best"]
        best_line = (f"Best KL budget over all runs: {label}, update {b['update']}: KL {b['kl']:.2f} nats "
                     f"(sqrt {b['sqrt_kl']:.2f}), gold {b['gold']:.3f} ± "
                     + ("–" if b.get("gold_se") is None else f"{b['gold_se']:.3f}") + ".")
    # configurations compared over seeds (e.g. one per RL algorithm), best-of-n on the same axes
    groups = compare.group_runs(rows, varied)
    bon = compare.best_of_n_gains(seeded_curves)
    budget_lines = compare.winners(groups, bon)
    write_text_atomic(out / "comparison.csv", _csv_text(groups))
    if any(g.get("eval.gold_gain") is not None for g in groups):
        compare.plot_gain_vs_kl(groups, bon, plots / "gain_vs_kl.png")
        figures.insert(0, ("gain_vs_kl.png", "Gold gain over SFT against sqrt(KL to SFT): each configuration's mean "
                                             "over seeds (± 1 SE across seeds); best-of-n from the same SFT samples"))

    def pm(g: Mapping[str, Any], key: str) -> str:
        value, se = g.get(key), g.get(key + "_se")
        return "–" if value is None else f"{value:.3g}" + (f" ± {se:.2g}" if se is not None else "")

    comparison = {"columns": ["configuration", "seeds"] + [label for _, label in compare.FIGURES],
                  "rows": [[g["config"], str(g["seeds"])] + [pm(g, key) for key, _ in compare.FIGURES] for g in groups]}
    columns = _columns(rows)

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))

    page = render_page("sweep_report.html.j2", out=str(out), varied=varied, best_line=best_line, sentences=sentences,
                       comparison=comparison, budget_lines=budget_lines,
                       plots=[(f"plots/{n}", t) for n, t in figures], columns=columns,
                       rows=[[cell(r.get(c)) for c in columns] for r in rows], runs=[r["run"] for r in rows])
    write_text_atomic(out / "report.html", page)

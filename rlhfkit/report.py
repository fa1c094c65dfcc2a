"""``report.md`` and ``report.html``: the run at a glance, from the files the stages wrote."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from rlhfkit.artifacts import read_json, write_text_atomic
from rlhfkit.summary import BY_KEY, figure_text

# The gains and win rates, in the order the summary text and the report's headline show them.
GAIN_KEYS = ("eval.gold_gain", "eval.greedy_gold_gain", "eval.ppo.kl", "eval.win_rate_gold", "eval.reward_gain",
             "eval.greedy_reward_gain", "eval.win_rate_reward")


def _load_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def log_history(stage_dir: Path) -> list[dict]:
    """A Trainer stage's logged losses: its log_history.json, else its newest trainer_state.json."""
    direct = stage_dir / "log_history.json"
    if direct.is_file():
        return read_json(direct)
    states = sorted(stage_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.rsplit("-", 1)[-1]))
    return read_json(states[-1]).get("log_history", []) if states else []


NO_SE = object()  # a figure that has no standard error (an SE of None is one that is undefined: one prompt)


def _fmt(value: Any, se: Any = NO_SE) -> str:
    """A figure for the report and the summary text; "–" where it is undefined (None, not finite)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
        if se is not NO_SE:
            text += f" ± {se:.2g}" if isinstance(se, (int, float)) and math.isfinite(se) else " ± –"
        return text
    return str(value)


def _figure(summary: dict[str, Any], key: str) -> str:
    return figure_text(summary, key, _fmt, NO_SE)


def _sft_loss(summary: dict[str, Any]) -> str:
    """The SFT eval loss, with the loss before SFT where it was measured (``eval_on_start``)."""
    start = summary.get("sft.eval_loss_start")
    return _fmt(summary.get("sft.eval_loss")) + (f" (before SFT {_fmt(start)})" if start is not None else "")


def method_name(summary: dict[str, Any]) -> str:
    """How the aligned policy is named: its method (PPO, RLOO, GRPO, DPO; ``ppo.algorithm``)."""
    return str(summary.get("ppo.algorithm") or "ppo").upper()


def label(summary: dict[str, Any], key: str) -> str:
    """A figure's label with the run's method in place of the default's name (PPO)."""
    return BY_KEY[key].label.replace("PPO", method_name(summary))


def summary_text(run: Path, summary: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a run."""
    def line(key: str) -> str:
        return f"  {label(summary, key):<42} {_figure(summary, key)}"

    def pair(label: str, sft_key: str, ppo_key: str) -> str:
        return f"  {label:<42} {_figure(summary, sft_key):<18} {_figure(summary, ppo_key)}"

    walls = summary.get("wall_time_s") or {}
    lines = [f"run {run}", f"  {'SFT eval loss':<42} {_sft_loss(summary)}",
             line("reward.eval_accuracy"), line("reward.gold_agreement"),
             *([line("reward.ensemble_gold_agreement")] if summary.get("reward.ensemble_size", 1) > 1 else []),
             f"  {'':<42} {'SFT':<18} {method_name(summary)}",
             pair("reward-model score", "eval.sft.reward", "eval.ppo.reward"),
             pair("gold score", "eval.sft.gold", "eval.ppo.gold"),
             pair("response length", "eval.sft.length", "eval.ppo.length"),
             pair("gold score, greedy", "eval.sft.greedy_gold", "eval.ppo.greedy_gold"),
             *(line(key) for key in GAIN_KEYS),
             "  wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items() if v is not None)
             + f" (total {sum(v for v in walls.values() if v):.0f} s)",
             *([f"verdict: {summary['eval.verdict']}"] if summary.get("eval.verdict") else []),
             f"report: {run / 'report.html'}"]
    return "\n".join(lines)


def moving_mean(values: list[float], window: int) -> list[float]:
    """Centred moving mean; the window shrinks at the ends."""
    half = window // 2
    return [statistics.fmean(values[max(0, i - half): i + half + 1]) for i in range(len(values))]


def _y(value: Any) -> float:
    """A plotted value; an undefined one (None: no reward model) is NaN, which matplotlib leaves out."""
    return math.nan if value is None else value


def plot_overoptimization(curves: list[tuple[str, dict]], path: Path, title: str) -> None:
    """Gold and proxy (reward-model) score against sqrt(KL to SFT), as in Gao et al. 2022:
    one line per PPO run (points = checkpoints), best-of-n dashed, error bars one SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seen_bon: list[list[dict]] = []
    shared_bon = len({json.dumps(c.get("best_of_n")) for _, c in curves if c.get("best_of_n")}) == 1
    for i, (label, curve) in enumerate(curves):
        color = colors[i % len(colors)]
        pts = curve.get("ppo", [])
        xs = [p["sqrt_kl"] for p in pts]
        if pts and pts[0].get("gold") is not None:
            gold_ax.errorbar(xs, [_y(p["gold"]) for p in pts], yerr=[p.get("gold_se") or 0 for p in pts], marker="o",
                             ms=3, color=color, label=f"PPO {label}".strip(), capsize=2)
        proxy_ax.errorbar(xs, [_y(p["reward"]) for p in pts], yerr=[p.get("reward_se") or 0 for p in pts], marker="o",
                          ms=3, color=color, label=f"PPO {label}".strip(), capsize=2)
        bon = curve.get("best_of_n")
        if bon and bon not in seen_bon:  # runs that share SFT and reward model share one best-of-n curve
            seen_bon.append(bon)
            name = "best-of-n" if shared_bon else f"best-of-n {label}"
            bx = [b["sqrt_kl"] for b in bon]
            if bon[0].get("gold") is not None:
                gold_ax.plot(bx, [b["gold"] for b in bon], "s--", ms=3, color=color, alpha=0.7, label=name)
            proxy_ax.plot(bx, [_y(b["reward"]) for b in bon], "s--", ms=3, color=color, alpha=0.7, label=name)
    for ax, ylabel in ((gold_ax, "gold score"), (proxy_ax, "proxy (reward-model) score")):
        ax.set_xlabel("sqrt(KL to SFT)  [sqrt(nats/seq)]")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    gold_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def best_budget_sentence(curve: dict) -> str:
    """Where gold peaked along the PPO curve, and what the proxy did after it."""
    pts = curve.get("ppo", [])
    best = curve.get("best")
    if not pts or best is None:
        return ""
    last = pts[-1]

    def at(point: dict) -> str:  # a policy without updates (DPO's) is "the final policy"
        return "the final policy" if point.get("update") is None else f"update {point['update']}"

    def num(value: Any, spec: str = ".3f") -> str:  # one prompt: no SE; no reward model: no proxy
        return "–" if value is None else format(value, spec)

    text = (f"Gold peaked at {at(best)} (KL {num(best['kl'], '.2f')} nats, sqrt(KL) {num(best['sqrt_kl'], '.2f')}): "
            f"gold {num(best['gold'])} ± {num(best['gold_se'])}, proxy {num(best['reward'])}. "
            f"At the end ({at(last)}, KL {num(last['kl'], '.2f')}): gold {num(last['gold'])} ± "
            f"{num(last['gold_se'])}, proxy {num(last['reward'])}.")
    if (best["update"] != last["update"] and None not in (last["reward"], best["reward"])
            and last["reward"] > best["reward"] and last["gold"] < best["gold"]):
        text += " The proxy kept rising after gold peaked: the reward model was over-optimised."
    bon = [b for b in curve.get("best_of_n") or [] if b.get("gold") is not None]
    if bon:
        top = max(bon, key=lambda b: b["gold"])
        text += (f" Best-of-n peaked at n={top['n']} (KL {num(top['kl'], '.2f')}): gold {num(top['gold'])} ± "
                 f"{num(top['gold_se'])}, proxy {num(top['reward'])}.")
    return text


def render_page(template: str, **context: Any) -> str:
    """An HTML page from ``rlhfkit/templates`` (Jinja2; every value is escaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("rlhfkit", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template(template).render(**context)


def _plots(run: Path, scatter: list[dict], curve: dict, method: str = "PPO") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run / "plots"
    out_dir.mkdir(exist_ok=True)
    made: dict[str, str] = {}

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        made[name] = title

    for stage, title in (("sft", "SFT loss"), ("reward", "Reward model")):
        history = log_history(run / stage)
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        acc = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
        if not train and not evals:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        if train:
            ax.plot(*zip(*train), label="train loss", color="#3465a4")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", color="#cc0000")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        if acc:
            ax2 = ax.twinx()
            ax2.plot(*zip(*acc), "s--", color="#4e9a06", label="eval accuracy")
            ax2.set_ylabel("accuracy")
        ax.legend(loc="upper right")
        ax.set_title(title)
        save(fig, f"{stage}_curves", title)

    rows = _load_jsonl(run / "ppo" / "metrics.jsonl")
    if rows:
        panels = [("objective/scores", "reward-model score"), ("objective/kl", "KL to reference (nats/seq)"),
                  ("objective/gold", "gold score"), ("objective/ensemble_std", "reward ensemble disagreement"),
                  ("val/response_length", "response length (tokens)")]
        panels = [p for p in panels if any(p[0] in r for r in rows)]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.0))
        for ax, (key, label) in zip(list(axes) if len(panels) > 1 else [axes], panels):
            pts = [(r["update"], r[key]) for r in rows if key in r]
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color="#3465a4", alpha=0.35, lw=1)
            if len(ys) >= 24:  # per-update figures are noisy: a centred moving mean beside them
                ax.plot(xs, moving_mean(ys, len(ys) // 12), color="#204a87", lw=1.8)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("update")
        save(fig, "ppo_curves", f"{method} over updates")

    if curve:
        title = "Gold and proxy score vs KL to SFT (held-out prompts)"
        plot_overoptimization([("", curve)], out_dir / "overoptimization.png", title)
        made["overoptimization"] = title

    if scatter:
        fig, ax = plt.subplots(figsize=(4.8, 3.8))
        for name, color in (("sft", "#888a85"), ("ppo", "#cc0000")):
            pts = [(s["reward"], s["gold"]) for s in scatter if s["policy"] == name]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=8, alpha=0.4, color=color, label=name.upper())
        ax.set_xlabel("reward-model score")
        ax.set_ylabel("gold score")
        ax.legend()
        ax.set_title("Reward model vs gold judge (held-out samples)")
        save(fig, "reward_vs_gold", "Reward model vs gold judge")
    return made


def write_report(run: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``report.md`` and ``report.html`` into ``run``; return the plot names."""
    run = Path(run)
    config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    manifest = read_json(run / "manifest.json") if (run / "manifest.json").is_file() else {"stages": {}}
    examples = read_json(run / "eval" / "examples.json") if (run / "eval" / "examples.json").is_file() else []
    scatter = read_json(run / "eval" / "scatter.json") if (run / "eval" / "scatter.json").is_file() else []
    ev = read_json(run / "eval" / "eval.json") if (run / "eval" / "eval.json").is_file() else {}
    curve = read_json(run / "eval" / "curve.json") if (run / "eval" / "curve.json").is_file() else {}
    method = method_name(summary)
    plots = _plots(run, scatter, curve, method)

    headline = [("SFT eval loss", _sft_loss(summary))]
    headline += [(label(summary, key), _figure(summary, key))
                 for key in ("reward.eval_accuracy", "reward.gold_agreement")]
    if summary.get("reward.ensemble_size", 1) > 1:
        headline.append((f"Reward ensemble of {summary['reward.ensemble_size']}: agreement with gold",
                         _fmt(summary.get("reward.ensemble_gold_agreement"))))
    policy_columns = ["policy", "reward", "reward (greedy)", "gold", "gold (greedy)", "length", "KL to SFT"]
    policy_rows = []

    def cell(figures: dict, key: str) -> str:  # an SE the evaluation wrote as null (one prompt) reads "± –"
        return _fmt(figures.get(key), figures.get(key + "_se", NO_SE))

    for name in ("sft", "ppo"):
        e = ev.get(name, {})
        greedy = e.get("greedy", {})
        policy_rows.append(["SFT" if name == "sft" else method, cell(e, "reward"), cell(greedy, "reward"),
                            cell(e, "gold"), cell(greedy, "gold"), cell(e, "length"),
                            cell(e, "kl") if name == "ppo" else "0"])
    # a column nobody measured (gold without a gold judge, greedy without greedy draws) is left out
    keep = [i for i in range(len(policy_columns)) if i == 0 or any(row[i] != _fmt(None) for row in policy_rows)]
    policy_columns = [policy_columns[i] for i in keep]
    policy_rows = [[row[i] for i in keep] for row in policy_rows]
    gains = [(label(summary, key), _figure(summary, key)) for key in GAIN_KEYS]
    stage_rows = []
    for name, entry in manifest.get("stages", {}).items():
        metrics = entry.get("metrics", {})
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:8] if not isinstance(v, (dict, list)))
        stage_rows.append([name, entry.get("status", ""), _fmt(entry.get("wall_time_s")), shown])
    budget = best_budget_sentence(curve)
    eval_note = (f"{ev.get('prompts', '–')} held-out prompts × {ev.get('samples_per_prompt', '–')} samples at "
                 f"T={ev.get('temperature', '–')}; ± is one standard error across prompts.")

    verdict_text = ev.get("verdict") or ""
    md = ["# rlhfkit run report", "", f"Run folder: `{run}`", "", "## Headline", ""]
    md += [f"**{verdict_text}**", ""] if verdict_text else []
    md += [f"- {k}: **{v}**" for k, v in gains + headline]
    md += ["", "## Policies on held-out prompts", "", eval_note, "",
           "| " + " | ".join(policy_columns) + " |", "|" + "---|" * len(policy_columns)]
    md += ["| " + " | ".join(r) + " |" for r in policy_rows]
    if budget:
        md += ["", "## KL budget", "", budget]
    md += ["", "## Stages", "", "| stage | status | wall s | metrics |", "|---|---|---|---|"]
    md += ["| " + " | ".join(r) + " |" for r in stage_rows]
    md += ["", "## Plots", ""] + [f"![{t}](plots/{n}.png)" for n, t in plots.items()]
    md += ["", "## Samples (first sample per prompt)", "", f"| prompt | SFT | {method} |", "|---|---|---|"]
    for ex in examples:
        cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        scores = lambda who: f"r {_fmt(ex[who + '_reward'])}" + (  # noqa: E731
            f", g {_fmt(ex[who + '_gold'])}" if ex[who + "_gold"] is not None else "")
        md.append(f"| {cell(ex['prompt'])} | {cell(ex['sft'])} ({scores('sft')}) | {cell(ex['ppo'])} ({scores('ppo')}) |")
    md += ["", "## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    write_text_atomic(run / "report.md", "\n".join(md))

    samples = [{**ex, **{k: _fmt(ex[k]) for k in ("sft_reward", "sft_gold", "ppo_reward", "ppo_gold")}}
               for ex in examples]
    page = render_page("run_report.html.j2", run=str(run), verdict=verdict_text, method=method,
                       cards=[(k, v) for k, v in gains + headline if v != _fmt(None)],  # no gold judge: no gold cards
                       eval_note=eval_note, policy_columns=policy_columns, policy_rows=policy_rows, budget=budget,
                       plots=[(f"plots/{n}.png", t) for n, t in plots.items()], examples=samples,
                       stage_rows=stage_rows, config=json.dumps(config, indent=2))
    write_text_atomic(run / "report.html", page)
    return {"plots": list(plots)}

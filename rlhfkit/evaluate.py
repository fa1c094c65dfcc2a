"""Held-out evaluation: the SFT policy against the PPO policy, with standard errors.

Both policies answer the same held-out prompts, ``samples_per_prompt`` times each at the
rollout temperature (where RL's gain shows) and once greedily. Every figure is a mean
over prompts of per-prompt means, and its standard error is taken across prompts, so
samples of one prompt are not counted as independent. Win rates pair the i-th PPO sample
with the i-th SFT sample of the same prompt (a tie counts one half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfkit.artifacts import (StageResult, atomic_dir, check_output_dir, length_problem, locks_output, positions_of,
                               refuse_other_stage, write_json_atomic)
from rlhfkit import checkpoint
from rlhfkit.config import field
from rlhfkit.errors import ConfigError
from rlhfkit.processes import Processes
from rlhfkit.core import logprobs_from_logits
from rlhfkit.engine.forward import model_device, response_logits
from rlhfkit.engine.sampling import as_messages, check_chat_template, encode_prompts, generate as sample_responses
from rlhfkit.engine.scoring import Scorer

GoldFn = Callable[[Any, str], float]


@dataclass
class EvalConfig:
    max_prompts: int = field(200, help="held-out prompts evaluated (the first N of the validation split)")
    samples_per_prompt: int = field(4, help="sampled responses per prompt and policy")
    temperature: float | None = field(None, help="sampling temperature; null = the PPO stage's temperature")
    response_length: int | None = field(None, help="most tokens per response; null = the PPO stage's response_length")
    max_prompt_length: int | None = field(None, help="prompt tokens kept (the last ones); null = the PPO stage's "
                                                     "max_prompt_length (called directly: no truncation)")
    greedy: bool = field(True, help="also evaluate one greedy response per prompt")
    batch_size: int = field(64, help="prompts per sampling batch")
    num_examples: int = field(12, help="prompts shown side by side in the report")
    seed: int = field(1234, help="sampling seed (the same for both policies)")
    checkpoints: bool = field(False, help="also evaluate every kept PPO checkpoint (gold, reward and KL to SFT per "
                                          "update: the over-optimisation curve; keep them with ppo.save_total_limit)")
    best_of_n: list[int] | None = field(None, help="best-of-n baseline: for each n, the SFT sample the reward model "
                                                   "scores highest among n (KL = log n - (n-1)/n)")

    def validate(self) -> list[str]:
        problems = [f"{name} must be at least 1, got {getattr(self, name)}"
                    for name in ("max_prompts", "samples_per_prompt", "batch_size", "response_length", "max_prompt_length")
                    if getattr(self, name) is not None and getattr(self, name) < 1]
        if self.num_examples < 0:
            problems.append(f"num_examples must be >= 0, got {self.num_examples}")
        if self.temperature is not None and self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        return problems


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)).

    None where undefined -- the mean of nothing, the standard error of one value, any figure over
    a value that is not finite (a sample no reward model scored) -- so that eval.json stays JSON
    and the report shows "–".
    """
    n = len(values)
    if n == 0 or not all(math.isfinite(v) for v in values):
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class Samples:
    """Responses of one policy: ``per_prompt[i][k]`` is prompt i's k-th response."""

    texts: list[list[str]]
    lengths: list[list[int]]
    logprobs: list[list[float]]  # sum over tokens, at the sampling temperature
    rewards: list[list[float]]
    input_ids: list[list[torch.Tensor]]  # [query | response] rows, for re-scoring under other models
    prompt_lengths: list[int]  # query tokens at the start of each prompt's rows


@torch.no_grad()
def generate(policy, reward_model, tokenizer, prompts: list[Any], k: int, temperature: float,
             response_length: int, batch_size: int, seed: int, greedy: bool = False,
             max_prompt_length: int | None = None) -> Samples:
    """``k`` responses per prompt from ``policy`` (greedy: k identical ones), with their reward-model scores.

    ``reward_model`` is a model sharing the policy's tokenizer, a ``Scorer`` (one with its own
    tokenizer re-encodes the decoded texts, as during PPO), or None (scores NaN).
    """
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length or 1_000_000)
    generator = torch.Generator(device=model_device(policy)).manual_seed(seed)
    if reward_model is not None and not isinstance(reward_model, Scorer):
        reward_model = Scorer(model=reward_model)
    out = Samples([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts],
                  [[] for _ in prompts], [len(ids) for ids in prompt_ids])
    policy.eval()
    for _ in range(k):
        for start in range(0, len(prompts), batch_size):
            gen = sample_responses(policy, tokenizer, prompt_ids[start:start + batch_size], response_length,
                                   temperature, generator, greedy=greedy)
            ids, mask = gen.input_ids, gen.attention_mask
            rewards = (reward_model(ids, mask, prompts[start:start + batch_size], gen.texts).tolist()
                       if reward_model is not None else [float("nan")] * len(ids))
            ids, mask, response_mask, logprobs = ids.cpu(), mask.cpu(), gen.response_mask.cpu(), gen.logprobs.cpu()
            for j, text in enumerate(gen.texts):
                i = start + j
                out.texts[i].append(text)
                out.lengths[i].append(int(response_mask[j].sum()))
                out.logprobs[i].append(float(logprobs[j].sum()))
                out.rewards[i].append(rewards[j])
                out.input_ids[i].append(ids[j][mask[j].bool()].clone())
    return out


@torch.no_grad()
def sequence_logprob(model, row: torch.Tensor, prompt_len: int, temperature: float) -> float:
    """Sum of log-probs of row[prompt_len:] under ``model`` at ``temperature``."""
    ids = row[None].to(model_device(model))
    mask = torch.ones_like(ids)
    width = ids.shape[1] - prompt_len
    logits = response_logits(model, ids, mask, width)
    return float(logprobs_from_logits(logits, ids[:, prompt_len:], temperature).sum())


def _per_prompt(values: list[list[float]]) -> list[float]:
    return [sum(v) / len(v) for v in values if v]


def sqrt_kl(kl: float | None) -> float | None:
    """The x-axis of the over-optimisation plots; a small sampled KL can come out slightly negative."""
    return None if kl is None else math.sqrt(max(kl, 0.0))


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n-1)/n (Stiennon et al. 2020; exact for distinct samples)."""
    return math.log(n) - (n - 1) / n


def best_of_n(rewards: list[list[float]], gold: list[list[float]] | None, ns: Sequence[int]) -> list[dict[str, Any]]:
    """Best-of-n from N samples per prompt: for each n, split a prompt's samples into N // n
    disjoint groups, keep the highest-reward sample of each group, and average (over groups,
    then prompts); standard errors across prompts."""
    out = []
    for n in sorted(set(ns)):
        chosen_reward, chosen_gold = [], []
        for i, rs in enumerate(rewards):
            groups = [range(start, start + n) for start in range(0, len(rs) - n + 1, n)]
            best = [max(group, key=lambda j: rs[j]) for group in groups]
            chosen_reward.append([rs[j] for j in best])
            if gold is not None:
                chosen_gold.append([gold[i][j] for j in best])
        kl = best_of_n_kl(n)
        point = {"n": n, "kl": kl, "sqrt_kl": sqrt_kl(kl)}
        point["reward"], point["reward_se"] = mean_se(_per_prompt(chosen_reward))
        point["gold"], point["gold_se"] = mean_se(_per_prompt(chosen_gold)) if gold is not None else (None, None)
        out.append(point)
    return out


def _summary(samples: Samples, gold: list[list[float]] | None) -> dict[str, Any]:
    reward, reward_se = mean_se(_per_prompt(samples.rewards))
    length, length_se = mean_se(_per_prompt([[float(x) for x in v] for v in samples.lengths]))
    out = {"reward": reward, "reward_se": reward_se, "length": length, "length_se": length_se}
    if gold is not None:
        out["gold"], out["gold_se"] = mean_se(_per_prompt(gold))
    else:
        out["gold"], out["gold_se"] = None, None
    return out


def _paired_gain(ppo: list[list[float]], sft: list[list[float]]) -> tuple[float | None, float | None]:
    """Mean and standard error of the per-prompt difference PPO - SFT (paired over prompts)."""
    return mean_se([a - b for a, b in zip(_per_prompt(ppo), _per_prompt(sft))])


def _win_rate(a: list[list[float]], b: list[list[float]]) -> tuple[float | None, float | None]:
    per_prompt = []
    for xs, ys in zip(a, b):
        # an unscored sample (NaN: no reward model) neither wins nor loses: the prompt's rate is NaN
        wins = [math.nan if math.isnan(x - y) else 1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(xs, ys)]
        per_prompt.append(sum(wins) / len(wins) if wins else math.nan)
    return mean_se(per_prompt)


def _gold(gold_fn: GoldFn | None, prompts: list[Any], samples: Samples) -> list[list[float]] | None:
    if gold_fn is None:
        return None
    return [[float(gold_fn(as_messages(p), t)) for t in texts] for p, texts in zip(prompts, samples.texts)]


def _kl_to_reference(reference, samples: Samples, temperature: float) -> list[list[float]]:
    """KL(policy || reference) per sequence on the policy's own samples: sum_t log pi - log pi_ref."""
    reference.eval()
    return [[lp - sequence_logprob(reference, row, length, temperature) for lp, row in zip(logprobs, rows)]
            for logprobs, rows, length in zip(samples.logprobs, samples.input_ids, samples.prompt_lengths)]


def curve_point(policy, reference, reward_model, tokenizer, prompts: list[Any], config: EvalConfig,
                temperature: float, response_length: int, gold_fn: GoldFn | None = None) -> dict[str, Any]:
    """One point of the over-optimisation curve: ``policy``'s reward-model score, gold score
    and KL to ``reference`` on the same held-out prompts and seed as ``evaluate``."""
    prompts = prompts[: config.max_prompts]
    samples = generate(policy, reward_model, tokenizer, prompts, config.samples_per_prompt, temperature,
                       response_length, config.batch_size, config.seed, max_prompt_length=config.max_prompt_length)
    point = _summary(samples, _gold(gold_fn, prompts, samples))
    point["kl"], point["kl_se"] = mean_se(_per_prompt(_kl_to_reference(reference, samples, temperature)))
    point["sqrt_kl"] = sqrt_kl(point["kl"])
    return point


def best_of_n_curve(sft_policy, reward_model, tokenizer, prompts: list[Any], config: EvalConfig, temperature: float,
                    response_length: int, gold_fn: GoldFn | None = None) -> list[dict[str, Any]]:
    """The best-of-n baseline for ``config.best_of_n``: max(n) SFT samples per prompt, scored once."""
    prompts = prompts[: config.max_prompts]
    samples = generate(sft_policy, reward_model, tokenizer, prompts, max(config.best_of_n), temperature,
                       response_length, config.batch_size, config.seed + 1, max_prompt_length=config.max_prompt_length)
    return best_of_n(samples.rewards, _gold(gold_fn, prompts, samples), config.best_of_n)


def evaluate(
    sft_policy,
    ppo_policy,
    reward_model,
    tokenizer,
    prompts: list[Any],
    config: EvalConfig,
    temperature: float,
    response_length: int,
    gold_fn: GoldFn | None = None,
    processes: Processes | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (metrics, examples). Metrics keys follow ``summary.json``'s ``eval.*``.

    The draws (SFT and PPO, sampled and greedy) each seed their own generator, so under a
    multi-process launch they run spread over the processes with the figures of one process."""
    problems = config.validate()
    if problems:
        raise ConfigError("eval: " + "; ".join(problems))
    prompts = prompts[: config.max_prompts]
    k = config.samples_per_prompt

    def draw(policy, samples: int, greedy: bool = False) -> Samples:
        return generate(policy, reward_model, tokenizer, prompts, samples, temperature, response_length,
                        config.batch_size, config.seed, greedy=greedy, max_prompt_length=config.max_prompt_length)

    def ppo_and_kl() -> tuple[Samples, list[list[float]]]:
        ppo = draw(ppo_policy, k)
        return ppo, _kl_to_reference(sft_policy, ppo, temperature)

    tasks = [lambda: draw(sft_policy, k), ppo_and_kl]
    if config.greedy:
        tasks += [lambda: draw(sft_policy, 1, greedy=True), lambda: draw(ppo_policy, 1, greedy=True)]
    sft, (ppo, kl), *greedy_draws = (processes or Processes()).spread(tasks)

    def gold_of(s: Samples):
        return _gold(gold_fn, prompts, s)

    sft_gold, ppo_gold = gold_of(sft), gold_of(ppo)
    metrics: dict[str, Any] = {
        "prompts": len(prompts),
        "samples_per_prompt": k,
        "temperature": temperature,
        "sft": _summary(sft, sft_gold),
        "ppo": _summary(ppo, ppo_gold),
    }
    metrics["ppo"]["kl"], metrics["ppo"]["kl_se"] = mean_se(_per_prompt(kl))
    metrics["win_rate_reward"], metrics["win_rate_reward_se"] = _win_rate(ppo.rewards, sft.rewards)
    if sft_gold is not None:
        metrics["win_rate_gold"], metrics["win_rate_gold_se"] = _win_rate(ppo_gold, sft_gold)
        metrics["gold_gain"], metrics["gold_gain_se"] = _paired_gain(ppo_gold, sft_gold)
    else:
        metrics["win_rate_gold"] = metrics["win_rate_gold_se"] = None
        metrics["gold_gain"] = metrics["gold_gain_se"] = None
    metrics["reward_gain"], metrics["reward_gain_se"] = _paired_gain(ppo.rewards, sft.rewards)
    if config.greedy:
        greedy, greedy_gold = {}, {}
        for name, g in zip(("sft", "ppo"), greedy_draws):
            greedy[name] = g
            greedy_gold[name] = gold_of(g)
            metrics[name]["greedy"] = _summary(g, greedy_gold[name])
        metrics["greedy_reward_gain"], metrics["greedy_reward_gain_se"] = _paired_gain(greedy["ppo"].rewards,
                                                                                        greedy["sft"].rewards)
        if sft_gold is not None:
            metrics["greedy_gold_gain"], metrics["greedy_gold_gain_se"] = _paired_gain(greedy_gold["ppo"], greedy_gold["sft"])
    metrics["verdict"] = verdict(metrics)
    examples = []
    for i in range(min(config.num_examples, len(prompts))):
        examples.append({
            "prompt": as_messages(prompts[i])[-1]["content"],
            "sft": sft.texts[i][0], "sft_reward": _finite(sft.rewards[i][0]),
            "sft_gold": sft_gold[i][0] if sft_gold else None,
            "ppo": ppo.texts[i][0], "ppo_reward": _finite(ppo.rewards[i][0]),
            "ppo_gold": ppo_gold[i][0] if ppo_gold else None,
        })
    scatter = [
        {"policy": name, "reward": r, "gold": g}
        for name, s, gold in (("sft", sft, sft_gold), ("ppo", ppo, ppo_gold)) if gold is not None
        for rs, gs in zip(s.rewards, gold) for r, g in zip(rs, gs) if math.isfinite(r)  # no reward model: no point
    ]
    metrics["scatter"] = scatter
    return metrics, examples


def verdict(metrics: dict[str, Any], z: float = 2.0) -> str:
    """One plain-words line on whether PPO made the policy better, computed from ``evaluate``'s figures.

    A gain counts when it is more than ``z`` paired standard errors from zero. With a gold
    judge the line is about the true score, sampled and greedy; a reward-model score that
    rose while gold did not is called out as over-optimisation. Without one, only the
    proxy is known, and the line says so.
    """
    def sig(gain, se) -> int:  # +1 significantly up, -1 significantly down, 0 neither (no SE: one prompt)
        if gain is None or se is None or not math.isfinite(se):
            return 0
        return 1 if gain > z * se else -1 if gain < -z * se else 0

    def num(value, spec: str) -> str:  # None (undefined: no prompts, one prompt, no reward model) reads "–"
        return "–" if value is None else format(value, spec)

    def fig(gain, se) -> str:
        return f"{num(gain, '+.3f')} ± {num(se, '.3f')}"

    kl = num(metrics["ppo"]["kl"], ".2f")

    reward = sig(metrics.get("reward_gain"), metrics.get("reward_gain_se"))
    gold_gain, gold_se = metrics.get("gold_gain"), metrics.get("gold_gain_se")
    if gold_gain is None:
        greedy = (f" (greedy {fig(metrics['greedy_reward_gain'], metrics['greedy_reward_gain_se'])})"
                  if metrics.get("greedy_reward_gain") is not None else "")
        return (f"No gold judge: the reward-model score changed by {fig(metrics['reward_gain'], metrics['reward_gain_se'])}"
                f"{greedy} at KL {kl} nats; a learned reward can be over-optimised, so read the samples.")
    sampled = sig(gold_gain, gold_se)
    greedy_gain, greedy_se = metrics.get("greedy_gold_gain"), metrics.get("greedy_gold_gain_se")
    greedy = sig(greedy_gain, greedy_se)
    parts = [f"sampled {fig(gold_gain, gold_se)}"]
    if greedy_gain is not None:
        parts.append(f"greedy {fig(greedy_gain, greedy_se)}")
    figures = f" (gold gain {', '.join(parts)}; KL {kl} nats)"
    if sampled > 0 and greedy > 0:
        return "PPO improved the true score, sampled and greedy" + figures + "."
    if sampled > 0 and greedy == 0:
        return ("PPO improved the true score of sampled answers; greedy answers did not change significantly"
                + figures + ".")
    if greedy < 0 or sampled < 0:
        worse = " and ".join(name for name, s in (("sampled", sampled), ("greedy", greedy)) if s < 0)
        lead = "Past the peak: the reward-model score rose while " if reward > 0 else "Worse than SFT: "
        text = lead + f"{worse} answers got truly worse"
        if sampled > 0:
            text += ", though sampled answers improved"
        return text + figures + "."
    if reward > 0:
        return "Past the peak: the reward-model score rose while the true score did not" + figures + "."
    return "No significant change in the true score" + figures + "."


# -- the evaluation stage: two model folders in, eval.json out --------------------------------------------


@dataclass(kw_only=True)
class EvalStageConfig(EvalConfig):
    """The evaluation stage on any two model folders (``rlhfkit eval CONFIG.yaml`` or ``evaluate_stage``)."""

    policy: str = field(help="the policy evaluated: the PPO stage's folder or any model folder")
    reference: str = field(help="the policy it is compared with, and KL measured against: the SFT stage's folder")
    reward_model: str | None = field(None, help="reward model folder (scores, reward gains); null = none")
    data: str = field(help="held-out prompts: a data-build folder (its validation split's user turns)")
    output_dir: str = field("runs/eval", help="artifact folder: eval.json, examples.json, scatter.json, curve.json")
    gold: str = field("auto", help="the embedded world's gold judge: auto (when it knows every prompt), on, or off")

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.gold not in ("auto", "on", "off"):
            problems.append(f"gold: must be auto, on or off, got {self.gold!r}")
        for name in ("policy", "reference", "data"):
            if not getattr(self, name):
                problems.append(f"{name}: a folder is needed")
        return problems


def _load_eval_models(config: EvalStageConfig, device):
    """(tokenizer, reference, policy, reward scorer | None), safetensors only, through the project's loaders."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.artifacts import load_pretrained, load_scoring_model, load_tokenizer, resolve_model_path
    from rlhfkit.engine.scoring import shares_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(config.reference))
    check_chat_template(tokenizer)  # a template that fails on any conversation: before the models load
    reference = load_pretrained(AutoModelForCausalLM, resolve_model_path(config.reference)).to(device)
    policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(config.policy)).to(device)
    scorer = None
    if config.reward_model:
        model = load_scoring_model(resolve_model_path(config.reward_model))
        model.to(device).eval()
        reward_tokenizer = load_tokenizer(resolve_model_path(config.reward_model))
        same = shares_tokenizer(reward_tokenizer, tokenizer)  # else decode and re-encode, as PPO did
        scorer = Scorer(model=model, tokenizer=reward_tokenizer, same_tokenizer=same)
    return tokenizer, reference, policy, scorer


def _gold_judge(mode: str, prompts: list[Any]) -> GoldFn | None:
    if mode == "off":
        return None
    from rlhfkit.world.gold import gold_score, task_family

    known = all(task_family(as_messages(p)) is not None for p in prompts)
    if not known and mode == "on":
        raise ConfigError("gold: 'on', but the gold judge does not know every held-out prompt (not the embedded world's)")
    return gold_score if known else None


@locks_output("output_dir")
def evaluate_stage(config: EvalStageConfig, gold_fn: GoldFn | None = None) -> StageResult:
    """Held-out evaluation of ``config.policy`` against ``config.reference``, written to ``config.output_dir``.

    Steps: (1) validate; (2) load the models and the held-out prompts; (3) ``evaluate``: both
    policies sampled and greedy, reward and gold scores, KL; (4) the over-optimisation curve
    when ``checkpoints`` or ``best_of_n`` is set; (5) write eval.json, examples.json,
    scatter.json (and curve.json) in one atomic step. ``gold_fn`` replaces the gold judge.
    Under a multi-process launch every process loads the models, the draws of (3) and the
    points of (4) are spread over the processes, and the main process writes.
    Temperature and response length default to 1.0 and 64 when not given (the chain passes
    the PPO stage's); prompts are not truncated unless ``max_prompt_length`` is set.
    """
    from rlhfkit.data import prompts_from_data_dir

    # (1) validate
    problems = config.validate()
    if problems:
        raise ConfigError("eval: " + "; ".join(problems))
    out = Path(config.output_dir)
    refuse_other_stage(out, "eval")  # e.g. the policy's own PPO folder: its model would be replaced
    check_output_dir(out, "eval")  # a user's folder, or one inside another run or stage: refused before any work
    # (2) models and prompts
    prompts = prompts_from_data_dir(config.data, "validation")
    if not prompts:
        raise ConfigError(f"eval: {config.data} has no validation prompts; raise data.val_fraction")
    prompts = prompts[: config.max_prompts]
    gold_fn = gold_fn or _gold_judge(config.gold, prompts)
    processes = Processes()  # before any other PartialState: under a launch it joins the process group
    device = processes.device  # the GPU when there is one
    tokenizer, reference, policy, scorer = _load_eval_models(config, device)
    temperature = config.temperature if config.temperature is not None else 1.0
    length = config.response_length or 64
    longest = max(len(ids) for ids in encode_prompts(tokenizer, prompts, config.max_prompt_length or 10**9))
    problem = length_problem("eval: response_length", longest + length, positions_of(policy.config),
                             f"the longest prompt ({longest} tokens) + response_length {length}")
    if problem:  # past its trained positions the model would sample from positions it never saw
        raise ConfigError(problem + (" or set max_prompt_length" if not config.max_prompt_length else ""))
    # (3) the comparison
    metrics, examples = evaluate(reference, policy, scorer, tokenizer, prompts, config, temperature, length, gold_fn,
                                 processes)
    # (4) the curve
    curve = None
    if config.checkpoints or config.best_of_n:
        curve = _curve(config, metrics, reference, scorer, tokenizer, prompts, temperature, length, gold_fn, device,
                       processes)
    # (5) write
    scatter = metrics.pop("scatter")
    if processes.main:
        with atomic_dir(out, "eval") as tmp:
            write_json_atomic(tmp / "examples.json", examples)
            write_json_atomic(tmp / "scatter.json", scatter)
            write_json_atomic(tmp / "eval.json", metrics)
            if curve is not None:
                write_json_atomic(tmp / "curve.json", curve)
    processes.share()  # the others return once the folder is written
    return StageResult(out, metrics)


def _curve(config: EvalStageConfig, metrics: dict[str, Any], reference, scorer, tokenizer, prompts: list[Any],
           temperature: float, length: int, gold_fn: GoldFn | None, device, processes: Processes) -> dict[str, Any]:
    """The over-optimisation curve: the reference (update 0), every kept PPO checkpoint of the policy
    folder, the final policy -- same prompts and seed -- and the best-of-n baseline (the checkpoints'
    points and the baseline spread over the processes)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.artifacts import load_pretrained, read_json, resolve_model_path

    fields = ("reward", "reward_se", "gold", "gold_se", "length", "kl", "kl_se")
    points = [{"update": 0, **{k: metrics["sft"].get(k) for k in fields[:5]}, "kl": 0.0, "kl_se": 0.0}]
    record = Path(config.policy) / "metrics.json"  # a PPO stage's: how many updates its final policy had
    done = read_json(record).get("updates_done") if record.is_file() else None
    folders = [] if not config.checkpoints else [  # the final policy is evaluated above
        f for f in checkpoint.completed(Path(config.policy) / "checkpoints")
        if done is None or checkpoint.update_of(f) < done]

    def point_of(folder: Path) -> dict[str, Any]:
        policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(config.reference))
        checkpoint.load_policy(folder, policy)
        policy.to(device)
        point = curve_point(policy, reference, scorer, tokenizer, prompts, config, temperature, length, gold_fn)
        return {"update": checkpoint.update_of(folder), **{k: point[k] for k in fields}}

    tasks: list[Callable[[], Any]] = [lambda f=f: point_of(f) for f in folders]
    if config.best_of_n:
        tasks.append(lambda: best_of_n_curve(reference, scorer, tokenizer, prompts, config, temperature, length, gold_fn))
    results = processes.spread(tasks)
    points += results[:len(folders)]
    points.append({"update": done, **{k: metrics["ppo"].get(k) for k in fields}})
    for point in points:
        point["sqrt_kl"] = sqrt_kl(point["kl"])
    curve: dict[str, Any] = {"ppo": points, "temperature": temperature, "prompts": metrics["prompts"],
                             "samples_per_prompt": metrics["samples_per_prompt"]}
    if config.best_of_n:
        curve["best_of_n"] = results[-1]
    if gold_fn is not None:
        curve["best"] = max(points, key=lambda p: p["gold"])
    return curve

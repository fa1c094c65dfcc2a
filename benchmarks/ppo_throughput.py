"""PPO throughput of rlhfkit's ``train_ppo`` on the fixed workload of ``shared/bench/ppo_workload.json``.

The workload: four tiny Llama models (policy, frozen reference copy, frozen reward, trained
value; fp32, seed 0), 10 updates x 16 episodes of up to 48 sampled tokens, 1 PPO epoch of
4 minibatches (40 optimizer steps), CPU, 2 torch threads. Everything is built in memory
before the clock starts: a byte-level BPE tokenizer trained on the 100 root prompts (the
peer's recipe, pad distinct from EOS, embedding sized to the workload's vocab_size), the
models, the chat-templated prompts (last 64 tokens kept). Then ``train_ppo`` runs with
``policy=``, ``tokenizer=``, ``reward_model=``, ``value_model=``, ``prompts=`` passed in.

Timing: the ``elapsed_s`` of the last row of ``metrics.jsonl``, which ``train_ppo`` measures
from the start of its update loop (its set-up -- reference deepcopy, optimizer, accelerate
-- is not counted, as the peer's ``PPOTrainer.__init__`` is not). The total wall time of
the ``train_ppo`` call is reported beside it (``train_ppo_call_s``). The time breakdown
wraps the engine's ``sample`` and the trainer's ``make_rollout`` and ``ppo_update`` without changing them:
generation = ``sample``; scoring = ``make_rollout`` minus ``sample`` (reference, value and
reward forwards, truncation, decoding); training = ``ppo_update`` (40 forward+backward of
policy and value, optimizer steps); other = the rest of the loop (GAE, whitening, metrics).

Every repetition runs in a fresh subprocess, so ``peak_rss_mb`` (``ru_maxrss`` of the whole
process) is that run's. With ``--peer PYTHON`` the peer (``shared/bench/trl112_ppo.py``, trl
1.12's PPOTrainer on the same workload) runs with that interpreter, alternating with rlhfkit,
and the medians and the ratio are printed. The peer's own ``episodes`` is the workload's
figure; ``true_episodes`` is the episode count TRL logs after its last update (read from the
peer's stderr), so a batch-arithmetic mismatch would show. (For trl 1.12 with
per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=4 it is 160:
local_batch_size = 16 x 1 = 16 per update, 10 updates, minibatches of 4, 40 optimizer steps.)

On a 2-core machine other jobs distort 2-thread timings badly (OpenMP threads wait for a
preempted sibling): every run records the 1-minute load average before and after, and
``--max-load`` waits for a quiet machine before each run.

    .venv/bin/python benchmarks/ppo_throughput.py --workload ../shared/bench/ppo_workload.json \
        [--peer /tmp/peer112/bin/python] [--repeats 3]

Stdout ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKLOAD = ROOT.parent / "shared/bench/ppo_workload.json"
PEER_SCRIPT = ROOT.parent / "shared/bench/trl112_ppo.py"


# --------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------
def machine(threads: int) -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "python": platform.python_version()}


# --------------------------------------------------------------------------------------
# one rlhfkit run (in a child process)
# --------------------------------------------------------------------------------------
def build_tokenizer(texts: list[str], vocab_size: int):
    """The workload's tokenizer, built exactly as the peer builds it (same trainer, specials, template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  padding_side="left")
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    assert tok.pad_token_id != tok.eos_token_id and len(tok) <= vocab_size
    return tok


def build_models(W: dict, tok):
    """Policy, reward, value with the workload's sizes, seed 0, fp32.

    The RNG is consumed in the peer's order (policy, reference, reward, value) so the four
    models hold the same weights as the peer's; the reference itself is not kept: train_ppo
    makes its own (a deepcopy of the policy, i.e. the same weights).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    M = W["model"]
    cfg = LlamaConfig(vocab_size=W["tokenizer"]["vocab_size"], hidden_size=M["hidden_size"],
                      num_hidden_layers=M["num_hidden_layers"], num_attention_heads=M["num_attention_heads"],
                      num_key_value_heads=M["num_key_value_heads"], intermediate_size=M["intermediate_size"],
                      max_position_embeddings=M["max_position_embeddings"], pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=1)
    torch.manual_seed(M["seed"])
    policy = LlamaForCausalLM(cfg)
    del_me = LlamaForCausalLM(cfg)  # the peer's reference: same RNG draws, weights replaced by the policy's
    del del_me
    reward = LlamaForSequenceClassification(cfg)
    value = LlamaForSequenceClassification(cfg)
    for m in (policy, reward, value):
        assert next(m.parameters()).dtype == torch.float32
    return policy, reward, value


def load_prompt_texts(W: dict, workload_path: Path) -> list[str]:
    src = Path(W["prompts"]["source"])
    candidates = [ROOT / src, Path.cwd() / src, workload_path.parent.parent / "data/oasst" / src.name]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise SystemExit(f"prompt file {src} not found (looked in {', '.join(map(str, candidates))})")
    return [json.loads(line)["prompt"]["text"] for line in path.open(encoding="utf-8") if line.strip()]


def loadavg() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return None


def run_rlhfkit(workload_path: Path, threads: int | None = None) -> dict:
    """One run of train_ppo on the workload; returns the figures (called in a fresh process)."""
    W = json.loads(workload_path.read_text())
    if threads:
        W["torch_threads"] = threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(W["torch_threads"])
    import rlhfkit.engine.sampling as sampling_mod
    import rlhfkit.ppo.trainer as trainer_mod
    from rlhfkit.ppo import PPOStageConfig, train_ppo

    texts = load_prompt_texts(W, workload_path)
    tok = build_tokenizer(texts, W["tokenizer"]["vocab_size"])
    policy, reward, value = build_models(W, tok)
    prompts = [[{"role": "user", "content": t}] for t in texts]

    # --- time breakdown and sampled-token count: wrap the trainer's functions (no behaviour change)
    acc = {"generate_s": 0.0, "rollout_s": 0.0, "train_s": 0.0, "generate_cpu_s": 0.0, "rollout_cpu_s": 0.0,
           "train_cpu_s": 0.0, "gen_tokens": 0, "rollouts": 0, "sampled_rows": 0}
    pad_id = tok.pad_token_id
    wrapped = []

    def wrap(name, key, count=None, module=trainer_mod):
        fn = getattr(module, name, None)
        if fn is None:
            return
        def timed(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **k)
            acc[key] += time.perf_counter() - t
            acc[key.replace("_s", "_cpu_s")] += time.process_time() - c
            if count:
                count(out)
            return out
        setattr(module, name, timed)
        wrapped.append(name)

    def count_sample(out):
        acc["gen_tokens"] += int((out[0] != pad_id).sum())
        acc["sampled_rows"] += int(out[0].shape[0])

    def count_rollout(out):
        acc["rollouts"] += 1

    wrap("sample", "generate_s", count_sample, sampling_mod)
    wrap("make_rollout", "rollout_s", count_rollout)
    wrap("ppo_update", "train_s")

    B, U = W["rollout_batch_size"], W["updates"]
    out_dir = tempfile.mkdtemp(prefix="rlhfkit-ppo-bench-")
    config = PPOStageConfig(
        model="", output_dir=out_dir, seed=0,
        num_updates=U, rollout_batch_size=B, num_mini_batches=W["num_mini_batches"],
        per_device_train_batch_size=B // W["num_mini_batches"], rollout_forward_batch_size=B,
        num_ppo_epochs=W["ppo_epochs"], response_length=W["response_length"], temperature=W["temperature"],
        max_prompt_length=W["prompts"]["max_prompt_tokens"], missing_eos_penalty=W["missing_eos_penalty"],
        kl_coef=W["kl_coef"], learning_rate=W["learning_rate"], report_to=["none"], sample_every=0,
        save_steps=0, torch_threads=W["torch_threads"],
    )
    assert config.gradient_accumulation_steps == 1 and config.optimizer_steps_per_update == W["num_mini_batches"]
    load_before = loadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    # train_ppo's tqdm bar and batch-arithmetic print go to stderr / stdout of the child; keep stdout clean
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        train_ppo(config, policy=policy, tokenizer=tok, reward_model=reward, value_model=value, prompts=prompts)
    call_s = time.perf_counter() - t0
    call_cpu_s = time.process_time() - c0
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    last = rows[-1]
    seconds = float(last["elapsed_s"])
    episodes = int(last["episode"])
    assert len(rows) == U and episodes == U * B, (len(rows), episodes)
    if "sample" in wrapped:
        assert acc["sampled_rows"] == episodes, acc
    figures = {
        "system": "rlhfkit train_ppo",
        "episodes": episodes,
        "seconds": round(seconds, 3),
        "episodes_per_s": round(episodes / seconds, 3),
        "timing": "elapsed_s of metrics.jsonl (from the start of train_ppo's update loop)",
        "train_ppo_call_s": round(call_s, 3),
        "train_ppo_call_cpu_s": round(call_cpu_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "gen_tokens": acc["gen_tokens"],
        "gen_tokens_per_s": round(acc["gen_tokens"] / seconds, 1),
        "updates": len(rows),
        "optimizer_steps": len(rows) * config.optimizer_steps_per_update,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1min": [load_before, loadavg()],
    }
    if {"sample", "make_rollout", "ppo_update"} <= set(wrapped):
        figures["breakdown_s"] = {
            "generate": round(acc["generate_s"], 3),
            "score": round(acc["rollout_s"] - acc["generate_s"], 3),
            "train": round(acc["train_s"], 3),
            "other": round(seconds - acc["rollout_s"] - acc["train_s"], 3),
        }
        figures["breakdown_cpu_s"] = {
            "generate": round(acc["generate_cpu_s"], 3),
            "score": round(acc["rollout_cpu_s"] - acc["generate_cpu_s"], 3),
            "train": round(acc["train_cpu_s"], 3),
        }
        figures["generate_s"] = round(acc["generate_s"], 3)
    return figures


# --------------------------------------------------------------------------------------
# parent: alternate fresh subprocesses, print medians
# --------------------------------------------------------------------------------------
def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output")


def wait_for_quiet(max_load: float | None, timeout: float) -> float | None:
    """Wait until the 1-minute load average is at most ``max_load`` (or ``timeout`` s pass); return the load."""
    load = loadavg()
    if max_load is None or load is None:
        return load
    deadline = time.monotonic() + timeout
    while load > max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = loadavg()
    return load


def run_child(cmd: list[str], label: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{label} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    out = last_json_line(proc.stdout)
    if label == "peer":
        # the episodes the peer really trained on, from TRL's own per-update logs (stderr):
        # one log row per update, each with the running episode count
        counts = [int(n) for n in re.findall(r"'episode': (\d+)", proc.stderr)]
        if counts:
            out["true_episodes"] = counts[-1]
            out["logged_updates"] = len(counts)
            out["true_episodes_per_s"] = round(counts[-1] / out["seconds"], 3)
    return out


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def summary(runs: list[dict]) -> dict:
    out = {k: median_of(runs, k) for k in ("episodes_per_s", "seconds", "peak_rss_mb", "gen_tokens", "generate_s",
                                           "true_episodes", "true_episodes_per_s")}
    out = {k: v for k, v in out.items() if v is not None}
    out["episodes"] = runs[0]["episodes"]
    out["system"] = runs[0]["system"]
    out["runs_episodes_per_s"] = [r["episodes_per_s"] for r in runs]
    out["runs_peak_rss_mb"] = [r["peak_rss_mb"] for r in runs]
    out["runs_loadavg_1min"] = [r.get("loadavg_1min") for r in runs]
    if all("breakdown_s" in r for r in runs):
        out["breakdown_s"] = {k: round(statistics.median(r["breakdown_s"][k] for r in runs), 3)
                              for k in runs[0]["breakdown_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="ppo_workload.json")
    parser.add_argument("--peer", help="python interpreter with trl 1.12 to run the peer script with")
    parser.add_argument("--peer-script", type=Path, default=PEER_SCRIPT, help="the peer script")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system (alternating); medians reported")
    parser.add_argument("--max-load", type=float, help="before each run, wait until the 1-min load average is at most this "
                        "(other jobs on a small machine distort 2-thread timings badly)")
    parser.add_argument("--max-wait", type=float, default=900, help="longest wait for --max-load, seconds")
    parser.add_argument("--threads", type=int, help="diagnostics only: override the workload's torch_threads (both systems)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workload = args.workload.resolve()

    if args.child:
        print(json.dumps(run_rlhfkit(workload, args.threads)), flush=True)
        return

    W = json.loads(workload.read_text())
    info = machine(W["torch_threads"])
    B, U, K = W["rollout_batch_size"], W["updates"], W["num_mini_batches"]
    M = W["model"]
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"python {info['python']}")
    print(f"workload: {workload}")
    print(f"  models: 4 x Llama hidden {M['hidden_size']}, {M['num_hidden_layers']} layers, {M['num_attention_heads']} heads, "
          f"ffn {M['intermediate_size']}, vocab {W['tokenizer']['vocab_size']}, fp32, seed {M['seed']}")
    print(f"  {U} updates x {B} episodes = {U * B}; response_length {W['response_length']}, T={W['temperature']}; "
          f"{W['ppo_epochs']} epoch x {K} minibatches of {B // K} = {U * W['ppo_epochs'] * K} optimizer steps; "
          f"prompts: last {W['prompts']['max_prompt_tokens']} tokens")
    print(f"  rlhfkit: train_ppo(PPOStageConfig(num_updates={U}, rollout_batch_size={B}, num_mini_batches={K}, "
          f"per_device_train_batch_size={B // K} (gradient accumulation 1), num_ppo_epochs={W['ppo_epochs']}, "
          f"rollout_forward_batch_size={B}, response_length={W['response_length']}, temperature={W['temperature']}, "
          f"missing_eos_penalty={W['missing_eos_penalty']}, kl_coef={W['kl_coef']}, learning_rate={W['learning_rate']}, "
          f"max_prompt_length={W['prompts']['max_prompt_tokens']}, seed=0, save_steps=0, sample_every=0, report_to=none), "
          f"models passed in memory; reference = train_ppo's deepcopy of the policy")
    print("  timing: elapsed_s of train_ppo's metrics.jsonl (its update loop only; models built before)")
    print(f"  repeats {args.repeats}, each in a fresh process" + (f", alternating with the peer ({args.peer})" if args.peer else ""))

    me = [sys.executable, str(Path(__file__).resolve()), "--workload", str(workload), "--child"]
    if args.threads:
        me += ["--threads", str(args.threads)]
        info["threads"] = args.threads
    peer_workload = workload
    if args.threads and args.peer:  # the same override for the peer: a copy of the workload file
        copy = dict(W, torch_threads=args.threads)
        handle, name = tempfile.mkstemp(prefix="ppo_workload_", suffix=".json")
        with os.fdopen(handle, "w") as f:
            json.dump(copy, f)
        peer_workload = Path(name)
    peer_cmd = [args.peer, str(args.peer_script.resolve()), str(peer_workload)] if args.peer else None
    ours, theirs = [], []
    for i in range(args.repeats):
        wait_for_quiet(args.max_load, args.max_wait)
        r = run_child(me, "rlhfkit")
        ours.append(r)
        print(f"[{i + 1}/{args.repeats}] rlhfkit: {r['episodes_per_s']:.2f} episodes/s, {r['seconds']:.2f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['gen_tokens']} tokens, load {r.get('loadavg_1min')}"
              + (f", breakdown {r['breakdown_s']}" if "breakdown_s" in r else ""), flush=True)
        if peer_cmd:
            load = wait_for_quiet(args.max_load, args.max_wait)
            p = run_child(peer_cmd, "peer")
            p["loadavg_1min"] = [load, loadavg()]
            theirs.append(p)
            print(f"[{i + 1}/{args.repeats}] peer:    {p['episodes_per_s']:.2f} episodes/s, {p['seconds']:.2f} s, "
                  f"true episodes {p.get('true_episodes')} in {p.get('logged_updates')} updates, "
                  f"peak RSS {p['peak_rss_mb']:.0f} MB, {p.get('gen_tokens')} tokens, generate {p.get('generate_s')} s, "
                  f"load {p['loadavg_1min']}",
                  flush=True)

    result = {**summary(ours), "repeats": args.repeats, "machine": info,
              "workload": {"updates": U, "rollout_batch_size": B, "num_mini_batches": K,
                           "ppo_epochs": W["ppo_epochs"], "response_length": W["response_length"]}}
    if theirs:
        peer = summary(theirs)
        result["peer"] = peer
        result["ratio_episodes_per_s"] = round(result["episodes_per_s"] / peer["episodes_per_s"], 3)
        result["ratio_peak_rss"] = round(result["peak_rss_mb"] / peer["peak_rss_mb"], 3)
        if peer.get("true_episodes_per_s"):
            result["ratio_vs_peer_true_episodes_per_s"] = round(result["episodes_per_s"] / peer["true_episodes_per_s"], 3)
        print(f"median rlhfkit {result['episodes_per_s']:.2f} episodes/s ({result['peak_rss_mb']:.0f} MB), "
              f"peer {peer['episodes_per_s']:.2f} episodes/s ({peer['peak_rss_mb']:.0f} MB): "
              f"ratio {result['ratio_episodes_per_s']:.2f}x")
    else:
        print(f"median rlhfkit {result['episodes_per_s']:.2f} episodes/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    result["system"] = "rlhfkit train_ppo"
    print(json.dumps(result))


if __name__ == "__main__":
    main()

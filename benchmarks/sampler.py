"""Speed of the rollout engine's CPU fast path against its generic path, same tokens required.

``rlhfkit.engine.sampling.sample`` has two optional pieces (``rlhfkit.engine.fast_cpu``):
the hand-written Llama decode step (``LlamaDecoder``) and the multinomial draw
(``multinomial_one``). This benchmark samples the same prompts with the same generator
seed four ways (both off = the generic path: the model's ``forward`` with a
``DynamicCache`` and ``torch.multinomial``; each piece alone; both on = what rlhfkit
uses), checks that every way gives the same tokens as the generic path and log-probs
within 1e-4 (float32 sums in another order: ~1e-6 apart),
and prints the median seconds per ``sample`` call and the speed-ups.

Models: the embedded world's Llama sizes (``tiny`` = the demo's policy, random weights:
the speed depends on the shapes, and random weights rarely stop early, so every call
samples the full length) and, with ``--model DIR``, any model folder (e.g.
``models/smollm2-135m`` from ``make models/smollm2-135m``).

    .venv/bin/python benchmarks/sampler.py [--sizes tiny,small] [--model models/smollm2-135m]
        [--batch 64] [--response-length 24] [--repeats 5] [--threads 2]

Stdout ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from machine import cpu_model, machine_line  # benchmarks/machine.py (scripts run from benchmarks/)


def world_model(size: str, vocab: int):
    """A Llama of the embedded world's ``size`` with random weights (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.world.model import MODEL_SIZES

    hidden, layers, heads, inter = MODEL_SIZES[size]
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=512,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def folder_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="sdpa").eval()


def run(model, name: str, batch: int, response_length: int, repeats: int) -> dict:
    import torch

    from rlhfkit.engine import fast_cpu, sampling

    vocab = model.config.vocab_size
    data = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 41, (batch,), generator=data).tolist()  # left padding, as real prompts have
    prompts = [torch.randint(3, vocab, (n,), generator=data).tolist() for n in lengths]
    ids, mask = sampling.left_pad(prompts, 0)
    eos = 2

    class NoDecoder:
        @staticmethod
        def for_model(model):
            return None

    real_decoder, real_ok = sampling.LlamaDecoder, sampling.fast_multinomial_ok
    ways = {"generic": (False, False), "fast_decoder": (True, False), "fast_multinomial": (False, True),
            "both (rlhfkit)": (True, True)}
    results, outputs = {}, {}
    try:
        for way, (decoder, multinomial) in ways.items():
            sampling.LlamaDecoder = real_decoder if decoder else NoDecoder
            sampling.fast_multinomial_ok = real_ok if multinomial else (lambda: False)
            times = []
            for r in range(repeats + 1):  # the first call warms up
                start = time.perf_counter()
                tokens, logprobs = sampling.sample(model, ids, mask, response_length, 1.0, eos, 0,
                                                   torch.Generator().manual_seed(r))
                if r:
                    times.append(time.perf_counter() - start)
                outputs.setdefault(way, []).append((tokens, logprobs))
            results[way] = statistics.median(times)
    finally:
        sampling.LlamaDecoder, sampling.fast_multinomial_ok = real_decoder, real_ok
    # the same tokens, and log-probs equal up to float32 summation order (the fast decode step adds
    # the same products in another order: ~1e-6 apart); a row whose tokens differ counts as different
    pairs = [(t, lp, g) for way in ways for (t, lp), g in zip(outputs[way], outputs["generic"])]
    rows_differing = sum(int((t != g[0]).any(-1).sum()) for t, lp, g in pairs)
    max_logprob_diff = max(float((lp - g[1]).abs().max()) for t, lp, g in pairs)
    same = rows_differing == 0 and max_logprob_diff < 1e-4
    tokens = int(outputs["generic"][-1][0].numel())
    return {"model": name, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "fast_path_taken": fast_cpu.LlamaDecoder.for_model(model) is not None, "batch": batch,
            "response_length": response_length, "tokens_per_call": tokens, "same_tokens_and_logprobs": same,
            "rows_with_other_tokens": rows_differing, "max_logprob_diff": max_logprob_diff,
            "median_s": {k: round(v, 4) for k, v in results.items()},
            "speedup_vs_generic": {k: round(results["generic"] / v, 2) for k, v in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small", help="embedded-world sizes, comma-separated")
    parser.add_argument("--model", action="append", default=[], help="a model folder (repeatable)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    print(f"{machine_line()}; torch {torch.__version__}, {args.threads} threads")
    print(f"method: sample() on {args.batch} random prompts of 8-40 tokens (left-padded), {args.response_length} "
          f"tokens at T=1, median of {args.repeats} calls after one warm-up; each way's tokens and log-probs "
          f"compared with the generic path's (same generator seeds; log-probs within 1e-4)")
    rows = []
    models = [(f"world-{s}", lambda s=s: world_model(s, 4096)) for s in args.sizes.split(",") if s]
    models += [(path, lambda path=path: folder_model(path)) for path in args.model]
    for name, build in models:
        row = run(build(), name, args.batch, args.response_length, args.repeats)
        rows.append(row)
        times = ", ".join(f"{k} {v:.3f} s ({row['speedup_vs_generic'][k]:.2f}x)" for k, v in row["median_s"].items())
        print(f"{name} ({row['parameters_m']} M params, fast path {'taken' if row['fast_path_taken'] else 'not taken'}, "
              f"same tokens and log-probs: {row['same_tokens_and_logprobs']}): {times}")
    print(json.dumps({"benchmark": "sampler", "cpu": cpu_model(), "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()

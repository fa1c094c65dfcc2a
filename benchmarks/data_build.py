"""Benchmark of ``rlhfkit data build`` at Open Assistant 2 size (~135k messages).

Builds the export by re-identifying copies of the real 100-tree sample (fresh
message_tree_id / message_id / parent_id per copy), then measures:
  - the wall time of merely parsing the file with ``json.loads`` line by line (baseline),
    and, for comparison, with the build's own decoder (msgspec, straight to ``TreeRow``
    structs, skipping the fields the build does not read),
  - the wall time of ``build_data`` (in a fresh subprocess, so its peak RSS is the build's)
    into a new folder (replacing an existing one would add its removal),
  - messages/s, the ratio build / baseline, and the peak RSS.
Target: ratio <= 3 and peak RSS <= 1.5 GB. Prints one JSON line at the end.

    .venv/bin/python benchmarks/data_build.py [--messages 135000] [--repeat 3] [--gzip]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from rlhfkit.data.oasst import TreeRow

from machine import machine_line  # benchmarks/machine.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared/data/oasst/oasst_en_100_trees.jsonl"
TARGET_RATIO = 3.0
TARGET_RSS_MB = 1536

# The libraries are imported before the clock starts: their import is a fixed cost
# (reported apart), not a cost per message. Peak RSS includes them.
_BUILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import datasets, pyarrow
from rlhfkit.data import DataBuildConfig, build_data
imports = time.perf_counter() - t0
config = DataBuildConfig(**json.loads(sys.argv[1]))
t0, c0 = time.perf_counter(), time.process_time()
stats = build_data(config).metrics
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "cpu": cpu, "imports": imports, "rss_mb": rss_kb / 1024, "stats": stats}))
"""


def _reidentify(message: dict, suffix: str) -> None:
    stack = [message]
    while stack:
        m = stack.pop()
        m["message_id"] = m["message_id"] + suffix
        if m.get("parent_id"):
            m["parent_id"] = m["parent_id"] + suffix
        stack.extend(m.get("replies") or [])


def write_export(path: Path, messages: int) -> tuple[int, int]:
    """Copies of the sample with new ids until ``messages`` is reached; returns (trees, messages)."""
    trees = [json.loads(line) for line in SAMPLE.open(encoding="utf-8")]
    per_copy = sum(_count(t["prompt"]) for t in trees)
    copies = -(-messages // per_copy)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for c in range(copies):
            suffix = f"-{c:05d}"
            for tree in trees:
                tree = json.loads(json.dumps(tree))
                tree["message_tree_id"] += suffix
                _reidentify(tree["prompt"], suffix)
                f.write(json.dumps(tree, ensure_ascii=False) + "\n")
    return copies * len(trees), copies * per_copy


def _count(message: dict) -> int:
    return 1 + sum(_count(r) for r in message.get("replies") or [])


def parse_seconds(path: Path, loads=json.loads) -> tuple[float, float]:
    """The floor: read and ``loads`` every line, nothing else. (wall, CPU) seconds."""
    opener = gzip.open if path.suffix == ".gz" else open
    t0, c0 = time.perf_counter(), time.process_time()
    with opener(path, "rb") as f:
        for line in f:
            loads(line)
    return time.perf_counter() - t0, time.process_time() - c0


def build_once(config: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _BUILD, json.dumps(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=135_000, help="approximate size of the export")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts")
    parser.add_argument("--gzip", action="store_true", help="benchmark a .jsonl.gz export")
    args = parser.parse_args()
    if not SAMPLE.is_file():
        sys.exit(f"the real sample is needed and absent: {SAMPLE}")

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-") as tmp:
        export = Path(tmp) / ("oasst2_like.jsonl.gz" if args.gzip else "oasst2_like.jsonl")
        trees, messages = write_export(export, args.messages)
        size_mb = export.stat().st_size / 2**20
        config = {"sources": [str(export)], "val_fraction": 0.05, "seed": 0}
        print(f"config: {trees} trees, {messages} messages, {size_mb:.0f} MB {export.name}; "
              f"DataBuildConfig {json.dumps({k: v for k, v in config.items() if k != 'sources'})}; "
              f"best of {args.repeat}")  # fmt: skip

        # Interleaved, so that a busy neighbour slows both measurements alike.
        parses, decodes, runs = [], [], []
        for i in range(args.repeat):
            parses.append(parse_seconds(export))
            decodes.append(parse_seconds(export, msgspec.json.Decoder(TreeRow).decode)[0])
            out = Path(tmp) / f"out{i}"  # a new folder each time: replacing an old one is not the build
            runs.append(build_once({**config, "out": str(out)}))
            shutil.rmtree(out)
        parse, parse_cpu = min(p[0] for p in parses), min(p[1] for p in parses)
        decode = min(decodes)
        build, build_cpu = min(r["seconds"] for r in runs), min(r["cpu"] for r in runs)
        imports = min(r["imports"] for r in runs)
        rss = max(r["rss_mb"] for r in runs)
        stats = runs[0]["stats"]

    ratio, cpu_ratio = build / parse, build_cpu / parse_cpu
    load = os.getloadavg()[0]
    result = {
        "trees": trees,
        "messages": messages,
        "sft_examples": stats["sft_examples"],
        "pairs": stats["pairs"],
        "parse_seconds": round(parse, 3),
        "decode_seconds": round(decode, 3),
        "build_seconds": round(build, 3),
        "import_seconds": round(imports, 3),
        "messages_per_second": round(messages / build),
        "ratio": round(ratio, 2),
        "parse_cpu_seconds": round(parse_cpu, 3),
        "build_cpu_seconds": round(build_cpu, 3),
        "cpu_ratio": round(cpu_ratio, 2),
        "load_average": round(load, 2),
        "peak_rss_mb": round(rss),
        "ratio_ok": ratio <= TARGET_RATIO,
        "rss_ok": rss <= TARGET_RSS_MB,
    }
    print(f"json.loads only: {parse:.2f} s wall, {parse_cpu:.2f} s CPU")
    print(f"decode only:     {decode:.2f} s wall  (the build's decoder: msgspec to TreeRow structs)")
    print(f"build_data:      {build:.2f} s wall, {build_cpu:.2f} s CPU  ({messages / build:,.0f} messages/s)")
    print(f"imports:         {imports:.2f} s  (once per process, not counted)")
    print(f"ratio:           {ratio:.2f} wall, {cpu_ratio:.2f} CPU  (target <= {TARGET_RATIO})")
    print(f"load average:    {load:.2f} on {os.cpu_count()} cores (other processes inflate wall times)")
    print(f"peak RSS:        {rss:.0f} MB  (target <= {TARGET_RSS_MB} MB)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Compare quantization algorithms on one model: time, peak memory and perplexity.

    python scripts/bench_algorithms.py --algos rtn,gptq --w-dtype int4 --groupsize 128 \\
        --num-calibrate 128 --seq-length 512 --eval-windows 20

Each algorithm runs as its own ``scripts/run.py`` process (the production path, with the
defaults of ``conf/``), so the peak resident memory is that run's alone; the numbers come from
each run's ``results.json``. A float16 row (no quantization) is measured in the same bench as
the baseline the perplexity ratio refers to (``--no-baseline`` skips it). Prints a markdown
table and writes it next to the runs (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantkit.algorithms.registry import algorithm_config_class, algorithm_names

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "float16"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="rtn,gptq", help="comma-separated registered algorithm names")
    p.add_argument("--w-dtype", default="int4", help="conf/w_dtype name, e.g. int3, int4, fp4")
    p.add_argument("--a-dtype", default="float16", help="conf/a_dtype name (float16: weight-only)")
    p.add_argument("--groupsize", type=int, default=128, help="algo.groupsize; -1 = per channel")
    p.add_argument("--num-calibrate", type=int, default=128, help="calibration samples")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--eval-windows", type=int, default=None, help="perplexity windows (default: all)")
    p.add_argument("--model", default="smollm2-135m", help="conf/model name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-baseline", action="store_true", help="skip the float16 row")
    p.add_argument("--out", type=Path, default=None, help="run folders (default outputs/bench/<time>)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every quantized run (repeatable)")
    args = p.parse_args(argv)
    args.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    valid = algorithm_names()
    unknown = [a for a in args.algos if a not in valid]
    if unknown:
        p.error(f"unknown algorithm(s) {', '.join(unknown)}; registered: {', '.join(valid)}")
    return args


def overrides(args: argparse.Namespace, algo: str | None, run_dir: Path) -> list[str]:
    """Hydra overrides of one run; ``algo=None`` is the float16 baseline."""
    common = [
        f"model={args.model}", f"num_calibrate={args.num_calibrate}",
        f"calibrate_seq_length={args.seq_length}", f"device={args.device}", "eval.baseline=false",
        f"eval.max_windows={'null' if args.eval_windows is None else args.eval_windows}",
        f"hydra.run.dir={run_dir}",
    ]
    if algo is None:
        return ["algo=rtn", "w_dtype=float16", "a_dtype=float16", *common]
    fields = {f.name for f in dataclasses.fields(algorithm_config_class(algo))}
    group = [f"algo.groupsize={args.groupsize}"] if "groupsize" in fields else []
    return [f"algo={algo}", f"w_dtype={args.w_dtype}", f"a_dtype={args.a_dtype}", *group, *common, *args.override]


def run_one(args: argparse.Namespace, algo: str | None, run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "scripts" / "run.py"), *overrides(args, algo, run_dir)]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{algo or BASELINE} failed (exit {proc.returncode}); see {log.name}")
    results = json.loads((run_dir / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - t0
    return results


def table(rows: list[dict[str, Any]], baseline: float | None) -> str:
    head = ["algo", "w_dtype", "groupsize", "quantize s", "peak RSS MiB", "peak GPU MiB", "perplexity", "vs float16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        quantized = r["w_scheme"] is not None
        gpu = r.get("peak_cuda_bytes")
        ratio = f"{r['perplexity'] / baseline:.3f}x" if baseline else "-"
        lines.append("| " + " | ".join([
            r["algo"] if quantized else BASELINE, r["w_dtype"],
            str(r["groupsize"]) if quantized and r["groupsize"] is not None else "-",
            f"{r['quantization_seconds']:.1f}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{gpu / 2**20:.0f}" if gpu else "-", f"{r['perplexity']:.3f}", ratio,
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or ROOT / "outputs" / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    runs: list[str | None] = ([] if args.no_baseline else [None]) + args.algos
    rows = [run_one(args, algo, out / (algo or BASELINE)) for algo in runs]
    baseline = None if args.no_baseline else rows[0]["perplexity"]
    windows = rows[0]["eval"]["windows"]
    text = (f"{args.model}, calibration {args.num_calibrate} x {args.seq_length} tokens, "
            f"perplexity on {windows} windows, device {rows[0]['device_name']}\n\n{table(rows, baseline)}\n")
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: timers, copy-bandwidth references, peaks, reports.

Timing on a GPU (all in milliseconds, median with p20/p80):

* ``do_bench``: :func:`triton.testing.do_bench` with ``quantiles=[0.5, 0.2, 0.8]``; it clears
  the L2 cache before every call, so weights come from HBM as they do in a model.
* ``graph xN``: for calls that launch a few microseconds of work (decode-sized M), the host
  would dominate ``do_bench``. N independent operand sets (clones, together at least
  :data:`ROTATE_BYTES`, several times the L2) are called once each inside one CUDA graph;
  every replay is timed with CUDA events and divided by N. Each call then reads operands the
  L2 no longer holds, without host launch overhead.

On a CPU the same functions time wall clock (a smoke run: the Triton interpreter is timed,
not a kernel).

"% of copy" compares a row's bandwidth with a device-to-device copy that moves about as many
bytes, timed the same way in the same process (:class:`CopyReference`); "% of peak" uses the
dense tensor-core peaks of :data:`PEAK_TFLOPS`, looked up by device name ("n/a" elsewhere).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s (int8: TOPS) from the vendors' datasheets,
# SXM parts. Keyed by torch.cuda.get_device_name(); other devices print "n/a".
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"fp16": 989.0, "bf16": 989.0, "fp8": 1979.0, "int8": 1979.0},
    "NVIDIA H100 80GB HBM3": {"fp16": 989.0, "bf16": 989.0, "fp8": 1979.0, "int8": 1979.0},
}
ROTATE_BYTES = 256 << 20  # operand bytes one graph replay walks through (H200 L2: 60 MB)
GRAPH_MAX_COPIES = 64
DO_BENCH_WARMUP_MS = 10
DO_BENCH_REP_MS = 50
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, 20th and 80th percentile, and how they were taken."""

    median: float
    p20: float
    p80: float
    method: str


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q`` quantile of ``values`` (0 <= q <= 1)."""
    data = sorted(values)
    if not data:
        raise ValueError("quantile of no values")
    pos = q * (len(data) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _timing(samples: Sequence[float], method: str) -> Timing:
    return Timing(*(quantile(samples, q) for q in QUANTILES), method)


def time_cpu(fn: Callable[[], object], reps: int) -> Timing:
    """Wall-clock milliseconds of ``fn`` after one untimed warm-up call."""
    fn()
    samples = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _timing(samples, f"wall x{len(samples)}")


def time_do_bench(fn: Callable[[], object]) -> Timing:
    """``triton.testing.do_bench`` (L2 cleared before every call)."""
    import triton.testing

    got = triton.testing.do_bench(
        fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS, quantiles=list(QUANTILES)
    )
    median, p20, p80 = (float(v) for v in got)
    return Timing(median, p20, p80, "do_bench")


def graph_copies(nbytes: int) -> int:
    """How many operand sets of ``nbytes`` one graph replay cycles through."""
    return max(1, min(GRAPH_MAX_COPIES, math.ceil(ROTATE_BYTES / max(1, nbytes))))


def time_graph(fns: Sequence[Callable[[], object]], target_ms: float = 40.0) -> Timing:
    """Per-call milliseconds of ``fns`` (each called once per replay) inside one CUDA graph.

    The calls run once eagerly on a side stream first (Triton compiles and caches there, never
    inside the capture), then are captured in order; each replay is timed with CUDA events.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()  # warm-up and a first estimate of the replay time
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    replays = int(min(200, max(10, target_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(replays)]
    for s, e in events:
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) / len(fns) for s, e in events]
    del graph
    return _timing(samples, f"graph x{len(fns)}")


def time_call(
    make: Callable[[], Callable[[], object]], nbytes: int, on_gpu: bool, graph: bool, reps: int
) -> Timing:
    """Time the call that ``make()`` returns (each ``make()`` builds an independent operand set).

    ``graph`` selects :func:`time_graph` over :func:`graph_copies` operand sets on a GPU; if
    the capture fails (an op that synchronises with the host) it falls back to ``do_bench``
    and says so in ``method``.
    """
    if not on_gpu:
        return time_cpu(make(), reps)
    if graph:
        try:
            return time_graph([make() for _ in range(graph_copies(nbytes))])
        except Exception as exc:  # noqa: BLE001 - capture errors vary by op; fall back and say why
            torch.cuda.synchronize()
            timing = time_do_bench(make())
            reason = f"{type(exc).__name__}: {exc}".replace("|", "/").splitlines()[0][:80]
            return dataclasses.replace(timing, method=f"do_bench (graph failed: {reason})")
    return time_do_bench(make())


class CopyReference:
    """GB/s of device-to-device copies that move about ``nbytes`` (read + written), measured
    with the same timer as the rows they are compared with, cached per size class."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device = device
        self.reps = reps
        self.measured: dict[tuple[int, bool], float] = {}

    def gbs(self, nbytes: int, graph: bool) -> float:
        half = max(1 << 20, 1 << max(0, math.ceil(math.log2(max(1, nbytes // 2)))))
        key = (half, graph and self.device.type == "cuda")
        if key not in self.measured:
            self.measured[key] = self._measure(half, key[1])
        return self.measured[key]

    def _measure(self, half: int, graph: bool) -> float:
        def make() -> Callable[[], object]:
            src = torch.empty(half, dtype=torch.uint8, device=self.device).random_(0, 256)
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)

        timing = time_call(make, 2 * half, self.device.type == "cuda", graph, self.reps)
        return 2 * half / timing.median / 1e6

    def describe(self) -> str:
        """One line per measured size: ``copy 2 x 8 MiB (graph): 3900 GB/s``."""
        parts = []
        for (half, graph), gbs in sorted(self.measured.items()):
            how = "graph" if graph else ("do_bench" if self.device.type == "cuda" else "wall")
            parts.append(f"{fmt_bytes(half)} ({how}): {gbs:.0f} GB/s")
        return "; ".join(parts) if parts else "none measured"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def peak_tflops(device_name: str, kind: str) -> float | None:
    """Dense peak of ``kind`` (fp16/bf16/fp8/int8) on ``device_name``, None when unknown."""
    return PEAK_TFLOPS.get(device_name, {}).get(kind)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def format_config(cfg: object) -> str:
    """Compact form of a MatmulConfig-like dataclass: ``bm16 bn64 bk128 sk4 gm8 w4 s3``."""
    if cfg is None:
        return "-"
    if not dataclasses.is_dataclass(cfg):
        return str(cfg)
    short = {"block_m": "bm", "block_n": "bn", "block_k": "bk", "split_k": "sk",
             "group_m": "gm", "num_warps": "w", "num_stages": "s"}
    parts = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        parts.append(f"{short[f.name]}{value}" if f.name in short else f"{f.name}={value}")
    return " ".join(parts)


def environment(device: torch.device) -> list[str]:
    """Markdown bullet lines: device, date, versions."""
    import triton

    lines = [
        f"- device: {device_name(device)}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {triton.__version__}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- {props.multi_processor_count} SMs, capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        )
    return lines


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]],
                   align_right: Sequence[bool] | None = None) -> str:
    """A markdown table; ``|`` inside cells is escaped."""
    align = align_right or [False] * len(header)
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if r else "---" for r in align) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(out)


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    """``n/a`` for None or non-finite values, else ``format(value, spec) + suffix``."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:{spec}}{suffix}"


class Deadline:
    """Seconds left of a time budget (``None``: unlimited)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


class Report:
    """Markdown sections plus JSON rows, rewritten to disk after every update so that a run
    stopped by a time limit leaves everything measured so far."""

    def __init__(self, markdown: Path | None, json_path: Path | None) -> None:
        self.markdown, self.json_path = markdown, json_path
        self.sections: dict[str, str] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.meta: dict[str, Any] = {}

    def set(self, key: str, text: str) -> None:
        """Add the section ``key`` at the end, or replace its text where it stands."""
        self.sections[key] = text
        self.flush()

    def add(self, text: str) -> None:
        self.set(f"_{len(self.sections)}", text)

    def add_row(self, table: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(table, []).append(row)

    def text(self) -> str:
        return "\n".join(self.sections.values()) + "\n"

    def flush(self) -> None:
        if self.markdown is not None:
            _write_atomic(self.markdown, self.text())
        if self.json_path is not None:
            payload = {"meta": self.meta, "tables": self.rows}
            _write_atomic(self.json_path, json.dumps(payload, indent=1, default=str))


def finish(report: Report, kernels_json: Path | None, on_gpu: bool) -> str:
    """Write the compiled kernels the run loaded (GPU only) to ``kernels_json``, print the
    report and return its text: the common end of the benchmark scripts."""
    if kernels_json is not None and on_gpu:
        from kernel_inventory import loaded_kernels

        kernels_json.write_text(json.dumps(loaded_kernels(), indent=1, default=str))
    text = report.text()
    print(text)
    return text


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary_stats(samples: Sequence[float]) -> dict[str, float]:
    """mean, p10, p50, p90 of ``samples``."""
    return {"mean": statistics.fmean(samples), "p10": quantile(samples, 0.1),
            "p50": quantile(samples, 0.5), "p90": quantile(samples, 0.9)}

"""Benchmark quantkit's Triton kernels against the torch reference and vendor kernels.

Two tables, all measured in one process (timers and references: ``scripts/benchlib.py``):

1. **Element-wise ops** (``quantize``, ``dequantize``, ``pack_codes``, ``unpack_codes``) with
   ``backend="triton"`` and ``backend="torch"`` on the same device: median ms (p20-p80),
   speed-up, GB/s of the minimal traffic and its share of a device-to-device copy of about as
   many bytes ("% copy": these ops are memory bound), and whether both backends returned
   identical tensors (the contract of :mod:`quantkit.ops`).
2. **Matmuls** at M in {1, 16, 128, 4096} on (N, K) = 4096x4096, 14336x4096, 4096x14336 with
   float16 and bfloat16 activations (``scripts/bench_matmul_cases.py`` lists the rows): dense
   cuBLAS, quantkit's dequant GEMM/GEMV on int2/int3/int4/int8/fp4/fp8 weight grids, W8A8 int8
   and fp8 (GEMM on given codes, and the whole ``QuantLinear`` forward with the per-token
   activation quantization), SmoothQuant's fused smoothing + quantization, and
   ``torch._int_mm`` / ``torch._scaled_mm`` / ``torch._weight_int4pack_mm``, and (extra
   ``gemv_block_n``, M <= 4) the decode GEMV with other rows per program than the planner's
   (``bench_matmul_cases.GEMV_BLOCK_NS``: an A/B the static sm90 numbers cannot settle). Columns: the config
   the dispatcher chose, the timer (rows with M <= 16 replay a CUDA graph over operand copies
   larger than the L2, so neither the host nor the L2 flatters them; others use ``do_bench``),
   median ms (p20-p80), GB/s and % copy, TFLOP/s (TOPS for int8) and % of the dense peak of
   this GPU ("n/a" for GPUs not in ``benchlib.PEAK_TFLOPS``), speed-up over dense cuBLAS in
   the same dtype, and the error against the reference (max |err| / max |ref|; "exact" where
   bits must match).
3. **Online Hadamard** (rotated models, ``quantkit.hadamard``): the Triton FWHT of M rows of
   width n (K x 2^j widths such as 11008 = 172 x 64 and 14336 = 28 x 512 include torch's chunk
   mix), alone and fused with the per-token int8 quantization that follows it, against the
   dense ``x @ H`` (cuBLAS in the activation dtype) and the torch reference (butterflies); GB/s,
   % copy, speed-up over ``x @ H`` and whether the result equals the reference bit for bit.

On a CPU it is a smoke run in seconds: tiny shapes, the Triton interpreter when
``TRITON_INTERPRET=1`` (timings measure the interpreter), vendor rows that need CUDA skipped
with the reason.

Usage::

    python scripts/bench_kernels.py                          # GPU: everything (several minutes)
    python scripts/bench_kernels.py --preset check           # GPU: the subset make gpu-check runs
    python scripts/bench_kernels.py --shapes 4096x4096 --m 1,16 --dtypes bf16 --grids int4-g128-asym
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --quick --markdown bench.md   # CPU smoke

``--markdown`` / ``--json`` are rewritten after every row, so a run stopped by ``--deadline``
(or killed) leaves what it measured; ``--kernels-json`` lists the compiled kernels it ran
(``scripts/kernel_inventory.py``: registers, spills, SASS summary).
"""

from __future__ import annotations

import argparse
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bench_matmul_cases as cases
from benchlib import (
    CopyReference, Deadline, Report, Timing, environment, finish, fmt, markdown_table, peak_tflops,
    time_call,
)
from quantkit import ops
from quantkit.scheme import QuantScheme

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
CPU_SHAPES = [(64, 256), (13, 576)]
GPU_M = (1, 16, 128, 4096)
CPU_M = (1, 16)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
OP_SCHEMES = [
    QuantScheme("int4", "per_group", groupsize=128, has_zero=True),
    QuantScheme("int8", "per_channel"),
    QuantScheme("fp8", "per_tensor"),
    QuantScheme("int4", "per_token"),
    QuantScheme("int8", "per_token"),
]
PACK_BITS = (3, 4, 8)
ALL_GRIDS = tuple(cases.GRIDS)
W4 = ("int4-g128-asym",)
# (shape, dtype, grids, extras) blocks of the gpu-check subset, most informative first (a
# deadline cuts the last ones): everything the targets of issue 12 need, then the other grids.
CHECK_PLAN = [
    ((4096, 4096), "fp16", ("int4-g128-asym", "int8-channel"), cases.EXTRAS),
    ((14336, 4096), "fp16", W4, ("w8a8", "vendor", "gemv_block_n")),
    ((4096, 4096), "fp16", ("int4-g128", "int3-g128-asym", "int2-g128-asym", "fp4-g32",
                            "fp8-channel"), ()),
    ((4096, 4096), "bf16", W4, ("vendor",)),
    ((4096, 14336), "fp16", W4, ("w8a8",)),
    ((4096, 4096), "fp16", cases.BLOCK_GRIDS, ()),  # block-scaled formats (issue 16)
]


def _bit_equal(a: object, b: object) -> bool:
    if isinstance(a, tuple):
        return all(_bit_equal(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def op_cases(shape: tuple[int, int], device: torch.device) -> list[tuple[str, str, int, Callable]]:
    """``(op, scheme label, minimal bytes, run(backend))`` of every element-wise op."""
    rows, cols = shape
    x = torch.randn(shape, dtype=torch.float16, device=device)  # (rows, cols)
    out = []
    for scheme in OP_SCHEMES:
        codes, scale, zero = ops.quantize(x, scheme, backend="torch")
        out.append(("quantize", scheme.describe(), _tensor_bytes(x, codes, scale, zero),
                    lambda b, s=scheme: ops.quantize(x, s, backend=b, check_finite=False)))
        out.append(("dequantize", scheme.describe(), _tensor_bytes(codes, scale, zero, x),
                    lambda b, s=scheme, c=codes, sc=scale, z=zero: ops.dequantize(
                        c, sc, z, s, torch.float16, backend=b)))
    for bits in PACK_BITS:
        lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
        codes = torch.randint(lo, hi, shape, dtype=torch.int8, device=device)  # (rows, cols)
        packed = ops.pack_codes(codes, bits, backend="torch")  # (rows, ceil(cols / 8) * bits)
        moved = _tensor_bytes(codes, packed)
        out.append(("pack_codes", f"int{bits}", moved,
                    lambda b, c=codes, n=bits: ops.pack_codes(c, n, backend=b)))
        out.append(("unpack_codes", f"int{bits}", moved,
                    lambda b, p=packed, n=bits: ops.unpack_codes(p, n, cols, True, backend=b)))
    return out


def bench_ops(shapes: list[tuple[int, int]], ctx: dict[str, Any]) -> None:
    """Table 1, written into ``ctx["report"]`` row by row."""
    report, device, copy = ctx["report"], ctx["device"], ctx["copy"]
    on_gpu, use_triton, reps = device.type == "cuda", ctx["use_triton"], ctx["reps"]
    lines: list[list[object]] = []
    header = ["op", "shape", "scheme", "triton ms (p20-p80)", "torch ms", "speed-up", "GB/s",
              "% copy", "bit-exact"]

    def render(note: str = "") -> None:
        table = markdown_table(header, lines, [False] * 3 + [True] * 5 + [False])
        report.set("ops", f"## Element-wise ops: Triton vs torch\n\n{table}\n{note}")

    for shape in shapes:
        for op, label, moved, run in op_cases(shape, device):
            if ctx["deadline"].expired():
                render(f"\n(stopped at the time budget before {op} {label} {shape})\n")
                return
            torch_t = time_call(lambda r=run: (lambda: r("torch")), moved, on_gpu, False, reps)
            tri: Timing | None = None
            exact = None
            if use_triton:
                tri = time_call(lambda r=run: (lambda: r("triton")), moved, on_gpu, False, reps)
                exact = _bit_equal(run("triton"), run("torch"))
            best = tri or torch_t
            gbs = moved / best.median / 1e6
            pct = 100 * gbs / copy.gbs(moved, False)
            report.add_row("ops", dict(op=op, shape=list(shape), scheme=label, moved=moved,
                                       triton_ms=tri and tri.median, torch_ms=torch_t.median,
                                       gbs=gbs, pct_copy=pct, exact=exact))
            lines.append([
                op, f"{shape[0]}x{shape[1]}", label,
                "n/a" if tri is None else f"{tri.median:.4f} ({tri.p20:.4f}-{tri.p80:.4f})",
                f"{torch_t.median:.4f}", "n/a" if tri is None else f"{torch_t.median / tri.median:.2f}x",
                f"{gbs:.1f}", f"{pct:.1f}%", {None: "n/a", True: "yes", False: "NO"}[exact],
            ])
            render()


def _block_cases(x: torch.Tensor, w: torch.Tensor, grids: tuple[str, ...],
                 extras: tuple[str, ...], backend: str) -> list[Callable[[], Any]]:
    """Deferred builders of the rows of one (M, N, K, dtype): each may fail on its own."""
    builders: list[Callable[[], Any]] = [lambda: cases.dense_case(x, w)]
    if backend == "triton":
        builders += [lambda g=g: cases.dequant_case(x, w, g, backend) for g in grids]
        if "w8a8" in extras:
            builders.append(lambda: cases.w8a8_cases(x, w, backend, fp8=False))
        if "fp8" in extras:
            builders.append(lambda: cases.w8a8_cases(x, w, backend, fp8=True))
        if "smoothquant" in extras:
            builders.append(lambda: cases.smoothquant_cases(x, w, backend))
        if "gemv_block_n" in extras:  # on the block's first grid (int4 g128 asym in the presets)
            builders += [lambda g=g: cases.gemv_block_n_cases(x, w, g, backend) for g in grids[:1]]
    if "vendor" in extras:
        builders.append(lambda: cases.vendor_cases(x, w))
    return builders


def bench_matmul_block(shape: tuple[int, int], dtype_name: str, ms: tuple[int, ...],
                       grids: tuple[str, ...], extras: tuple[str, ...], ctx: dict[str, Any]) -> None:
    """Every row of one (N, K, dtype) block, for every M; one markdown table per block."""
    report, device, copy = ctx["report"], ctx["device"], ctx["copy"]
    on_gpu, reps = device.type == "cuda", ctx["reps"]
    backend = "triton" if ctx["use_triton"] else "torch"
    dtype = DTYPES[dtype_name]
    n, k = shape
    ctx["blocks"] = ctx.get("blocks", 0) + 1
    key = f"mm block {ctx['blocks']}"  # the same shape may come back with other grids
    lines: list[list[object]] = []
    header = ["kernel", "M", "config", "timer", "ms (p20-p80)", "GB/s", "% copy", "TFLOP/s",
              "% peak", "vs cuBLAS", "err", "note"]

    def render(note: str = "") -> None:
        table = markdown_table(header, lines, [False, True, False, False] + [True] * 7 + [False])
        report.set(key, f"### {n}x{k} (N x K), {dtype_name} activations\n\n{table}\n{note}")

    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)  # (N, K)
    for m in ms:
        x = torch.randn(m, k, device=device).to(dtype)  # (M, K)
        graph = on_gpu and m <= 16
        dense_ms = None
        for build in _block_cases(x, w, grids, extras, backend):
            if ctx["deadline"].expired():
                render(f"\n(stopped at the time budget at M={m})\n")
                return
            try:
                built = build()
            except Exception as exc:  # noqa: BLE001 - one broken row must not end the table
                lines.append(["(row failed to build)", m, "-", "-", "-", "-", "-", "-", "-",
                              "-", "-", f"{type(exc).__name__}: {exc}"[:160]])
                ctx["failures"].append(traceback.format_exc())
                render()
                continue
            for case in built if isinstance(built, list) else [built]:
                row = _measure(case, m, n, k, graph, on_gpu, reps, copy, ctx)
                if case.kind == "dense" and row.get("ms") is not None:
                    dense_ms = row["ms"]
                timed = row.get("ms") is not None and case.flops > 0  # a matmul, not a quantizer
                speedup = dense_ms / row["ms"] if timed and dense_ms is not None else None
                row.update(shape=[n, k], dtype=dtype_name, m=m, speedup_vs_cublas=speedup)
                report.add_row("matmul", row)
                lines.append(_matmul_line(case, row, m))
                render()


def _measure(case: cases.Case, m: int, n: int, k: int, graph: bool, on_gpu: bool, reps: int,
             copy: CopyReference, ctx: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = dict(kernel=case.label, kind=case.kind, config=case.config,
                               err=case.err, exact=case.exact, note=case.note, nbytes=case.nbytes)
    if case.make is None:
        return row
    try:
        t = time_call(case.make, case.nbytes, on_gpu, graph, reps)
    except Exception as exc:  # noqa: BLE001
        row["note"] = f"timing failed: {type(exc).__name__}: {exc}"[:160]
        ctx["failures"].append(traceback.format_exc())
        return row
    gbs = case.nbytes / t.median / 1e6
    tflops = case.flops / t.median / 1e9 if case.flops else None
    peak = peak_tflops(ctx["device_name"], case.peak)
    row.update(ms=t.median, p20=t.p20, p80=t.p80, timer=t.method, gbs=gbs,
               pct_copy=100 * gbs / copy.gbs(case.nbytes, graph), tflops=tflops,
               pct_peak=None if tflops is None or peak is None else 100 * tflops / peak)
    return row


def _matmul_line(case: cases.Case, row: dict[str, Any], m: int) -> list[object]:
    if row.get("ms") is None:
        return [case.label, m, case.config, "-", "skipped", "-", "-", "-", "-", "-", "-",
                row["note"]]
    err = ({True: "exact", False: "NOT exact"}[case.exact] if case.exact is not None
           else fmt(case.err, ".1e"))
    return [
        case.label, m, case.config, row["timer"],
        f"{row['ms']:.4f} ({row['p20']:.4f}-{row['p80']:.4f})", f"{row['gbs']:.1f}",
        fmt(row["pct_copy"], ".1f", "%"), fmt(row["tflops"], ".1f"),
        fmt(row["pct_peak"], ".1f", "%"), fmt(row["speedup_vs_cublas"], ".2f", "x"), err,
        row["note"],
    ]


HADAMARD_GPU = [(m, n) for n in (4096, 11008, 14336) for m in (1, 16, 128, 4096)]
HADAMARD_CPU = [(16, 576), (16, 1536)]


def hadamard_cases(x: torch.Tensor) -> list[tuple[str, int, Callable[[], Callable[[], object]], Any]]:
    """``(label, bytes moved, make, result)`` rows for ``x (M, n)``: the dense ``x @ H`` first."""
    from quantkit import hadamard as had

    n = x.shape[1]
    had_k = had.chunk_matrix(n).to(x.device)
    dense = had.hadamard_matrix(n, dtype=x.dtype).to(x.device)  # (n, n)
    int8 = QuantScheme("int8", "per_token", symmetric_range="restricted")
    io = 2 * x.numel() * x.element_size()
    return [
        ("x @ H (dense)", io + dense.numel() * dense.element_size(), lambda: (lambda: x @ dense), None),
        ("quantkit FWHT", io, lambda: (lambda: had.hadamard_transform(x, had_k, "triton")),
         had.hadamard_transform_reference(x, had_k)),
        ("quantkit FWHT + int8 per-token quant", x.numel() * (x.element_size() + 1),
         lambda: (lambda: had.hadamard_quantize(x, had_k, int8, "triton")),
         had.hadamard_quantize_reference(x, had_k, int8)),
        ("torch reference (butterflies)", io, lambda: (lambda: had.hadamard_transform_reference(x, had_k)), None),
    ]


def bench_hadamard(shapes: list[tuple[int, int]], ctx: dict[str, Any]) -> None:
    """Table 3 (online Hadamard), written into ``ctx["report"]`` row by row."""
    report, device, copy = ctx["report"], ctx["device"], ctx["copy"]
    on_gpu, reps = device.type == "cuda", ctx["reps"]
    lines: list[list[object]] = []
    header = ["kernel", "M", "n", "ms (p20-p80)", "GB/s", "% copy", "vs x @ H", "bit-exact"]

    def render(note: str = "") -> None:
        table = markdown_table(header, lines, [False, True, True, True, True, True, True, False])
        report.set("hadamard", f"\n## Online Hadamard (fp16 activations)\n\n{table}\n{note}")

    for m, n in shapes:
        x = torch.randn(m, n, device=device).to(torch.float16)  # (M, n)
        dense_ms = None
        for label, moved, make, want in hadamard_cases(x):
            if ctx["deadline"].expired():
                render(f"\n(stopped at the time budget before {label} M={m} n={n})\n")
                return
            if "quantkit" in label and not ctx["use_triton"]:
                lines.append([label, m, n, "skipped: needs a GPU or TRITON_INTERPRET=1", "-", "-", "-", "-"])
                render()
                continue
            try:
                t = time_call(make, moved, on_gpu, on_gpu and m <= 16, reps)
                exact = None if want is None else _bit_equal(make()(), want)
            except Exception as exc:  # noqa: BLE001 - one broken row must not end the table
                lines.append([label, m, n, f"failed: {type(exc).__name__}: {exc}"[:120], "-", "-", "-", "-"])
                ctx["failures"].append(traceback.format_exc())
                render()
                continue
            dense_ms = t.median if dense_ms is None else dense_ms
            gbs = moved / t.median / 1e6
            report.add_row("hadamard", dict(kernel=label, m=m, n=n, ms=t.median, gbs=gbs,
                                            speedup_vs_dense=dense_ms / t.median, exact=exact))
            lines.append([label, m, n, f"{t.median:.4f} ({t.p20:.4f}-{t.p80:.4f})", f"{gbs:.1f}",
                          f"{100 * gbs / copy.gbs(moved, False):.1f}%", f"{dense_ms / t.median:.2f}x",
                          {None: "-", True: "yes", False: "NO"}[exact]])
            render()


def _parse_list(text: str | None, convert: Callable[[str], Any]) -> list[Any] | None:
    return None if text is None else [convert(t) for t in text.split(",") if t.strip()]


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be NxK, e.g. 4096x4096, got {text!r}") from None
    return n, k


def _choice(allowed: tuple[str, ...], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{what} {value!r} unknown; valid: {', '.join(allowed)}")
        return value
    return check


def plan(args: argparse.Namespace, on_gpu: bool) -> tuple[list, list]:
    """``(op shapes, matmul blocks)``; a block is ``(shape, dtype, ms, grids, extras)``."""
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    ms = GPU_M if on_gpu else CPU_M
    custom = any(v is not None for v in (args.shapes, args.m, args.dtypes, args.grids, args.extras))
    if args.preset == "check" and not custom:
        blocks = [(s, d, ms, g, e) for s, d, g, e in CHECK_PLAN]
        return shapes[:1], blocks
    shapes = args.shapes or (shapes[:1] if args.quick else shapes)
    grids = tuple(args.grids or ALL_GRIDS)
    extras = tuple(args.extras if args.extras is not None else cases.EXTRAS)
    dtypes = args.dtypes or (["fp16", "bf16"] if on_gpu else ["fp16"])
    ms = tuple(args.m or ms)
    blocks = [(s, d, ms, grids, extras) for s in shapes for d in dtypes]
    return shapes, blocks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="first shape only (CPU smoke)")
    p.add_argument("--preset", choices=("full", "check"), default="full",
                   help="check: the subset of make gpu-check (ignored when a filter is given)")
    p.add_argument("--shapes", type=lambda s: _parse_list(s, _shape), help="NxK,NxK,...")
    p.add_argument("--m", type=lambda s: _parse_list(s, int), help="M values, e.g. 1,16")
    p.add_argument("--dtypes", type=lambda s: _parse_list(s, _choice(tuple(DTYPES), "dtype")))
    p.add_argument("--grids", type=lambda s: _parse_list(s, _choice(ALL_GRIDS, "grid")),
                   help=f"weight grids of the dequant matmul: {', '.join(ALL_GRIDS)}")
    p.add_argument("--extras", type=lambda s: _parse_list(s, _choice(cases.EXTRAS, "extra")),
                   help=f"other row groups: {', '.join(cases.EXTRAS)} (empty string: none)")
    p.add_argument("--no-ops", action="store_true", help="skip the element-wise ops table")
    p.add_argument("--no-hadamard", action="store_true", help="skip the online Hadamard table")
    p.add_argument("--markdown", "--out", dest="markdown", type=Path, help="write the report here")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--kernels-json", type=Path, help="write the compiled kernels it ran here")
    p.add_argument("--deadline", type=float, help="stop starting rows after this many seconds")
    p.add_argument("--device", help="cuda or cpu (default: cuda unless TRITON_INTERPRET=1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the report and return it."""
    args = parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not interpret else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and interpret:
        raise SystemExit("unset TRITON_INTERPRET to benchmark kernels on a GPU")
    use_triton = on_gpu or interpret
    op_shapes, blocks = plan(args, on_gpu)
    reps = 2 if args.quick else 5  # wall-clock repetitions on a CPU (GPU timers pick their own)
    report = Report(args.markdown, args.json)
    from benchlib import device_name

    ctx = dict(report=report, device=device, device_name=device_name(device), reps=reps,
               use_triton=use_triton, copy=CopyReference(device, reps),
               deadline=Deadline(args.deadline), failures=[])
    mode = "" if on_gpu else (" (smoke run: Triton interpreter)" if use_triton
                              else " (smoke run: torch only)")
    report.meta.update(device=ctx["device_name"], on_gpu=on_gpu, use_triton=use_triton)
    report.set("head", "\n".join([f"# quantkit kernel benchmark{mode}", "", *environment(device)]))
    big = 1 << 30 if on_gpu else 1 << 24
    report.set("copy", f"- device-to-device copy bandwidth: {ctx['copy'].gbs(2 * big, False):.1f} "
                       f"GB/s ({big >> 20} MiB copied)\n")
    if not args.no_ops:
        bench_ops(op_shapes, ctx)
    if not use_triton:
        report.set("mm-note", "\n(quantkit matmul rows skipped: they need a GPU or TRITON_INTERPRET=1)\n")
    report.set("mm", "\n## Matmuls\n")
    for shape, dtype_name, ms, grids, extras in blocks:
        bench_matmul_block(shape, dtype_name, ms, grids, extras, ctx)
    if not args.no_hadamard:
        bench_hadamard(HADAMARD_GPU if on_gpu else HADAMARD_CPU, ctx)
    report.set("copies", f"\ncopy references (bytes copied, timer): {ctx['copy'].describe()}\n")
    if ctx["failures"]:
        body = "\n\n".join(f"```\n{f[-3000:]}\n```" for f in ctx["failures"])
        report.set("failures", f"\n## Failures ({len(ctx['failures'])})\n\n{body}\n")
    return finish(report, args.kernels_json, on_gpu)


if __name__ == "__main__":
    main()

"""Benchmark the Triton kernels behind :mod:`quantkit.ops` against the torch reference.

On a GPU, for each shape and scheme it times ``quantize``, ``dequantize``, ``pack_codes`` and
``unpack_codes`` with ``backend="triton"`` and ``backend="torch"`` on the same device
(``triton.testing.do_bench``, median of ``quantiles=[0.5, 0.2, 0.8]``), and reports the
achieved memory bandwidth (minimal bytes read + written / time) next to a device-to-device
copy of a large tensor measured in the same run: these ops are memory bound, so "% of copy"
is how close a kernel is to the hardware limit. ``bit-exact`` says whether both backends
returned identical tensors (the contract of :mod:`quantkit.ops`).

On a CPU it runs a smoke version in seconds: small shapes, the torch backend, and the Triton
backend through the interpreter when ``TRITON_INTERPRET=1`` is set (timings then measure the
interpreter, not a kernel).

Usage::

    python scripts/bench_kernels.py                 # GPU: full table
    python scripts/bench_kernels.py --quick --out bench.md
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --quick   # CPU smoke

The finiteness check of ``ops.quantize`` (a separate reduction and a host sync) is disabled
while timing, for both backends, so that the numbers describe the quantization itself.

A second table times the fused low-bit matmuls (W4A16 dequant GEMM/GEMV, W8A8 int8, fp8 e4m3)
against ``torch.matmul`` of fp16 operands (cuBLAS) in the same process, for M in
{1, 16, 128, 4096} and (N, K) in the shapes above: TFLOP/s (``2 * M * N * K`` / time), achieved
GB/s of the minimal traffic (activations, packed weights, scales, output) and its share of the
copy bandwidth, which is the bound of the decode (small M) rows. Activation quantization is
not part of the W8A8/fp8 timings (codes are given). ``max rel err`` is the largest error
against the torch reference, relative to the largest output. On a CPU this table is a smoke
run of tiny shapes through the interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit import ops
from quantkit.scheme import QuantScheme

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
CPU_SHAPES = [(16, 256), (13, 576)]
SCHEMES = [
    QuantScheme("int4", "per_group", groupsize=128, has_zero=True),
    QuantScheme("int8", "per_channel"),
    QuantScheme("fp8", "per_tensor"),
    QuantScheme("int4", "per_token"),
]
PACK_BITS = (3, 4, 8)
MATMUL_M_GPU = (1, 16, 128, 4096)
MATMUL_M_CPU = (1, 16)
MATMUL_NK_CPU = [(64, 256)]
COPY_BYTES_GPU = 1 << 30
COPY_BYTES_CPU = 1 << 24


@dataclass(frozen=True)
class Row:
    """One line of the result table; ``triton_ms`` is None when the kernel was not run."""

    op: str
    shape: tuple[int, int]
    scheme: str
    triton_ms: float | None
    torch_ms: float
    nbytes: int
    exact: bool | None


def _time_ms(fn: Callable[[], object], on_gpu: bool, reps: int) -> float:
    """Median milliseconds of ``fn``: ``do_bench`` on a GPU, wall clock on a CPU."""
    if on_gpu:
        import triton.testing

        median, _p20, _p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(median)
    fn()  # warm-up: first calls compile (GPU) or trace (interpreter)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device.type == "cuda", reps)
    return 2 * nbytes / ms / 1e6


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _same(a: object, b: object) -> bool:
    """Bit-exact equality of tensors or tuples of tensors (``None`` entries included)."""
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _measure(
    op: str, shape: tuple[int, int], label: str, nbytes: int,
    run: Callable[[str], object], use_triton: bool, on_gpu: bool, reps: int,
) -> Row:
    """Time ``run(backend)`` for both backends and compare their results."""
    torch_ms = _time_ms(lambda: run("torch"), on_gpu, reps)
    if not use_triton:
        return Row(op, shape, label, None, torch_ms, nbytes, None)
    triton_ms = _time_ms(lambda: run("triton"), on_gpu, reps)
    return Row(op, shape, label, triton_ms, torch_ms, nbytes, _same(run("triton"), run("torch")))


def bench_shape(
    shape: tuple[int, int], device: torch.device, use_triton: bool, reps: int
) -> list[Row]:
    """Every op at one shape: quantize/dequantize per scheme, pack/unpack per bit width."""
    on_gpu = device.type == "cuda"
    rows, cols = shape
    x = torch.randn(shape, dtype=torch.float16, device=device)  # (rows, cols)
    out: list[Row] = []
    for scheme in SCHEMES:
        label = scheme.describe()
        codes, scale, zero = ops.quantize(x, scheme, backend="torch")
        out.append(_measure(
            "quantize", shape, label, _nbytes(x, codes, scale, zero),
            lambda b, s=scheme: ops.quantize(x, s, backend=b, check_finite=False),
            use_triton, on_gpu, reps,
        ))
        out.append(_measure(
            "dequantize", shape, label, _nbytes(codes, scale, zero) + x.numel() * 2,
            lambda b, s=scheme, c=codes, sc=scale, z=zero: ops.dequantize(
                c, sc, z, s, torch.float16, backend=b
            ),
            use_triton, on_gpu, reps,
        ))
    for bits in PACK_BITS:
        lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
        codes = torch.randint(lo, hi, shape, dtype=torch.int8, device=device)  # (rows, cols)
        packed = ops.pack_codes(codes, bits, backend="torch")  # (rows, ceil(cols/8)*bits)
        label = f"int{bits}"
        out.append(_measure(
            "pack_codes", shape, label, _nbytes(codes, packed),
            lambda b, c=codes, n=bits: ops.pack_codes(c, n, backend=b),
            use_triton, on_gpu, reps,
        ))
        out.append(_measure(
            "unpack_codes", shape, label, _nbytes(codes, packed),
            lambda b, p=packed, n=bits: ops.unpack_codes(p, n, cols, True, backend=b),
            use_triton, on_gpu, reps,
        ))
    return out


def format_table(results: list[Row], copy_gbs: float) -> str:
    """Markdown table; GB/s and % of copy bandwidth refer to the Triton backend when it ran."""
    lines = [
        "| op | shape | scheme | triton ms | torch ms | speedup | GB/s | % of copy bw "
        "| bit-exact |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ms = r.triton_ms if r.triton_ms is not None else r.torch_ms
        gbs = r.nbytes / ms / 1e6
        triton = f"{r.triton_ms:.4f}" if r.triton_ms is not None else "n/a"
        speedup = f"{r.torch_ms / r.triton_ms:.2f}x" if r.triton_ms is not None else "n/a"
        exact = {None: "n/a", True: "yes", False: "NO"}[r.exact]
        lines.append(
            f"| {r.op} | {r.shape[0]}x{r.shape[1]} | {r.scheme} | {triton} | {r.torch_ms:.4f} "
            f"| {speedup} | {gbs:.2f} | {100 * gbs / copy_gbs:.1f}% | {exact} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class MatmulRow:
    """One line of the matmul table; ``baseline_ms`` is fp16 ``torch.matmul`` of the same shape."""

    kernel: str
    m: int
    nk: tuple[int, int]
    triton_ms: float
    baseline_ms: float
    nbytes: int
    max_rel_err: float


def _matmul_cases(
    m: int, n: int, k: int, device: torch.device
) -> list[tuple[str, Callable[[str], torch.Tensor], int]]:
    """``(label, run(backend), minimal bytes)`` of each fused matmul at one shape."""
    x = torch.randn(m, k, dtype=torch.float16, device=device)  # (M, K)
    w = torch.randn(n, k, dtype=torch.float16, device=device) / k**0.5  # (N, K)
    out_bytes = m * n * 2
    w4 = QuantScheme("int4", "per_group", groupsize=128, has_zero=True)
    codes, scale, zero = ops.quantize(w, w4, backend="torch")
    qweight = ops.pack_codes(codes, 4, backend="torch")  # (N, K / 2) uint8
    scales = scale.half()  # (N, K / 128)
    qzeros = ops.pack_codes(zero.to(torch.int8), 4, backend="torch")
    a8 = QuantScheme("int8", "per_token")
    xq, sx, _ = ops.quantize(x, a8, backend="torch")  # (M, K) int8, (M, 1)
    wq, sw, _ = ops.quantize(w, QuantScheme("int8", "per_channel"), backend="torch")
    f8 = QuantScheme("fp8", "per_token")
    xf, sxf, _ = ops.quantize(x, f8, backend="torch")  # (M, K) uint8 e4m3 bits
    wf, swf, _ = ops.quantize(w, QuantScheme("fp8", "per_channel"), backend="torch")
    return [
        ("w4a16 int4 g128 asym",
         lambda b: ops.quant_linear_matmul(x, qweight, scales, qzeros, None, w4, backend=b),
         _nbytes(x, qweight, scales, qzeros) + out_bytes),
        ("w8a8 int8 token/channel",
         lambda b: ops.int8_matmul(xq, sx, wq, sw, None, torch.float16, backend=b),
         _nbytes(xq, sx, wq, sw) + out_bytes),
        ("fp8 e4m3 token/channel",
         lambda b: ops.fp8_matmul(xf, sxf, wf, swf, None, torch.float16, backend=b),
         _nbytes(xf, sxf, wf, swf) + out_bytes),
    ]


def bench_matmuls(device: torch.device, quick: bool, reps: int) -> list[MatmulRow]:
    """Every fused matmul at every (M, (N, K)) against fp16 ``torch.matmul``."""
    on_gpu = device.type == "cuda"
    ms_list = MATMUL_M_GPU if on_gpu else MATMUL_M_CPU
    nks = GPU_SHAPES if on_gpu else MATMUL_NK_CPU
    if quick:
        nks = nks[:1]
    rows: list[MatmulRow] = []
    for n, k in nks:
        for m in ms_list:
            a = torch.randn(m, k, dtype=torch.float16, device=device)  # (M, K)
            b = torch.randn(n, k, dtype=torch.float16, device=device)  # (N, K)
            baseline_ms = _time_ms(lambda: torch.matmul(a, b.T), on_gpu, reps)
            for label, run, nbytes in _matmul_cases(m, n, k, device):
                want = run("torch").float()
                err = (run("triton").float() - want).abs().max() / want.abs().max().clamp_min(1e-30)
                triton_ms = _time_ms(lambda r=run: r("triton"), on_gpu, reps)
                rows.append(MatmulRow(label, m, (n, k), triton_ms, baseline_ms, nbytes, err.item()))
    return rows


def format_matmul_table(rows: list[MatmulRow], copy_gbs: float) -> str:
    """Markdown table of :func:`bench_matmuls` (times carry their unit in the cell)."""
    lines = [
        "| kernel | M | N x K | triton ms | fp16 torch.matmul ms | speedup | TFLOP/s | GB/s "
        "| % of copy bw | max rel err |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n, k = r.nk
        tflops = 2 * r.m * n * k / r.triton_ms / 1e9
        gbs = r.nbytes / r.triton_ms / 1e6
        lines.append(
            f"| {r.kernel} | {r.m} | {n}x{k} | {r.triton_ms:.4f} ms | {r.baseline_ms:.4f} ms "
            f"| {r.baseline_ms / r.triton_ms:.2f}x | {tflops:.2f} | {gbs:.1f} "
            f"| {100 * gbs / copy_gbs:.1f}% | {r.max_rel_err:.1e} |"
        )
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer reps")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the report here (markdown)"
    )
    parser.add_argument(
        "--device", default=None,
        help="cuda or cpu (default: cuda when available and TRITON_INTERPRET is not set)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the report and return it."""
    args = parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    default = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    device = torch.device(args.device or default)
    on_gpu = device.type == "cuda"
    if on_gpu and interpret:
        raise SystemExit("unset TRITON_INTERPRET to benchmark kernels on a GPU")
    use_triton = on_gpu or interpret
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    reps = 2 if args.quick else 5  # CPU wall-clock repetitions (do_bench picks its own)

    copy_gbs = copy_bandwidth_gbs(device, COPY_BYTES_GPU if on_gpu else COPY_BYTES_CPU, reps)
    results = [row for shape in shapes for row in bench_shape(shape, device, use_triton, reps)]
    if use_triton:
        matmul_table = format_matmul_table(bench_matmuls(device, args.quick, reps), copy_gbs)
    else:
        matmul_table = "(fused matmuls skipped: they need a GPU or TRITON_INTERPRET=1)"
    mode = "" if on_gpu else (
        " (smoke run: Triton interpreter)" if use_triton else " (smoke run: torch only)"
    )
    report = "\n".join([
        f"# quantkit kernel benchmark{mode}",
        "",
        f"- device: {_device_name(device)}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, triton {_triton_version()}",
        f"- device-to-device copy bandwidth: {copy_gbs:.1f} GB/s",
        "",
        format_table(results, copy_gbs),
        "",
        "## fused low-bit matmuls vs fp16 torch.matmul",
        "",
        matmul_table,
        "",
    ])
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return report


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()

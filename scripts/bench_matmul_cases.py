"""The matmul rows of ``bench_kernels.py``: quantkit's fused kernels and vendor baselines.

Each :class:`Case` is an operand factory (``make()`` returns a call on a fresh, independent set
of operands, so the CUDA-graph timer can rotate through copies larger than the L2) plus what
the table needs: the minimal bytes the operation must move, its FLOPs, which tensor-core peak
it is compared with, the config the dispatcher chose and the error against the reference.

Rows at one ``(M, N, K)`` and activation dtype:

* ``cuBLAS``: ``F.linear(x, w)`` on the dense weight (the baseline of every ratio);
* the dequant GEMM/GEMV on each selected weight grid (``ops.quant_linear_matmul``);
* W8A8 int8 and fp8: the GEMM on given codes, and ``QuantLinear.forward`` (per-token
  activation quantization + GEMM, what a model runs); SmoothQuant's fused smoothing +
  quantization alone and followed by the int8 GEMM;
* vendor kernels: ``torch._int_mm`` (int32 out, no scales), ``torch._scaled_mm`` (fp8, per-row
  scales), ``torch._weight_int4pack_mm`` (tinygemm, bf16 activations only).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchlib import format_config
from quantkit import ops
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme

GRIDS: dict[str, QuantScheme] = {
    "int4-g128-asym": QuantScheme("int4", "per_group", 128, has_zero=True),
    "int4-g128": QuantScheme("int4", "per_group", 128),
    "int3-g128-asym": QuantScheme("int3", "per_group", 128, has_zero=True),
    "int2-g128-asym": QuantScheme("int2", "per_group", 128, has_zero=True),
    "int8-channel": QuantScheme("int8", "per_channel"),
    "fp4-g32": QuantScheme("fp4", "per_group", 32),
    "fp8-channel": QuantScheme("fp8", "per_channel"),
    # block-scaled formats: e8m0 (MX), e4m3 + fp32 per tensor (NVFP4), 128 x 128 fp8 blocks
    "mxfp4": QuantScheme("mxfp4", "per_group", 32),
    "nvfp4": QuantScheme("nvfp4", "per_group", 16),
    "mxfp6_e3m2": QuantScheme("mxfp6_e3m2", "per_group", 32),
    "mxfp8": QuantScheme("mxfp8", "per_group", 32),
    "fp8-block128": QuantScheme("fp8_block", "per_group", 128, block_rows=128),
}
BLOCK_GRIDS = ("mxfp4", "nvfp4", "mxfp6_e3m2", "mxfp8", "fp8-block128")
EXTRAS = ("w8a8", "fp8", "smoothquant", "vendor", "gemv_block_n")
# Rows per program the decode GEMV is also timed with (extra "gemv_block_n", M <= 4): at M = 1
# the planner takes 8; 16 lowers the sm90 loop from 3.86 to 3.55 SASS per int4 weight (the x
# loads, conversions and sums shared by twice the rows) but needs 255 registers instead of 128,
# half the warps per SM. Which wins is a question for the hardware.
GEMV_BLOCK_NS = (4, 16)
A8 = QuantScheme("int8", "per_token")
W8 = QuantScheme("int8", "per_channel")
F8A = QuantScheme("fp8", "per_token")
F8W = QuantScheme("fp8", "per_channel")
PEAK_KIND = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
Make = Callable[[], Callable[[], Any]]


@dataclass
class Case:
    """One row; ``make is None`` means skipped for ``note``."""

    label: str
    kind: str  # "dense" | "quantkit" | "vendor"
    peak: str  # key of benchlib.PEAK_TFLOPS entries
    make: Make | None
    nbytes: int
    flops: int
    config: str = "-"
    err: float | None = None
    exact: bool | None = None
    note: str = ""


def engine(device: torch.device, name: str) -> str:
    """The library behind a torch call on ``device`` (the CPU build has no cuBLAS)."""
    return name if device.type == "cuda" else "torch CPU"


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float64."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def call_with_known(fn: Callable[..., Any], values: dict[str, Any]) -> Any:
    """Call ``fn`` with the entries of ``values`` its signature names (keyword arguments), so
    that a planner gaining or renaming an optional parameter still gets the ones we know."""
    kwargs = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in values:
            kwargs[name] = values[name]
        elif p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{fn.__name__} needs {name!r}, which the benchmark does not know")
    return fn(**kwargs)


def _configs_of(launches: list[Any]) -> str:
    cfgs = [format_config(launch.info["config"]) for launch in launches
            if "config" in getattr(launch, "info", {})]
    return " + ".join(cfgs) if cfgs else "-"


def dequant_config(x: torch.Tensor, q: QuantLinear) -> str:
    """The config ``plan_quant_linear_matmul`` picks for these operands on this device."""
    try:
        from quantkit.kernels._launch import Target
        from quantkit.kernels.matmul import plan_quant_linear_matmul

        _, launches = call_with_known(plan_quant_linear_matmul, dict(
            x=x, qweight=q.qweight, scales=q.scales, qzeros=q.qzeros, bias=None,
            scheme=q.w_scheme, target=Target.of(x.device), config=None, global_scale=q.global_scale,
        ))
        return _configs_of(launches)
    except Exception as exc:  # noqa: BLE001 - the table says n/a and why, the row still runs
        return f"n/a ({type(exc).__name__})"


def scaled_mm_config(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                     out_dtype: torch.dtype, code_dtype: torch.dtype) -> str:
    """The int8/fp8 GEMM config: ``plan_scaled_mm`` when the kernels have it, else
    ``scaled_mm_config``."""
    try:
        from quantkit.kernels import int8_matmul as km
        from quantkit.kernels._launch import Target

        target = Target.of(xq.device)
        if hasattr(km, "plan_scaled_mm"):
            _, launches = call_with_known(km.plan_scaled_mm, dict(
                xq=xq, x_scale=sx, wq=wq, w_scale=sw, bias=None, out_dtype=out_dtype,
                target=target, code_dtype=code_dtype, config=None,
            ))
            return _configs_of(launches)
        M, K = xq.shape
        cfg = call_with_known(km.scaled_mm_config, dict(
            M=M, N=wq.shape[0], K=K, target=target, code_dtype=code_dtype))
        return format_config(cfg)
    except Exception as exc:  # noqa: BLE001
        return f"n/a ({type(exc).__name__})"


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _clone(q: QuantLinear) -> QuantLinear:
    """An independent copy of ``q``'s buffers (and its ``backend``)."""
    return copy.deepcopy(q)


def dense_case(x: torch.Tensor, w: torch.Tensor) -> Case:
    M, K = x.shape
    N = w.shape[0]

    def make() -> Callable[[], Any]:
        wc = w.clone()
        return lambda: nn.functional.linear(x, wc)

    return Case("cuBLAS (dense)", "dense", PEAK_KIND[x.dtype], make,
                nbytes(x, w) + M * N * x.element_size(), 2 * M * N * K, engine(x.device, "cuBLAS"))


def dequant_case(x: torch.Tensor, w: torch.Tensor, grid: str, backend: str) -> Case:
    scheme = GRIDS[grid]
    M, K = x.shape
    N = w.shape[0]
    q = QuantLinear.from_linear(_linear(w), scheme)

    def run(m: QuantLinear, b: str) -> torch.Tensor:
        return ops.quant_linear_matmul(x, m.qweight, m.scales, m.qzeros, None, scheme, backend=b,
                                       global_scale=m.global_scale)

    def make() -> Callable[[], Any]:
        c = _clone(q)
        return lambda: run(c, backend)

    err = rel_err(run(q, backend), run(q, "torch"))
    moved = nbytes(x, q.qweight, q.scales, q.qzeros, q.global_scale) + M * N * x.element_size()
    return Case(f"quantkit {scheme.describe()}", "quantkit", PEAK_KIND[x.dtype], make, moved,
                2 * M * N * K, dequant_config(x, q), err)


def gemv_block_n_cases(x: torch.Tensor, w: torch.Tensor, grid: str, backend: str) -> list[Case]:
    """The decode GEMV with each of :data:`GEMV_BLOCK_NS` rows per program other than the
    planner's (none where the GEMV does not serve these operands, e.g. more than 4 rows)."""
    from quantkit.kernels._launch import Target, run_all
    from quantkit.kernels.gemv import MAX_M, GemvConfig, gemv_config, plan_dequant_gemv

    scheme = GRIDS[grid]
    M, K = x.shape
    N = w.shape[0]
    if backend != "triton" or M > MAX_M:
        return []
    q = QuantLinear.from_linear(_linear(w), scheme)
    target = Target.of(x.device)
    chosen = gemv_config(M, N, K, scheme.bits, target, x.element_size())
    want = ops.quant_linear_matmul(x, q.qweight, q.scales, q.qzeros, None, scheme, backend="torch",
                                   global_scale=q.global_scale)
    moved = nbytes(x, q.qweight, q.scales, q.qzeros, q.global_scale) + M * N * x.element_size()
    out: list[Case] = []
    for block_n in GEMV_BLOCK_NS:
        if block_n == chosen.block_n:
            continue
        cfg = GemvConfig(chosen.block_m, block_n, chosen.num_warps)

        def make(cfg: GemvConfig = cfg) -> Callable[[], Any]:
            c = _clone(q)
            planned = plan_dequant_gemv(x, c.qweight, c.scales, c.qzeros, None, scheme, target, config=cfg,
                                        global_scale=c.global_scale)
            if planned is None:
                raise ValueError(f"the GEMV does not serve {scheme.describe()} at M={M}")
            y, launches = planned

            def call() -> torch.Tensor:
                run_all(launches, x.device)
                return y
            return call

        err = rel_err(make()(), want)
        out.append(Case(f"quantkit {scheme.describe()} GEMV block_n={block_n}", "quantkit", PEAK_KIND[x.dtype],
                        make, moved, 2 * M * N * K, format_config(cfg), err))
    return out


def w8a8_cases(x: torch.Tensor, w: torch.Tensor, backend: str, fp8: bool) -> list[Case]:
    """GEMM on given codes, and QuantLinear.forward (per-token quantization + GEMM)."""
    a_scheme, w_scheme = (F8A, F8W) if fp8 else (A8, W8)
    name, peak = ("fp8", "fp8") if fp8 else ("w8a8 int8", "int8")
    M, K = x.shape
    N = w.shape[0]
    q = QuantLinear.from_linear(_linear(w), w_scheme, a_scheme)
    q.backend = backend
    codes, sx, _ = ops.quantize(x, a_scheme, backend=backend, check_finite=False)
    gemm = ops.fp8_matmul if fp8 else ops.int8_matmul

    def wcodes(m: QuantLinear) -> torch.Tensor:
        return m.qweight if fp8 else m.qweight.view(torch.int8)

    def make_gemm() -> Callable[[], Any]:
        c = _clone(q)
        return lambda: gemm(codes, sx, wcodes(c), c.scales, None, x.dtype, backend=backend)

    def make_layer() -> Callable[[], Any]:
        c = _clone(q)
        return lambda: c(x)

    got = gemm(codes, sx, wcodes(q), q.scales, None, x.dtype, backend=backend)
    want = gemm(codes, sx, wcodes(q), q.scales, None, x.dtype, backend="torch")
    out_bytes = M * N * x.element_size()
    code_dtype = torch.float8_e4m3fn if fp8 else torch.int8
    xq = codes.view(code_dtype) if fp8 else codes
    cfg = scaled_mm_config(xq, sx, wcodes(q).view(code_dtype), q.scales, x.dtype, code_dtype)
    layer_got = q(x)
    q.backend = "torch"
    layer_want = q(x)
    q.backend = backend
    return [
        Case(f"quantkit {name} GEMM (codes given)", "quantkit", peak, make_gemm,
             nbytes(codes, sx, q.qweight, q.scales) + out_bytes, 2 * M * N * K, cfg,
             rel_err(got, want)),
        Case(f"quantkit {name} + per-token quant (QuantLinear)", "quantkit", peak, make_layer,
             nbytes(x, q.qweight, q.scales) + out_bytes, 2 * M * N * K, cfg,
             rel_err(layer_got, layer_want)),
    ]


def smoothquant_cases(x: torch.Tensor, w: torch.Tensor, backend: str) -> list[Case]:
    """Fused smoothing + per-token int8 quantization alone (memory bound), then + int8 GEMM."""
    M, K = x.shape
    N = w.shape[0]
    smooth = (torch.rand(K, device=x.device) + 0.5).to(x.dtype)  # (K,) positive
    q = QuantLinear.from_linear(_linear(w), W8, A8)

    def sq(b: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return ops.smooth_quantize_per_token(x, smooth, A8, backend=b)

    def make_alone() -> Callable[[], Any]:
        xc = x.clone()
        return lambda: ops.smooth_quantize_per_token(xc, smooth, A8, backend=backend)

    def make_gemm() -> Callable[[], Any]:
        c = _clone(q)

        def call() -> torch.Tensor:
            codes, sx, _ = ops.smooth_quantize_per_token(x, smooth, A8, backend=backend)
            return ops.int8_matmul(codes, sx, c.qweight.view(torch.int8), c.scales, None,
                                   x.dtype, backend=backend)
        return call

    got, want = sq(backend), sq("torch")
    exact = all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    codes, sx, _ = got
    e2e = ops.int8_matmul(codes, sx, q.qweight.view(torch.int8), q.scales, None, x.dtype,
                          backend=backend)
    e2e_ref = ops.int8_matmul(*want[:2], q.qweight.view(torch.int8), q.scales, None, x.dtype,
                              backend="torch")
    cfg = scaled_mm_config(codes, sx, q.qweight.view(torch.int8), q.scales, x.dtype, torch.int8)
    return [
        Case("quantkit smooth_quantize int8 per-token", "quantkit", PEAK_KIND[x.dtype],
             make_alone, nbytes(x, smooth, codes, sx), 0, "-", exact=exact),
        Case("quantkit smooth_quantize + int8 GEMM", "quantkit", "int8", make_gemm,
             nbytes(x, smooth, q.qweight, q.scales) + M * N * x.element_size(), 2 * M * N * K,
             cfg, rel_err(e2e, e2e_ref)),
    ]


def _skipped(label: str, peak: str, reason: Exception | str) -> Case:
    why = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    return Case(label, "vendor", peak, None, 0, 0, note=why.splitlines()[0][:160])


def vendor_cases(x: torch.Tensor, w: torch.Tensor) -> list[Case]:
    """torch._int_mm, torch._scaled_mm (fp8 row-wise) and torch._weight_int4pack_mm."""
    M, K = x.shape
    N = w.shape[0]
    cases = []
    xq, sx, _ = ops.quantize(x, A8, backend="torch")  # (M, K) int8, (M, 1)
    wq, sw, _ = ops.quantize(w, W8, backend="torch")  # (N, K) int8, (N, 1)
    label = "torch._int_mm (int32 out, no scales)"
    try:
        got = torch._int_mm(xq, wq.t())  # (M, N) int32; mat2 column-major
        exact = torch.equal(got, ops.int8_matmul(xq, sx, wq, sw, None, torch.int32, backend="torch"))

        def make_int_mm() -> Callable[[], Any]:
            wc = wq.clone()
            return lambda: torch._int_mm(xq, wc.t())

        cases.append(Case(label, "vendor", "int8", make_int_mm, nbytes(xq, wq) + M * N * 4,
                          2 * M * N * K, engine(x.device, "cuBLASLt"), exact=exact))
    except Exception as exc:  # noqa: BLE001 - shape/device limits of a private op: say which
        cases.append(_skipped(label, "int8", exc))

    cases.append(_scaled_mm_case(x, w))
    if x.dtype == torch.bfloat16:
        cases.append(_int4pack_case(x, w))
    else:
        cases.append(_skipped("torch._weight_int4pack_mm (tinygemm)", "bf16",
                              "needs bfloat16 activations (see the bf16 rows)"))
    return cases


def _scaled_mm_case(x: torch.Tensor, w: torch.Tensor) -> Case:
    M, K = x.shape
    N = w.shape[0]
    label = "torch._scaled_mm fp8 row-wise"
    xf, sxf, _ = ops.quantize(x, F8A, backend="torch")  # (M, K) uint8 e4m3 bits, (M, 1)
    wf, swf, _ = ops.quantize(w, F8W, backend="torch")
    a = xf.view(torch.float8_e4m3fn)  # (M, K) row-major
    scale_a = sxf.float().contiguous()  # (M, 1)
    scale_b = swf.float().reshape(1, N).contiguous()  # (1, N)
    errors = []
    for out_dtype in dict.fromkeys((x.dtype, torch.bfloat16)):
        try:
            got = torch._scaled_mm(a, wf.view(torch.float8_e4m3fn).t(), scale_a=scale_a,
                                   scale_b=scale_b, out_dtype=out_dtype)
        except Exception as exc:  # noqa: BLE001 - row-wise output dtypes differ by version
            errors.append(exc)
            continue
        want = ops.fp8_matmul(xf, sxf, wf, swf, None, out_dtype, backend="torch")

        def make(od: torch.dtype = out_dtype) -> Callable[[], Any]:
            b = wf.clone().view(torch.float8_e4m3fn).t()  # (K, N) column-major
            return lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=od)

        note = "" if out_dtype == x.dtype else f"out {str(out_dtype).removeprefix('torch.')}"
        return Case(label, "vendor", "fp8", make,
                    nbytes(xf, wf, scale_a, scale_b) + M * N * torch.empty((), dtype=out_dtype).element_size(),
                    2 * M * N * K, engine(x.device, "cuBLASLt/CUTLASS"), rel_err(got, want),
                    note=note)
    return _skipped(label, "fp8", errors[-1])


def _int4pack_case(x: torch.Tensor, w: torch.Tensor) -> Case:
    """tinygemm: uint4 codes ``q`` with ``W = (q - 8) * scale + zero`` per group of 128 along K,
    packed by ``torch._convert_weight_to_int4pack`` (two codes per byte, even column in the high
    nibble; ``innerKTiles=8``); bf16 activations, scales and zeros."""
    M, K = x.shape
    N = w.shape[0]
    label = "torch._weight_int4pack_mm (tinygemm)"
    if x.device.type != "cuda":
        return _skipped(label, "bf16", "CUDA layout only (the CPU op packs differently)")
    group = 128
    try:
        q = torch.randint(0, 16, (N, K), dtype=torch.int32, device=x.device)  # (N, K)
        scale = (torch.rand(K // group, N, device=x.device) / 64 + 1e-3).to(torch.bfloat16)
        zero = (torch.randn(K // group, N, device=x.device) / 64).to(torch.bfloat16)
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # (N, K / 2)
        packed = torch._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.stack([scale, zero], dim=-1).contiguous()  # (K / 128, N, 2)
        got = torch._weight_int4pack_mm(x, packed, group, sz)  # (M, N) bf16
    except Exception as exc:  # noqa: BLE001 - private op: say why it did not run
        return _skipped(label, "bf16", exc)
    s_full = scale.float().repeat_interleave(group, dim=0).T  # (N, K)
    z_full = zero.float().repeat_interleave(group, dim=0).T
    w_ref = ((q.float() - 8) * s_full + z_full).to(torch.bfloat16)  # (N, K)
    err = rel_err(got, (x.float() @ w_ref.float().T).to(torch.bfloat16))

    def make() -> Callable[[], Any]:
        pc = packed.clone()
        return lambda: torch._weight_int4pack_mm(x, pc, group, sz)

    note = "" if err < 1e-2 else "large error: layout assumption wrong?"
    return Case(label, "vendor", "bf16", make, nbytes(x, packed, sz) + M * N * 2, 2 * M * N * K,
                "tinygemm", err, note=note)

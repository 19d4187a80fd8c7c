"""Fused low-bit matmul kernels against :mod:`quantkit.matmul_reference`.

Kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) and are
compiled, not run, for sm90. What is compared how:

* exact (``torch.equal``): the int32 accumulator of the int8 GEMM, the int8 GEMM's fp32
  epilogue without split-K (same fp32 operations in the same order), and the codes / scales /
  zeros of the fused SmoothQuant quantizer.
* with a tolerance: everything that sums fp32 products in another order than torch (the
  dequant GEMM/GEMV, fp8, split-K). fp32 summation error is ~1e-6 relative, far below the
  output rounding, so the bound is the output dtype's rounding: one ulp of the output format
  relative to the largest output (``2**-10`` fp16, ``2**-7`` bf16, ``1e-5`` fp32), since two
  fp32 values a hair apart can round to neighbouring fp16/bf16 values.
"""

from __future__ import annotations

import pytest
import torch

from quantkit import ops, reference
from quantkit.kernels.fp8_matmul import fp8_matmul
from quantkit.kernels.int8_matmul import int8_matmul
from quantkit.kernels._launch import H200
from quantkit.kernels.int8_matmul import scaled_mm_config
from quantkit.kernels._launch import INTERPRETER, run_all
from quantkit.kernels._triton_math import SCALE_FMT_OF
from quantkit.kernels.gemv import MAX_M as GEMV_MAX_M
from quantkit.kernels.gemv import GemvConfig, _dequant_gemv_kernel, gemv_config
from quantkit.kernels.matmul import (
    MatmulConfig,
    _split_k_reduce_kernel,
    default_config,
    plan_quant_linear_matmul,
    quant_linear_matmul,
)
from quantkit.kernels.smooth_quant import smooth_quantize_per_token
from quantkit.matmul_reference import (
    fp8_matmul_reference,
    int8_matmul_reference,
    quant_linear_matmul_reference,
    smooth_quantize_reference,
)
from quantkit.packing import pack_codes
from quantkit.quant_linear import storage_scale
from quantkit.scheme import QuantScheme
from tests.sm90 import Case, compile_for_cuda

pytestmark = pytest.mark.interpreter

_RTOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 1e-5}
# odd N; K = 6 * 32 + 8 = 3 * 64 + 8 = 128 + 72: every group size has a short last group
N, K = 37, 200


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within one output-dtype ulp of the largest |output| (see the module docstring)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = _RTOL[want.dtype] * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=_RTOL[want.dtype], atol=tol)


def _weight_storage(
    scheme: QuantScheme, n: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """QuantLinear buffers ``(qweight, scales fp16, qzeros)`` with codes and zero points spread
    over the whole grid (float grids: codes of a random weight, never NaN patterns)."""
    w = torch.randn(n, k)
    codes, scale, zero = reference.quantize_tensor(w, scheme)
    if scheme.dtype.is_int:
        codes = torch.randint(scheme.qmin, scheme.qmax + 1, codes.shape).to(codes.dtype)
    scales = storage_scale(scale * torch.exp(0.5 * torch.randn_like(scale))).half()
    qzeros = None
    if zero is not None:
        zero = torch.randint(scheme.qmin, scheme.qmax + 1, zero.shape)
        qzeros = pack_codes(zero.to(codes.dtype), scheme.bits)
    return pack_codes(codes, scheme.bits), scales, qzeros


def _check_dequant_matmul(scheme: QuantScheme, m: int, x_dtype: torch.dtype,
                          config: MatmulConfig | None = None, bias: bool = True) -> None:
    qweight, scales, qzeros = _weight_storage(scheme, N, K)
    x = torch.randn(m, K).to(x_dtype)
    b = torch.randn(N).half() if bias else None
    want = quant_linear_matmul_reference(x, qweight, scales, qzeros, b, scheme, K)
    _assert_close(quant_linear_matmul(x, qweight, scales, qzeros, b, scheme, config=config), want)


# --------------------------------------------------------------------------------------------
# W-only dequant GEMM / GEMV
# --------------------------------------------------------------------------------------------

INT_SCHEMES = [
    pytest.param(bits, zero, unsigned,
                 id=f"int{bits}" + ("-asym" if zero else "") + ("-unsigned" if unsigned else ""))
    for bits in (2, 3, 4, 8) for zero in (False, True) for unsigned in (False, True)
]
M_PATHS = [pytest.param(1, id="M1-gemv"), pytest.param(5, id="M5-gemv"),
           pytest.param(17, id="M17-gemm")]


@pytest.mark.parametrize("m", M_PATHS)
@pytest.mark.parametrize("bits, has_zero, unsigned", INT_SCHEMES)
def test_dequant_matmul_int_grids(bits: int, has_zero: bool, unsigned: bool, m: int) -> None:
    scheme = QuantScheme(f"int{bits}", "per_group", 64, has_zero=has_zero, unsigned=unsigned)
    _check_dequant_matmul(scheme, m, torch.float16)


@pytest.mark.parametrize("m", M_PATHS)
@pytest.mark.parametrize(
    "granularity, groupsize",
    [pytest.param("per_group", 32, id="g32"), pytest.param("per_group", 128, id="g128"),
     pytest.param("per_group", 7, id="g7-gathered"), pytest.param("per_channel", -1, id="channel"),
     pytest.param("per_tensor", -1, id="tensor")],
)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dequant_matmul_granularities(granularity: str, groupsize: int, m: int,
                                      x_dtype: torch.dtype) -> None:
    scheme = QuantScheme("int4", granularity, groupsize, has_zero=True)
    _check_dequant_matmul(scheme, m, x_dtype)


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("name", ["fp4", "fp8", "fp8_e5m2"])
def test_dequant_matmul_float_grids(name: str, m: int) -> None:
    _check_dequant_matmul(QuantScheme(name, "per_group", 32), m, torch.float16)


@pytest.mark.parametrize(
    "m, config, bits",
    [
        pytest.param(3, GemvConfig(4, 2, 1), 4, id="gemv-few-rows"),
        pytest.param(4, GemvConfig(4, 1, 2), 8, id="gemv-one-row-two-warps"),
        pytest.param(12, MatmulConfig(16, 16, 64, split_k=2), 3, id="dot16-split-k"),
        pytest.param(40, MatmulConfig(16, 16, 64, group_m=2), 3, id="many-tiles-grouped"),
        pytest.param(20, MatmulConfig(32, 32, 64), 3, id="tile-straddles-groups"),
        pytest.param(1, MatmulConfig(16, 16, 16), 3, id="dot-for-one-row"),
    ],
)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dequant_matmul_configs(m: int, config: MatmulConfig | GemvConfig, bits: int,
                                x_dtype: torch.dtype) -> None:
    """GEMV launch shapes, split-K, many programs, gathered scales, tiny K-steps (int3 rows of
    K=200 are not word-aligned, so they always take the tensor-core kernel)."""
    scheme = QuantScheme(f"int{bits}", "per_group", 32, has_zero=True)
    _check_dequant_matmul(scheme, m, x_dtype, config)





@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_split_k_partials_are_summed_in_order(x_dtype: torch.dtype) -> None:
    """Split-K stores one fp32 partial tile per split (no atomics) and a second launch sums
    them in split order, adds the bias and rounds once: bit-identical to that sum."""
    scheme = QuantScheme("int4", "per_group", 32, has_zero=True)
    qweight, scales, qzeros = _weight_storage(scheme, N, K)
    x = torch.randn(12, K).to(x_dtype)
    b = torch.randn(N).half()
    out, launches = plan_quant_linear_matmul(x, qweight, scales, qzeros, b, scheme, INTERPRETER,
                                             config=MatmulConfig(16, 16, 32, split_k=3))
    matmul, reduce = launches
    assert reduce.kernel is _split_k_reduce_kernel
    run_all([matmul], x.device)
    partials = matmul.args[6]  # (3, M, N) fp32 workspace
    want = ((partials[0] + partials[1]) + partials[2]) + b.float()
    run_all([reduce], x.device)
    assert torch.equal(out, want.to(x_dtype))
    _assert_close(out, quant_linear_matmul_reference(x, qweight, scales, qzeros, b, scheme, K))

@pytest.mark.parametrize("m", [1, 5, 12, 40])
def test_gpu_configs_run_in_the_interpreter(m: int) -> None:
    """The launches planned for an H200 compute the right result (run here in the interpreter):
    the decode GEMV up to 8 rows, tensor-core tiles above."""
    scheme = QuantScheme("int4", "per_group", 64, has_zero=True)
    qweight, scales, qzeros = _weight_storage(scheme, N, K)
    x = torch.randn(m, K).half()
    out, launches = plan_quant_linear_matmul(x, qweight, scales, qzeros, None, scheme, H200)
    assert (launches[0].kernel is _dequant_gemv_kernel) == (m <= GEMV_MAX_M)
    run_all(launches, x.device)
    want = quant_linear_matmul_reference(x, qweight, scales, qzeros, None, scheme, K)
    _assert_close(out.to(x.dtype), want)
    xq, sx, wq, sw = _int8_operands(m, False)
    config = scaled_mm_config(m, N, K, H200)
    assert torch.equal(int8_matmul(xq, sx, wq, sw, None, torch.int32, config=config),
                       int8_matmul_reference(xq, sx, wq, sw, None, torch.int32))


@pytest.mark.parametrize("m", [1, 4, 16, 128, 4096])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_configs_fill_an_h200(m: int, n: int, k: int) -> None:
    """Benchmark shapes give every SM work: the GEMV at least 8 warps per SM without splitting
    K, the tensor-core tiles a program per SM (split-K where tiles are few) with one scale per
    K-tile for g128."""
    if m <= GEMV_MAX_M:
        gemv = gemv_config(m, n, k, 4, H200)
        assert -(-n // gemv.block_n) * gemv.num_warps >= 8 * H200.sm_count, gemv
        configs = [scaled_mm_config(m, n, k, H200)]
    else:
        dequant = default_config(m, n, k, 128, H200)
        assert 128 % dequant.block_k == 0, dequant  # K-tiles never straddle a group
        configs = [dequant, scaled_mm_config(m, n, k, H200)]
    for config in configs:
        programs = -(-m // config.block_m) * -(-n // config.block_n) * config.split_k
        assert programs >= H200.sm_count, config


def test_dequant_matmul_no_bias_and_strided_x() -> None:
    scheme = QuantScheme("int4", "per_group", 64, has_zero=True)
    qweight, scales, qzeros = _weight_storage(scheme, N, K)
    x = torch.randn(K, 9).half().t()  # (9, K), column-major
    want = quant_linear_matmul_reference(x, qweight, scales, qzeros, None, scheme, K)
    _assert_close(quant_linear_matmul(x, qweight, scales, qzeros, None, scheme), want)
    _assert_close(  # (1, G) scales and zeros broadcast over rows
        quant_linear_matmul(x, qweight, scales[:1], qzeros[:1], None, scheme),
        quant_linear_matmul_reference(x, qweight, scales[:1], qzeros[:1], None, scheme, K),
    )


def test_dequant_matmul_matches_quant_linear_forward() -> None:
    """The fused kernel computes what ``QuantLinear.forward`` computes on CPU."""
    from quantkit.quant_linear import QuantLinear

    scheme = QuantScheme("int4", "per_group", 64, has_zero=True)
    module = QuantLinear.from_linear(torch.nn.Linear(K, N), scheme)
    x = torch.randn(2, 3, K).half()
    got = ops.quant_linear_matmul(x, module.qweight, module.scales, module.qzeros, module.bias,
                                  module.w_scheme, backend="triton")
    assert got.shape == (2, 3, N)
    _assert_close(got, module(x))


# --------------------------------------------------------------------------------------------
# W8A8 int8 and fp8 GEMM
# --------------------------------------------------------------------------------------------


def _int8_operands(m: int, per_tensor: bool) -> tuple[torch.Tensor, ...]:
    xq = torch.randint(-128, 128, (m, K), dtype=torch.int8)
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    sx = torch.rand(1 if per_tensor else m, 1) / 500 + 1e-4  # |y| stays within fp16 range
    sw = torch.rand(1 if per_tensor else N, 1) / 500 + 1e-4
    return xq, sx, wq, sw


@pytest.mark.parametrize("per_tensor", [False, True], ids=["token-channel", "tensor"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_int8_matmul_exact(m: int, per_tensor: bool) -> None:
    """int32 accumulator and (without split-K) the fp32 epilogue: bit-exact."""
    xq, sx, wq, sw = _int8_operands(m, per_tensor)
    bias = torch.randn(N)
    assert torch.equal(int8_matmul(xq, sx, wq, sw, None, torch.int32),
                       int8_matmul_reference(xq, sx, wq, sw, None, torch.int32))
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = int8_matmul(xq, sx, wq, sw, bias, out_dtype)
        assert torch.equal(got, int8_matmul_reference(xq, sx, wq, sw, bias, out_dtype))


def test_int8_matmul_split_k_and_extreme_codes() -> None:
    """Split-K sums exact int32 partials and applies the scale epilogue once: bit-identical to
    the unsplit kernel and the reference; all -128 codes give the largest accumulators."""
    xq, sx, wq, sw = _int8_operands(5, False)
    config = MatmulConfig(16, 16, 32, split_k=4)
    want = int8_matmul_reference(xq, sx, wq, sw, None, torch.int32)
    assert torch.equal(int8_matmul(xq, sx, wq, sw, None, torch.int32, config=config), want)
    bias = torch.randn(N)
    for out_dtype in (torch.float32, torch.bfloat16):
        split = int8_matmul(xq, sx, wq, sw, bias, out_dtype, config=config)
        whole = int8_matmul(xq, sx, wq, sw, bias, out_dtype, config=MatmulConfig(16, 16, 32))
        assert torch.equal(split, whole)
        assert torch.equal(split, int8_matmul_reference(xq, sx, wq, sw, bias, out_dtype))
    full = torch.full((3, K), -128, dtype=torch.int8)
    acc = int8_matmul(full, sx[:3], full, sx[:3], None, torch.int32)
    assert torch.all(acc == 128 * 128 * K)


def _fp8_operands(m: int) -> tuple[torch.Tensor, ...]:
    xq = (torch.randn(m, K) * 40).to(torch.float8_e4m3fn)
    wq = (torch.randn(N, K) * 40).to(torch.float8_e4m3fn)
    return xq, torch.rand(m, 1) / 100, wq, torch.rand(N, 1) / 100


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fp8_matmul(m: int, out_dtype: torch.dtype) -> None:
    xq, sx, wq, sw = _fp8_operands(m)
    bias = torch.randn(N)
    want = fp8_matmul_reference(xq, sx, wq, sw, bias, out_dtype)
    _assert_close(fp8_matmul(xq, sx, wq, sw, bias, out_dtype), want)
    # uint8 bit patterns (quantkit's fp8 codes) and per-tensor scales
    want = fp8_matmul_reference(xq, sx[:1], wq, sw[:1], None, out_dtype)
    _assert_close(fp8_matmul(xq.view(torch.uint8), sx[:1], wq.view(torch.uint8), sw[:1],
                             None, out_dtype, config=MatmulConfig(64, 16, 256)), want)


# --------------------------------------------------------------------------------------------
# fused SmoothQuant scaling + per-token quantization
# --------------------------------------------------------------------------------------------


def _assert_qparams_equal(got: tuple, want: tuple) -> None:
    for name, g, w in zip(("codes", "scale", "zero"), got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert g.dtype == w.dtype and torch.equal(g, w), f"{name} differ"


@pytest.mark.parametrize("max_block_cols", [None, 64], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "scheme",
    [pytest.param(QuantScheme("int8", "per_token"), id="int8"),
     pytest.param(QuantScheme("int4", "per_token", has_zero=True), id="int4-asym"),
     pytest.param(QuantScheme("int8", "per_token", unsigned=True), id="uint8"),
     pytest.param(QuantScheme("fp8", "per_token"), id="fp8")],
)
def test_smooth_quantize_bit_exact(scheme: QuantScheme, x_dtype: torch.dtype,
                                   max_block_cols: int | None) -> None:
    x = (torch.randn(7, 300) * torch.exp(torch.randn(7, 1))).to(x_dtype)  # rows over binades
    smooth = torch.rand(300) * 3 + 0.01
    got = smooth_quantize_per_token(x, smooth, scheme, max_block_cols=max_block_cols)
    _assert_qparams_equal(got, smooth_quantize_reference(x, smooth, scheme))


def test_smooth_quantize_is_quantize_tensor_of_the_quotient() -> None:
    """For float32 inputs the reference is literally ``quantize_tensor(x / smooth)``; a zero row
    gets scale 1 and zero codes."""
    scheme = QuantScheme("int8", "per_token")
    x = torch.randn(5, 96)
    x[2] = 0.0
    smooth = (torch.rand(96) + 0.5).half()  # fp16 divisors widen exactly
    got = smooth_quantize_per_token(x, smooth, scheme)
    _assert_qparams_equal(got, reference.quantize_tensor(x / smooth.float(), scheme))
    assert got[1][2].item() == 1.0 and not got[0][2].any()


# --------------------------------------------------------------------------------------------
# ops dispatch
# --------------------------------------------------------------------------------------------


def test_ops_dispatch_matmuls() -> None:
    """``backend="torch"`` is the reference; ``"triton"`` the kernel; leading dims kept."""
    scheme = QuantScheme("int2", "per_group", 32, has_zero=True, unsigned=True)
    qweight, scales, qzeros = _weight_storage(scheme, N, K)
    x = torch.randn(2, 2, K).half()
    want = ops.quant_linear_matmul(x, qweight, scales, qzeros, None, scheme, backend="torch")
    assert want.shape == (2, 2, N)
    assert torch.equal(
        want.reshape(4, N), quant_linear_matmul_reference(x.reshape(4, K), qweight, scales,
                                                          qzeros, None, scheme, K))
    _assert_close(ops.quant_linear_matmul(x, qweight, scales, qzeros, None, scheme,
                                          backend="triton"), want)

    xq, sx, wq, sw = _int8_operands(3, False)
    for backend in ("torch", "triton", "auto"):
        assert torch.equal(ops.int8_matmul(xq, sx, wq, sw, None, torch.int32, backend=backend),
                           int8_matmul_reference(xq, sx, wq, sw, None, torch.int32))
    fq, fsx, fwq, fsw = _fp8_operands(3)
    want = ops.fp8_matmul(fq, fsx, fwq, fsw, backend="torch")
    _assert_close(ops.fp8_matmul(fq, fsx, fwq, fsw, backend="triton"), want)

    a_scheme = QuantScheme("int8", "per_token")
    xa, smooth = torch.randn(2, 3, 64), torch.rand(64) + 0.5
    _assert_qparams_equal(ops.smooth_quantize_per_token(xa, smooth, a_scheme, backend="triton"),
                          ops.smooth_quantize_per_token(xa, smooth, a_scheme, backend="torch"))


# --------------------------------------------------------------------------------------------
# bad input: clear errors naming the parameter
# --------------------------------------------------------------------------------------------

_W4 = QuantScheme("int4", "per_group", 32, has_zero=True)
_QW, _SC, _QZ = _weight_storage(_W4, 8, 64)
_X = torch.randn(2, 64).half()
_A8 = QuantScheme("int8", "per_token")


@pytest.mark.parametrize(
    "args, error, match",
    [
        pytest.param((_X.int(), _QW, _SC, _QZ, None, _W4), TypeError, "x must be float16",
                     id="int-x"),
        pytest.param((_X[0], _QW, _SC, _QZ, None, _W4), ValueError, "x must be 2-D", id="1d-x"),
        pytest.param((_X[:, :56], _QW, _SC, _QZ, None, _W4), ValueError,
                     r"qweight must be \(N, 28\)", id="K-mismatch"),
        pytest.param((_X, _QW.view(torch.int8), _SC, _QZ, None, _W4), TypeError,
                     "qweight must be uint8", id="int8-qweight"),
        pytest.param((_X, _QW, _SC[:, :1].expand(8, 3), _QZ, None, _W4), ValueError,
                     r"scales must have shape \(8, 2\)", id="scales-shape"),
        pytest.param((_X, _QW, _SC.double(), _QZ, None, _W4), TypeError,
                     "scales must be float16", id="scales-float64"),
        pytest.param((_X, _QW, _SC, None, None, _W4), ValueError, "qzeros is required",
                     id="qzeros-missing"),
        pytest.param((_X, _QW, _SC, _QZ, None, QuantScheme("int4", "per_group", 32)),
                     ValueError, "qzeros must be None", id="qzeros-symmetric"),
        pytest.param((_X, _QW, _SC, _QZ[:, :2], None, _W4), ValueError,
                     r"qzeros must have shape \(8, 4\)", id="qzeros-cols"),
        pytest.param((_X, _QW, _SC, _QZ, torch.zeros(7), _W4), ValueError,
                     r"bias must have shape \(8,\)", id="bias-shape"),
        pytest.param((_X, _QW, _SC, _QZ, None, "int4"), TypeError,
                     "scheme must be a QuantScheme", id="scheme-str"),
    ],
)
def test_dequant_matmul_rejects_bad_input(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        quant_linear_matmul(*args)


def test_matmul_config_validation() -> None:
    with pytest.raises(ValueError, match="block_n must be a positive power of two"):
        MatmulConfig(16, 48, 32)
    with pytest.raises(ValueError, match="block_m must be >= 16"):
        MatmulConfig(8, 16, 16)
    with pytest.raises(ValueError, match="block_k must be >= 16"):
        MatmulConfig(16, 16, 8)


_XQ, _SX, _WQ, _SW = _int8_operands(3, False)


@pytest.mark.parametrize(
    "fn, args, kwargs, error, match",
    [
        pytest.param(int8_matmul, (_XQ.float(), _SX, _WQ, _SW), {}, TypeError,
                     "xq must be int8", id="int8-float-x"),
        pytest.param(int8_matmul, (_XQ, _SX, _WQ[:, :100], _SW), {}, ValueError,
                     r"wq must be \(N, K=200\)", id="int8-K-mismatch"),
        pytest.param(int8_matmul, (_XQ, _SX, _WQ, _SW[:5]), {}, ValueError,
                     r"w_scale must have shape \(37, 1\)", id="int8-w-scale-shape"),
        pytest.param(int8_matmul, (_XQ, _SX.double(), _WQ, _SW), {}, TypeError,
                     "x_scale must be float32", id="int8-x-scale-float64"),
        pytest.param(int8_matmul, (_XQ, _SX, _WQ, _SW, None, torch.float64), {}, ValueError,
                     "out_dtype must be one of", id="int8-out-float64"),
        pytest.param(fp8_matmul, (_XQ, _SX, _WQ, _SW), {}, TypeError,
                     "xq must be float8_e4m3fn", id="fp8-int8-codes"),
        pytest.param(fp8_matmul, (_XQ.view(torch.uint8), _SX, _WQ.view(torch.uint8), _SW,
                                  None, torch.int32), {}, ValueError,
                     "out_dtype must be one of", id="fp8-int32-out"),
        pytest.param(smooth_quantize_per_token, (_X, torch.ones(63), _A8),
                     {}, ValueError, r"smooth must be .* shape \(64,\)", id="smooth-shape"),
        pytest.param(smooth_quantize_per_token, (_X, torch.ones(64), _W4), {}, ValueError,
                     "one scale per row", id="smooth-per-group"),
        pytest.param(smooth_quantize_per_token, (_X, torch.ones(64), _A8),
                     {"max_block_cols": 48}, ValueError, "max_block_cols must be a power of two",
                     id="smooth-block-cols"),
    ],
)
def test_scaled_matmuls_reject_bad_input(fn, args: tuple, kwargs: dict, error: type,
                                         match: str) -> None:
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_kernels_need_interpreter_or_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="x is on cpu.*TRITON_INTERPRET=1"):
        quant_linear_matmul(_X, _QW, _SC, _QZ, None, _W4)
    with pytest.raises(RuntimeError, match="xq is on cpu"):
        int8_matmul(_XQ, _SX, _WQ, _SW)


# --------------------------------------------------------------------------------------------
# sm90 compilation (no GPU needed)
# --------------------------------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _dequant_case(scheme: QuantScheme, x_dtype: torch.dtype, block_m: int, split_k: int = 1,
                  tile_groups: bool = True, sub_groups: int = 1) -> Case:
    dt = scheme.dtype
    out = "*fp32" if split_k > 1 else ("*i16" if x_dtype == torch.bfloat16 else _PTR[x_dtype])
    scales = {"float16": "*fp16", "float32": "*fp32"}.get(scheme.scale_format, "*u8")
    signature = {
        "x_ptr": _PTR[x_dtype], "qweight_ptr": "*u8", "scales_ptr": scales, "qzeros_ptr": "*u8",
        "global_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": out,
        "M": "i32", "N": "i32", "K": "i32", "group_size": "i32", "block_rows": "i32",
        "stride_xm": "i32", "stride_xk": "constexpr", "stride_qn": "i32", "stride_sn": "i32",
        "stride_sg": "i32", "stride_zn": "i32", "stride_om": "i32", "stride_on": "constexpr",
    }
    constexprs = {
        "stride_xk": 1, "stride_on": 1,
        "BITS": scheme.bits, "SIGNED": dt.is_int and not scheme.unsigned,
        "HAS_ZERO": scheme.has_zero, "IS_FLOAT": dt.is_float, "EXP_BITS": dt.exponent_bits,
        "MANT_BITS": dt.mantissa_bits, "EXP_BIAS": dt.exponent_bias, "TILE_GROUPS": tile_groups,
        "SUB_GROUPS": sub_groups, "SCALE_FMT": SCALE_FMT_OF[scheme.scale_format],
        "HALF": dt.is_int and x_dtype == torch.float16 and scheme.scale_format == "float16",
        "HAS_BIAS": True, "DOT": {torch.float16: "fp16", torch.bfloat16: "bf16",
                                  torch.float32: "fp32"}[x_dtype],
        "OUT_BF16": x_dtype == torch.bfloat16 and split_k == 1,
        "BYTES_P2": 1 << (scheme.bits - 1).bit_length(),
        "BLOCK_M": block_m, "BLOCK_N": 64 if block_m < 64 else 128, "BLOCK_K": 64,
        "SPLIT_K": split_k, "GROUP_M": 8,
    }
    signature |= {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.matmul", "_dequant_matmul_kernel", signature, constexprs)


def _scaled_mm_case(int8: bool, out_dtype: torch.dtype, block_m: int, split_k: int = 1) -> Case:
    raw = out_dtype == torch.int32
    if split_k > 1:
        out = "*i32" if raw else "*fp32"
    else:
        out = {torch.int32: "*i32", torch.bfloat16: "*i16"}.get(out_dtype) or _PTR[out_dtype]
    code = "*i8" if int8 else "*fp8e4nv"
    signature = {
        "a_ptr": code, "b_ptr": code, "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp32",
        "out_ptr": out, "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_ak": "constexpr", "stride_bn": "i32", "stride_bk": "constexpr",
        "stride_sam": "i32", "stride_sbn": "i32", "stride_om": "i32", "stride_on": "constexpr",
    }
    constexprs = {
        "stride_ak": 1, "stride_bk": 1, "stride_on": 1,
        "ACC_INT": int8, "CODES_U8": False, "PROMOTE_K": 0 if int8 else 128,
        "RAW_ACC": raw, "HAS_BIAS": not raw,
        "OUT_BF16": out_dtype == torch.bfloat16 and split_k == 1,
        "BLOCK_M": block_m, "BLOCK_N": 128 if block_m > 16 else 64, "BLOCK_K": 128,
        "SPLIT_K": split_k, "GROUP_M": 8,
    }
    signature |= {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.int8_matmul", "_scaled_mm_kernel", signature, constexprs)


def _smooth_case(scheme: QuantScheme, single: bool) -> Case:
    from quantkit.kernels.quantize import codes_dtype, scheme_constexprs

    signature = {
        "x_ptr": "*fp16", "smooth_ptr": "*fp32",
        "codes_ptr": "*i8" if codes_dtype(scheme) == torch.int8 else "*u8",
        "scale_ptr": "*fp32", "zero_ptr": "*i32" if scheme.has_zero else "*fp32",
        "M": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "constexpr", "stride_cm": "i32",
    }
    constexprs = scheme_constexprs(scheme) | {
        "stride_xk": 1, "SINGLE_CHUNK": single, "BLOCK_M": 1, "BLOCK_K": 4096 if single else 2048,
    }
    signature |= {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.smooth_quant", "_smooth_quant_kernel", signature, constexprs)


def test_kernels_compile_for_sm90() -> None:
    fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    cases = [  # each compile costs ~1.5 s of CPU: one case per distinct code path
        _dequant_case(QuantScheme("int4", "per_group", 128, has_zero=True), fp16, 16, split_k=8),
        _dequant_case(QuantScheme("int4", "per_group", 128, has_zero=True), fp16, 128),
        _dequant_case(QuantScheme("int3", "per_group", 64, unsigned=True), bf16, 64),
        _dequant_case(QuantScheme("int8", "per_group", 100), fp16, 16, split_k=2,
                      tile_groups=False),
        _dequant_case(QuantScheme("fp4", "per_channel"), fp32, 64),
        _dequant_case(QuantScheme("mxfp4", "per_group", 32), bf16, 16, split_k=4, tile_groups=False,
                      sub_groups=2),
        _dequant_case(QuantScheme("nvfp4", "per_group", 16), fp16, 128, tile_groups=False, sub_groups=4),
        _dequant_case(QuantScheme("mxfp6_e3m2", "per_group", 32), fp16, 64, tile_groups=False,
                      sub_groups=2),
        _scaled_mm_case(True, fp16, 128),
        _scaled_mm_case(True, torch.int32, 16, split_k=4),
        _scaled_mm_case(False, bf16, 128),
        _smooth_case(QuantScheme("int8", "per_token"), True),
        _smooth_case(QuantScheme("int4", "per_token", has_zero=True), False),
    ]
    compile_for_cuda(cases)

"""Triton dequantize kernel against :func:`quantkit.reference.dequantize`, bit for bit.

The kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) and is
compiled, not run, for sm90. ``(q - z) * s`` and ``decode(q) * s`` are one or two correctly
rounded fp32 operations, then one rounding to ``out_dtype``, so outputs are compared as raw
bits (``-0.0`` and NaN payloads included), never with a tolerance.
"""

from __future__ import annotations

import pytest
import torch

from quantkit import ops, reference
from quantkit.kernels.dequantize import dequantize
from quantkit.kernels._triton_math import SPECIALS_OF
from quantkit.kernels.quantize import scheme_constexprs
from quantkit.scheme import QuantScheme
from tests.sm90 import Case, compile_for_cuda

DTYPES = [
    pytest.param(
        name, zero, unsigned,
        id=name + ("-asym" if zero else "") + ("-unsigned" if unsigned else ""),
    )
    for name in ("int2", "int3", "int4", "int8")
    for zero in (False, True)
    for unsigned in (False, True)
] + [pytest.param(name, False, False, id=name) for name in ("fp4", "fp8", "fp8_e5m2")]

GRANULARITIES = [
    pytest.param("per_tensor", -1, (13, 576), id="tensor"),
    pytest.param("per_channel", -1, (13, 576), id="channel"),
    pytest.param("per_token", -1, (1, 576), id="token-1row"),
    pytest.param("per_group", 32, (13, 576), id="g32"),
    pytest.param("per_group", 128, (13, 576), id="g128-short-last"),
    pytest.param("per_group", 32, (13, 100), id="g32-100cols"),
    pytest.param("per_group", 7, (5, 61), id="g7-61cols"),
]

# large random scales overflow fp16 outputs (and some fp32 products) to inf on purpose, as in
# the reference; the interpreter's numpy arithmetic warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same bits (so -0.0 != 0.0), except that any NaN equals any NaN: torch's own NaN
    payloads differ between its scalar and vectorised casts."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaNs differ"
    differ = got.view(_BITS_VIEW[got.dtype]) != want.view(_BITS_VIEW[want.dtype])
    mismatch = (differ & ~nan).sum().item()
    assert mismatch == 0, f"{mismatch} values differ"


def _codes_and_qparams(
    scheme: QuantScheme, rows: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every code of the grid (any byte pattern for float grids), scales over many binades."""
    x = torch.randn(rows, cols) * torch.exp(2 * torch.randn(rows, 1))
    codes, scale, zero = reference.quantize_tensor(x, scheme)
    if scheme.dtype.is_float:  # all bit patterns, including those torch reads as NaN/inf
        codes = torch.randint(0, 1 << scheme.bits, (rows, cols), dtype=torch.uint8)
    else:
        codes = torch.randint(scheme.qmin, scheme.qmax + 1, (rows, cols)).to(codes.dtype)
    if zero is not None:  # zero points anywhere on the grid
        zero = torch.randint(scheme.qmin, scheme.qmax + 1, zero.shape, dtype=torch.int32)
    scale = scale * torch.exp(3 * torch.randn_like(scale))
    return codes, scale, zero


def _check(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           scheme: QuantScheme, out_dtype: torch.dtype) -> None:
    want = reference.dequantize(codes, scale, zero, scheme, out_dtype)
    _assert_bits_equal(dequantize(codes, scale, zero, scheme, out_dtype), want)


@pytest.mark.interpreter
@pytest.mark.parametrize("granularity, groupsize, shape", GRANULARITIES)
@pytest.mark.parametrize("name, has_zero, unsigned", DTYPES)
def test_dequantize_matches_reference(
    name: str, has_zero: bool, unsigned: bool, granularity: str, groupsize: int,
    shape: tuple[int, int],
) -> None:
    scheme = QuantScheme(name, granularity, groupsize, has_zero=has_zero, unsigned=unsigned)
    _check(*_codes_and_qparams(scheme, *shape), scheme, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "granularity, groupsize, shape",
    [p for p in GRANULARITIES if p.id in ("tensor", "channel", "g128-short-last", "g7-61cols")],
)
@pytest.mark.parametrize(
    "name, has_zero, unsigned",
    [p for p in DTYPES if p.id in ("int4-asym", "int8", "int3-unsigned", "fp4", "fp8", "fp8_e5m2")],
)
def test_dequantize_half_outputs(
    name: str, has_zero: bool, unsigned: bool, granularity: str, groupsize: int,
    shape: tuple[int, int], out_dtype: torch.dtype,
) -> None:
    """fp16/bf16 outputs are the fp32 result rounded once (ties to even), like ``.to()``."""
    scheme = QuantScheme(name, granularity, groupsize, has_zero=has_zero, unsigned=unsigned)
    _check(*_codes_and_qparams(scheme, *shape), scheme, out_dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "scheme, shape",
    [
        pytest.param(QuantScheme("int4", "per_group", 1, has_zero=True), (3, 5), id="g1"),
        pytest.param(QuantScheme("int8", "per_group", 5), (3, 5), id="g-equals-cols"),
        pytest.param(QuantScheme("fp8", "per_channel"), (1, 1), id="1x1"),
        pytest.param(QuantScheme("int4", "per_group", 100, has_zero=True), (2, 301),
                     id="g100-last-group-of-1"),
        pytest.param(QuantScheme("fp4", "per_group", 3), (2, 3000), id="wide-g3"),
        pytest.param(QuantScheme("int3", "per_tensor", has_zero=True), (600, 3), id="tall"),
        pytest.param(QuantScheme("int8", "per_token", has_zero=True), (3, 20000), id="long-rows"),
    ],
)
def test_dequantize_odd_shapes(scheme: QuantScheme, shape: tuple[int, int]) -> None:
    for out_dtype in OUT_DTYPES:
        _check(*_codes_and_qparams(scheme, *shape), scheme, out_dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dequantize_rounds_ties_to_even(out_dtype: torch.dtype) -> None:
    """Products exactly halfway between two fp16/bf16 values, and subnormal products (the
    interpreter's own bf16 cast truncates and flushes them)."""
    mant = 10 if out_dtype == torch.float16 else 7
    half_ulp = 2.0 ** -(mant + 1)
    scheme = QuantScheme("int8", "per_channel")
    scale = torch.tensor([[1 + half_ulp], [1 + 3 * half_ulp], [-(1 + half_ulp)], [2 ** -130]])
    codes = torch.tensor([[1, -1, 2, 64, 127, 0]], dtype=torch.int8).expand(4, 6).contiguous()
    want = reference.dequantize(codes, scale, None, scheme, out_dtype)
    got = dequantize(codes, scale, None, scheme, out_dtype)
    _assert_bits_equal(got, want)
    assert got[0, 0].item() == 1.0 and got[1, 0].item() == 1 + 4 * half_ulp  # down, up to even


@pytest.mark.interpreter
def test_dequantize_overflow_and_special_scales() -> None:
    """fp16 overflow to inf, inf/NaN/negative/subnormal scales: same bits as the reference."""
    scheme = QuantScheme("int8", "per_channel", has_zero=True)
    codes = torch.randint(-128, 128, (6, 50), dtype=torch.int8)
    zero = torch.randint(-128, 128, (6, 1), dtype=torch.int32)
    scale = torch.tensor([[1e6], [float("inf")], [float("nan")], [-3.0], [1e-40], [3e38]])
    for out_dtype in OUT_DTYPES:
        _check(codes, scale, zero, scheme, out_dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param(QuantScheme("int4", "per_group", 32, has_zero=True), id="int4-g32-asym"),
        pytest.param(QuantScheme("int8", "per_token"), id="int8-token"),
        pytest.param(QuantScheme("fp8", "per_channel"), id="fp8-channel"),
    ],
)
def test_dequantize_broadcast_and_strided(scheme: QuantScheme) -> None:
    codes, scale, zero = _codes_and_qparams(scheme, 64, 96)
    z_row = None if zero is None else zero[:1]
    _check(codes, scale[:1], z_row, scheme, torch.float32)  # (1, G) / (1, 1) broadcast
    _check(codes, scale.half(), zero, scheme, torch.float32)  # fp16 scales widen exactly
    _check(codes[::2, 5:90], scale[::2], None if zero is None else zero[::2], scheme, torch.float32)
    codes_t = codes.t().contiguous().t()  # column-major codes
    _check(codes_t, scale.t().contiguous().t(), zero, scheme, torch.bfloat16)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param(QuantScheme("int4", "per_group", 32, has_zero=True), id="int4-g32-asym"),
        pytest.param(QuantScheme("int3", "per_group", 7, unsigned=True), id="int3-g7-unsigned"),
        pytest.param(QuantScheme("int8", "per_tensor"), id="int8-tensor"),
        pytest.param(QuantScheme("fp8", "per_token"), id="fp8-token"),
        pytest.param(QuantScheme("fp8_e5m2", "per_channel"), id="fp8_e5m2-channel"),
        pytest.param(QuantScheme("fp4", "per_group", 16), id="fp4-g16"),
    ],
)
@pytest.mark.parametrize("x_dtype", OUT_DTYPES, ids=str)
def test_ops_triton_backend_matches_reference(scheme: QuantScheme, x_dtype: torch.dtype) -> None:
    """``quantkit.ops`` with ``backend="triton"``: dequantize and the fake-quantize round trip."""
    codes, scale, zero = _codes_and_qparams(scheme, 6, 100)
    for out_dtype in OUT_DTYPES:
        _assert_bits_equal(
            ops.dequantize(codes, scale, zero, scheme, out_dtype, backend="triton"),
            reference.dequantize(codes, scale, zero, scheme, out_dtype),
        )
    x = (torch.randn(2, 3, 100) * 3).to(x_dtype)
    _assert_bits_equal(
        ops.fake_quantize(x, scheme, backend="triton").reshape(6, 100),
        reference.fake_quantize(x, scheme).reshape(6, 100),
    )


# --------------------------------------------------------------------------------------------
# bad input: clear errors naming the parameter
# --------------------------------------------------------------------------------------------

_INT4 = QuantScheme("int4", "per_group", 32, has_zero=True)
_CODES = torch.zeros(4, 64, dtype=torch.int8)
_SCALE = torch.ones(4, 2)
_ZERO = torch.zeros(4, 2, dtype=torch.int32)


@pytest.mark.parametrize(
    "codes, scale, zero, scheme, out_dtype, error, match",
    [
        pytest.param(_CODES.float(), _SCALE, _ZERO, _INT4, torch.float32, TypeError,
                     "codes must be int8, uint8", id="float-codes"),
        pytest.param(_CODES.view(torch.uint8), _SCALE, _ZERO, _INT4, torch.float32, TypeError,
                     "codes must be int8 for int4 g32 asym", id="unsigned-codes-for-signed"),
        pytest.param(_CODES, torch.ones(1, 1), None, QuantScheme("fp8", "per_tensor"),
                     torch.float32, TypeError, "codes must be uint8 for fp8",
                     id="int8-codes-for-fp8"),
        pytest.param(_CODES[0], _SCALE, _ZERO, _INT4, torch.float32, ValueError,
                     "codes must be 2-D", id="1d-codes"),
        pytest.param(_CODES[:0], _SCALE, _ZERO, _INT4, torch.float32, ValueError,
                     "codes must be non-empty", id="empty-codes"),
        pytest.param(_CODES, _SCALE, _ZERO, _INT4, torch.float64, ValueError,
                     "out_dtype must be float32, float16 or bfloat16", id="float64-out"),
        pytest.param(_CODES, _SCALE, _ZERO, _INT4, torch.int8, ValueError,
                     "out_dtype must be", id="int-out"),
        pytest.param(_CODES, torch.ones(4, 3), _ZERO, _INT4, torch.float32, ValueError,
                     r"scale must have shape \(4, 2\)", id="scale-shape"),
        pytest.param(_CODES, _SCALE.double(), _ZERO, _INT4, torch.float32, TypeError,
                     "scale must be float32", id="scale-float64"),
        pytest.param(_CODES, _SCALE, None, _INT4, torch.float32, ValueError,
                     "zero is required", id="zero-missing"),
        pytest.param(_CODES, _SCALE, _ZERO.float(), _INT4, torch.float32, TypeError,
                     "zero must be int32", id="zero-float"),
        pytest.param(_CODES, torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32),
                     QuantScheme("int8", "per_token"), torch.float32, ValueError,
                     "zero must be None", id="zero-without-zero-point"),
        pytest.param(_CODES[:, :16], _SCALE, _ZERO, _INT4, torch.float32, ValueError,
                     "groupsize=32 is larger", id="groupsize-gt-cols"),
        pytest.param(_CODES, _SCALE, _ZERO, "int4", torch.float32, TypeError,
                     "scheme must be a QuantScheme", id="scheme-str"),
    ],
)
def test_dequantize_rejects_bad_input(
    codes: torch.Tensor, scale: object, zero: object, scheme: object, out_dtype: torch.dtype,
    error: type, match: str,
) -> None:
    with pytest.raises(error, match=match):
        dequantize(codes, scale, zero, scheme, out_dtype)


def test_dequantize_needs_interpreter_or_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="codes is on cpu.*TRITON_INTERPRET=1"):
        dequantize(_CODES, _SCALE, _ZERO, _INT4)


# --------------------------------------------------------------------------------------------
# sm90 compilation (no GPU needed)
# --------------------------------------------------------------------------------------------

_OUT_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*i16"}  # bf16 bits


def _dequantize_case(scheme: QuantScheme, out_dtype: torch.dtype, contiguous: bool = True) -> Case:
    consts = scheme_constexprs(scheme)
    signature = {
        "codes_ptr": "*u8" if scheme.dtype.is_float or scheme.unsigned else "*i8",
        "scale_ptr": "*fp32", "zero_ptr": "*i32" if scheme.has_zero else "*fp32",
        "out_ptr": _OUT_TYPES[out_dtype],
        "rows": "i32", "cols": "i32", "group_size": "i32", "block_rows": "i32",
        "stride_cm": "i32", "stride_cn": "constexpr" if contiguous else "i32",
        "stride_sm": "i32", "stride_sg": "i32", "stride_zm": "i32", "stride_zg": "i32",
        "stride_om": "i32", "stride_on": "constexpr",
    }
    constexprs = {k: consts[k] for k in ("IS_FLOAT", "HAS_ZERO", "EXP_BITS", "MANT_BITS", "BIAS")}
    constexprs |= {
        "SPECIALS": SPECIALS_OF[scheme.dtype.specials],
        "PER_GROUP": scheme.granularity == "per_group", "OUT_BF16": out_dtype == torch.bfloat16,
        "BLOCK_M": 8, "BLOCK_N": 1024, "stride_on": 1,
    }
    if contiguous:  # Triton specialises unit strides of contiguous tensors to constants
        constexprs["stride_cn"] = 1
    signature |= {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.dequantize", "_dequantize_kernel", signature, constexprs)


def test_kernel_compiles_for_sm90() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = [
        _dequantize_case(QuantScheme("int4", "per_group", 128, has_zero=True), fp16),
        _dequantize_case(QuantScheme("int4", "per_group", 128), bf16),
        _dequantize_case(QuantScheme("int8", "per_channel", has_zero=True, unsigned=True), fp32),
        _dequantize_case(QuantScheme("int8", "per_token"), bf16),
        _dequantize_case(QuantScheme("fp8", "per_tensor"), bf16),
        _dequantize_case(QuantScheme("fp8_e5m2", "per_channel"), fp16),
        _dequantize_case(QuantScheme("fp4", "per_group", 32), bf16),
        _dequantize_case(QuantScheme("mxfp6_e3m2", "per_group", 32), fp16),
        _dequantize_case(QuantScheme("fp8_block", "per_group", 128, block_rows=128), bf16),
        _dequantize_case(
            QuantScheme("int4", "per_group", 32, has_zero=True), fp32, contiguous=False
        ),
    ]
    compile_for_cuda(cases)

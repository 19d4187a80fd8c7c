"""Triton quantize kernels against :mod:`quantkit.reference`, bit for bit.

The kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) and are
compiled, not run, for sm90. Every step of the math is a correctly rounded fp32 operation,
so codes, scales and zeros are compared exactly (``torch.equal``), never with a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops, reference
from quantkit.kernels.quantize import quantize, quantize_with_qparams, scale_constexprs, scheme_constexprs
from quantkit.scheme import QuantScheme
from tests.sm90 import Case, compile_for_cuda

# (dtype, has_zero, unsigned, symmetric_range): every integer variant (symmetric signed grids
# with the full and the restricted range) and every float grid
DTYPES = [
    pytest.param(
        name, zero, unsigned, "full",
        id=name + ("-asym" if zero else "") + ("-unsigned" if unsigned else ""),
    )
    for name in ("int2", "int3", "int4", "int8")
    for zero in (False, True)
    for unsigned in (False, True)
] + [
    pytest.param(name, False, False, "restricted", id=f"{name}-restricted")
    for name in ("int2", "int3", "int4", "int8")
] + [pytest.param(name, False, False, "full", id=name) for name in ("fp4", "fp8", "fp8_e5m2")]

# (granularity, groupsize, shape): g128 on 576 columns leaves a 64-column last group
GRANULARITIES = [
    pytest.param("per_tensor", -1, (13, 576), id="tensor"),
    pytest.param("per_channel", -1, (13, 576), id="channel"),
    pytest.param("per_token", -1, (13, 576), id="token"),
    pytest.param("per_group", 32, (13, 576), id="g32"),
    pytest.param("per_group", 64, (13, 576), id="g64"),
    pytest.param("per_group", 128, (13, 576), id="g128-short-last"),
    pytest.param("per_group", -1, (13, 576), id="g-1"),
    pytest.param("per_group", 32, (13, 100), id="g32-100cols"),
    pytest.param("per_group", 7, (5, 61), id="g7-61cols"),
]

REPRESENTATIVE = [  # one scheme per code path, for the tests that vary something else
    pytest.param(QuantScheme("int4", "per_group", 32, has_zero=True), id="int4-g32-asym"),
    pytest.param(QuantScheme("int8", "per_token"), id="int8-token"),
    pytest.param(QuantScheme("int4", "per_group", 32, symmetric_range="restricted"), id="int4-g32-restricted"),
    pytest.param(QuantScheme("int3", "per_channel", unsigned=True), id="int3-channel-unsigned"),
    pytest.param(QuantScheme("fp8", "per_tensor"), id="fp8-tensor"),
    pytest.param(QuantScheme("fp8_e5m2", "per_group", 64), id="fp8_e5m2-g64"),
    pytest.param(QuantScheme("fp4", "per_group", 16), id="fp4-g16"),
]


def _sample(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian rows of very different magnitudes, with outliers, exact zeros and a -0.0."""
    x = torch.randn(rows, cols) * torch.exp(2 * torch.randn(rows, 1))  # (rows, cols)
    x[:, :: max(1, cols // 5)] *= 8.0  # outliers
    x[:, 1::11] = 0.0
    x[0, 0] = -0.0
    return x.to(dtype)


def _assert_qparams_equal(got: tuple, want: tuple) -> None:
    codes, scale, zero = got
    ref_codes, ref_scale, ref_zero = want
    assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    assert torch.equal(scale, ref_scale), "scales differ"
    if ref_zero is None:
        assert zero is None
    else:
        assert zero.dtype == torch.int32 and torch.equal(zero, ref_zero), "zeros differ"
    mismatch = (codes.to(torch.int32) != ref_codes.to(torch.int32)).sum().item()
    assert mismatch == 0, f"{mismatch} codes differ"


def _check(x: torch.Tensor, scheme: QuantScheme, **kwargs: int) -> None:
    """The launcher equals the reference: codes, scale and zero."""
    _assert_qparams_equal(quantize(x, scheme, **kwargs), reference.quantize_tensor(x, scheme))


# --------------------------------------------------------------------------------------------
# quantize: scales computed in the kernel
# --------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("granularity, groupsize, shape", GRANULARITIES)
@pytest.mark.parametrize("name, has_zero, unsigned, symmetric_range", DTYPES)
def test_quantize_matches_reference(
    name: str, has_zero: bool, unsigned: bool, symmetric_range: str, granularity: str,
    groupsize: int, shape: tuple[int, int],
) -> None:
    scheme = QuantScheme(name, granularity, groupsize, has_zero=has_zero, unsigned=unsigned,
                         symmetric_range=symmetric_range)
    _check(_sample(*shape), scheme)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "granularity, groupsize, shape",
    [
        pytest.param("per_channel", -1, (1, 1), id="1x1"),
        pytest.param("per_tensor", -1, (1, 300), id="tensor-1x300"),
        pytest.param("per_token", -1, (1, 300), id="token-1x300"),
        pytest.param("per_group", 1, (3, 5), id="g1"),
        pytest.param("per_group", 5, (3, 5), id="g-equals-cols"),
        pytest.param("per_group", 3, (2, 3000), id="g3-wide"),
        pytest.param("per_group", 100, (1, 301), id="g100-last-group-of-1"),
        pytest.param("per_channel", -1, (600, 3), id="tall"),
        pytest.param("per_tensor", -1, (300, 7), id="tensor-tall"),
    ],
)
@pytest.mark.parametrize(
    "scheme_kwargs",
    [
        pytest.param(dict(dtype="int4", has_zero=True), id="int4-asym"),
        pytest.param(dict(dtype="int8"), id="int8"),
        pytest.param(dict(dtype="fp8"), id="fp8"),
        pytest.param(dict(dtype="fp4"), id="fp4"),
    ],
)
def test_quantize_odd_shapes(
    scheme_kwargs: dict, granularity: str, groupsize: int, shape: tuple[int, int]
) -> None:
    scheme = QuantScheme(granularity=granularity, groupsize=groupsize, **scheme_kwargs)
    _check(_sample(*shape), scheme)


@pytest.mark.interpreter
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", REPRESENTATIVE)
def test_quantize_input_dtypes(scheme: QuantScheme, x_dtype: torch.dtype) -> None:
    _check(_sample(13, 576, x_dtype), scheme)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "granularity, groupsize",
    [("per_channel", -1), ("per_tensor", -1), ("per_group", 300), ("per_group", 64)],
    ids=["channel", "tensor", "g300", "g64"],
)
@pytest.mark.parametrize("name, has_zero", [("int4", True), ("int8", False), ("fp8", False)],
                         ids=["int4-asym", "int8", "fp8"])
def test_quantize_chunked_long_groups(
    name: str, has_zero: bool, granularity: str, groupsize: int
) -> None:
    """Groups longer than ``max_block_cols`` take the two-pass chunk loop (and odd tails)."""
    scheme = QuantScheme(name, granularity, groupsize, has_zero=has_zero)
    x = _sample(5, 1000, torch.float16)
    _check(x, scheme, max_block_cols=64)


@pytest.mark.interpreter
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_quantize_long_rows(granularity: str) -> None:
    """An LLM-sized row (14336) with the default tiles, and beyond the single-pass limit."""
    scheme = QuantScheme("int8", granularity, has_zero=True)
    _check(_sample(2, 14336, torch.bfloat16), scheme)
    _check(_sample(2, 70000, torch.bfloat16), scheme)  # > 65536: chunked in the interpreter


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme", REPRESENTATIVE)
def test_quantize_all_zero_rows(scheme: QuantScheme) -> None:
    x = _sample(6, 192)
    x[2] = 0.0
    x[4] = -0.0
    _check(x, scheme)
    _check(torch.zeros(3, 192), scheme)  # every scale is 1, every zero point qmin or 0


@pytest.mark.interpreter
def test_quantize_ties_round_half_to_even() -> None:
    """Values landing exactly on .5 after scaling (scale 1) round to even, as torch.round."""
    # full range: amax 127.5 -> s = 1; -127.5 -> -128, +127.5 -> 128 clamped to 127
    halves = torch.arange(-128, 128, dtype=torch.float32) + 0.5  # (256,) all ties
    x = halves.reshape(1, -1)
    scheme = QuantScheme("int8", "per_token")
    codes, scale, _ = quantize(x, scheme)
    assert scale.item() == 1.0
    assert torch.equal(codes[0].float(), torch.round(halves).clamp(-128, 127))
    assert (codes.min().item(), codes.max().item()) == (-128, 127)
    _check(x, scheme)
    # restricted range: amax 127 -> s = 1
    halves = torch.arange(-127, 127, dtype=torch.float32) + 0.5  # (254,) all ties
    x = torch.cat([halves, torch.tensor([127.0, -127.0])]).reshape(1, -1)
    scheme = QuantScheme("int8", "per_token", symmetric_range="restricted")
    codes, scale, _ = quantize(x, scheme)
    assert scale.item() == 1.0
    assert torch.equal(codes[0, :254].float(), torch.round(halves))
    _check(x, scheme)
    # zero point tie: lo = -1.5, hi = 13.5 -> s = 15 / 15 = 1, z = round(-8 + 1.5) = -6
    x = torch.tensor([[-1.5, 13.5, 0.5, 2.5, -0.5]])
    scheme = QuantScheme("int4", "per_channel", has_zero=True)
    codes, scale, zero = quantize(x, scheme)
    assert scale.item() == 1.0 and zero.item() == -6
    _check(x, scheme)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["fp4", "fp8", "fp8_e5m2"])
def test_quantize_float_grid_ties(name: str) -> None:
    """Midpoints between neighbouring grid values (scale 1) round to the even mantissa."""
    scheme = QuantScheme(name, "per_tensor")
    dt = scheme.dtype
    grid = reference.decode_minifloat(torch.arange(1 << (dt.bits - 1), dtype=torch.uint8), dt)
    grid = grid[grid <= dt.max_value]  # (n,) non-negative finite grid
    mids = (grid[1:] + grid[:-1]) / 2  # exact in fp32
    x = torch.cat([mids, -mids, grid, torch.tensor([dt.max_value])]).reshape(1, -1)
    codes, scale, _ = quantize(x, scheme)
    assert scale.item() == 1.0
    _check(x, scheme)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # bf16 max / 0.125
@pytest.mark.parametrize("name", ["fp4", "fp8", "fp8_e5m2"])
def test_float_grid_codes_of_every_fp16_and_bf16_value(name: str) -> None:
    """Every finite fp16 and bf16 number (scale 1 and 0.125): the bit-arithmetic minifloat
    rounding equals torch's float8 casts (and the fp4 reference) everywhere, from subnormals
    through ties to saturation."""
    scheme = QuantScheme(name, "per_tensor")
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = patterns.view(dtype).float()
        x = x[torch.isfinite(x)].reshape(1, -1)  # (1, n) every finite value
        for s in (1.0, 0.125):
            _check_given(x, torch.full((1, 1), s), None, scheme)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, on purpose
@pytest.mark.parametrize("scheme", REPRESENTATIVE)
def test_quantize_extreme_magnitudes(scheme: QuantScheme) -> None:
    """Subnormal rows, rows near the fp32 maximum, and ``hi - lo`` overflowing to inf."""
    x = _sample(4, 128)
    x[0] = x[0] * 1e-39  # subnormal fp32 values
    x[1, :3] = torch.tensor([1e-45, -3e-45, 7e-45])
    x[1, 3:] = 0.0
    x[2] = x[2] / x[2].abs().max() * 3e38
    x[3, :2] = torch.tensor([3e38, -3e38])  # (hi - lo) overflows: scale inf for zero points
    _check(x, scheme)


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme", REPRESENTATIVE)
def test_quantize_strided_inputs(scheme: QuantScheme) -> None:
    base = _sample(192, 160)
    for view in (base.t(), base[::2, 3:150]):  # (160, 192) column-major, (96, 147) row stride 320
        want = reference.quantize_tensor(view, scheme)
        _assert_qparams_equal(quantize(view, scheme), want)


@pytest.mark.interpreter
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", REPRESENTATIVE + [
    pytest.param(
        QuantScheme("int2", "per_group", 7, has_zero=True, unsigned=True),
        id="int2-g7-asym-unsigned",
    ),
])
def test_ops_triton_backend_matches_reference(scheme: QuantScheme, x_dtype: torch.dtype) -> None:
    """``quantkit.ops`` with ``backend="triton"`` reaches the kernels (leading dims flattened)."""
    x = _sample(6, 100, x_dtype).reshape(2, 3, 100)
    want = reference.quantize_tensor(x, scheme)
    _assert_qparams_equal(ops.quantize(x, scheme, backend="triton"), want)
    _assert_qparams_equal(ops.quantize(x, scheme, backend="auto"), want)  # CPU: the reference
    codes = ops.quantize_with_qparams(x, want[1], want[2], scheme, backend="triton")
    assert torch.equal(codes, want[0])


@pytest.mark.interpreter
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 200),
    data=st.data(),
    name=st.sampled_from(["int2", "int3", "int4", "int8", "fp4", "fp8", "fp8_e5m2"]),
    asym=st.booleans(),
    unsigned=st.booleans(),
    restricted=st.booleans(),
    log_scale=st.floats(-30, 30),
)
def test_quantize_random_schemes(
    rows: int, cols: int, data: st.DataObject, name: str, asym: bool, unsigned: bool,
    restricted: bool, log_scale: float,
) -> None:
    gran = data.draw(st.sampled_from(["per_tensor", "per_channel", "per_token", "per_group"]))
    groupsize = data.draw(st.integers(1, cols)) if gran == "per_group" else -1
    is_int = name.startswith("int")
    symmetric = is_int and not asym and not unsigned
    scheme = QuantScheme(
        name, gran, groupsize, has_zero=asym and is_int, unsigned=unsigned and is_int,
        symmetric_range="restricted" if restricted and symmetric else "full",
    )
    x = torch.randn(rows, cols) * 2.0**log_scale
    _assert_qparams_equal(quantize(x, scheme), reference.quantize_tensor(x, scheme))


# --------------------------------------------------------------------------------------------
# quantize_with_qparams: given scales
# --------------------------------------------------------------------------------------------


def _check_given(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 scheme: QuantScheme, **kwargs: int) -> None:
    want = reference.quantize(x, scale, zero, scheme)
    got = quantize_with_qparams(x, scale, zero, scheme, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    mismatch = (got.to(torch.int32) != want.to(torch.int32)).sum().item()
    assert mismatch == 0, f"{mismatch} codes differ"


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "granularity, groupsize, shape",
    [p for p in GRANULARITIES if p.id in ("tensor", "token", "g128-short-last", "g7-61cols")],
)
@pytest.mark.parametrize("name, has_zero, unsigned, symmetric_range", DTYPES)
def test_quantize_with_qparams_saturates(
    name: str, has_zero: bool, unsigned: bool, symmetric_range: str, granularity: str,
    groupsize: int, shape: tuple[int, int],
) -> None:
    """Scales too small for the data: most values land far outside the grid and saturate."""
    scheme = QuantScheme(name, granularity, groupsize, has_zero=has_zero, unsigned=unsigned,
                         symmetric_range=symmetric_range)
    x = _sample(*shape)
    scale, zero = reference.compute_qparams(x, scheme)
    scale = scale * torch.exp(torch.randn_like(scale) - 2.0)  # (scale shape) mostly too small
    x[0, :4] = torch.tensor([1e30, -1e30, float("inf"), float("-inf")])
    _check_given(x, scale, zero, scheme)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, on purpose
@pytest.mark.parametrize("scheme", REPRESENTATIVE)
def test_quantize_with_qparams_huge_ratios(scheme: QuantScheme) -> None:
    """``x / s`` far beyond 2**22 (and inf) is clamped before the rounding trick."""
    x = _sample(4, 256, torch.float16)
    scale, zero = reference.compute_qparams(x, scheme)
    _check_given(x, torch.full_like(scale, 1e-30), zero, scheme)
    _check_given(x, torch.full_like(scale, 1e-45), zero, scheme)  # smallest subnormal


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param(QuantScheme("int8", "per_token"), id="int8-token"),
        pytest.param(QuantScheme("int8", "per_token", has_zero=True), id="int8-token-asym"),
        pytest.param(QuantScheme("fp8", "per_channel"), id="fp8-channel"),
        pytest.param(QuantScheme("int4", "per_group", 32, has_zero=True), id="int4-g32-asym"),
    ],
)
def test_quantize_with_qparams_broadcast_scales(scheme: QuantScheme) -> None:
    """A static ``(1, 1)`` scale for a per-row scheme; ``(1, G)`` group scales; fp16 scales."""
    x = _sample(7, 96)
    scale, zero = reference.compute_qparams(x, scheme)
    one_row = scale[:1]  # (1, 1) or (1, G)
    z_row = None if zero is None else zero[:1]
    _check_given(x, one_row, z_row, scheme)
    _check_given(x, scale.half(), zero, scheme)
    _check_given(x, scale.t().contiguous().t(), zero, scheme)  # non-contiguous scales


@pytest.mark.interpreter
@pytest.mark.parametrize("granularity, groupsize", [("per_channel", -1), ("per_group", 200)],
                         ids=["channel", "g200"])
def test_quantize_with_qparams_chunked(granularity: str, groupsize: int) -> None:
    scheme = QuantScheme("int4", granularity, groupsize, has_zero=True)
    x = _sample(3, 1000)
    scale, zero = reference.compute_qparams(x, scheme)
    _check_given(x, scale, zero, scheme, max_block_cols=64)


# --------------------------------------------------------------------------------------------
# bad input: clear errors naming the parameter
# --------------------------------------------------------------------------------------------

_INT4 = QuantScheme("int4", "per_group", 32, has_zero=True)


@pytest.mark.parametrize(
    "x, scheme, error, match",
    [
        pytest.param([[1.0]], _INT4, TypeError, "x must be a torch.Tensor", id="not-tensor"),
        pytest.param(torch.randn(64), _INT4, ValueError, "x must be 2-D", id="1d"),
        pytest.param(torch.randn(2, 2, 64), _INT4, ValueError, "x must be 2-D", id="3d"),
        pytest.param(torch.randn(0, 64), _INT4, ValueError, "x must be non-empty", id="empty"),
        pytest.param(torch.ones(2, 64, dtype=torch.int32), _INT4, TypeError, "x must be float32",
                     id="int-x"),
        pytest.param(torch.randn(2, 64, dtype=torch.float64), _INT4, TypeError,
                     "x must be float32", id="float64-x"),
        pytest.param(torch.randn(2, 16), _INT4, ValueError, "groupsize=32 is larger",
                     id="groupsize-gt-cols"),
        pytest.param(torch.randn(2, 64), "int4", TypeError, "scheme must be a QuantScheme",
                     id="scheme-str"),
    ],
)
def test_quantize_rejects_bad_input(x: object, scheme: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        quantize(x, scheme)
    if isinstance(x, torch.Tensor) and isinstance(scheme, QuantScheme):
        with pytest.raises(error, match=match):
            quantize_with_qparams(x, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), scheme)


def test_quantize_rejects_bad_block_cols() -> None:
    with pytest.raises(ValueError, match="max_block_cols must be a power of two"):
        quantize(torch.randn(2, 64), _INT4, max_block_cols=48)


def test_quantize_needs_interpreter_or_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="x is on cpu.*TRITON_INTERPRET=1"):
        quantize(torch.randn(2, 64), _INT4)


@pytest.mark.parametrize(
    "scale, zero, scheme, error, match",
    [
        pytest.param(torch.ones(4, 3), torch.zeros(4, 2, dtype=torch.int32), _INT4, ValueError,
                     r"scale must have shape \(4, 2\)", id="scale-shape"),
        pytest.param(torch.ones(8), torch.zeros(4, 2, dtype=torch.int32), _INT4, ValueError,
                     "scale must have shape", id="scale-1d"),
        pytest.param(torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.int32),
                     _INT4, TypeError, "scale must be float32", id="scale-float64"),
        pytest.param(2.0, torch.zeros(4, 2, dtype=torch.int32), _INT4, TypeError,
                     "scale must be a torch.Tensor", id="scale-float"),
        pytest.param(torch.ones(4, 2), None, _INT4, ValueError, "zero is required",
                     id="zero-missing"),
        pytest.param(torch.ones(4, 2), torch.zeros(4, 2), _INT4, TypeError, "zero must be int32",
                     id="zero-float"),
        pytest.param(torch.ones(4, 2), torch.zeros(3, 2, dtype=torch.int32), _INT4, ValueError,
                     r"zero must have shape \(4, 2\)", id="zero-shape"),
        pytest.param(torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32),
                     QuantScheme("int8", "per_token"), ValueError, "zero must be None",
                     id="zero-without-zero-point"),
        pytest.param(torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32),
                     QuantScheme("fp8", "per_token"), ValueError, "zero must be None",
                     id="zero-with-fp8"),
    ],
)
def test_quantize_with_qparams_rejects_bad_qparams(
    scale: object, zero: object, scheme: QuantScheme, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        quantize_with_qparams(torch.randn(4, 64), scale, zero, scheme)


# --------------------------------------------------------------------------------------------
# sm90 compilation (no GPU needed)
# --------------------------------------------------------------------------------------------

_X_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _quantize_case(
    scheme: QuantScheme, x_dtype: torch.dtype, *, compute: bool, single: bool,
    contiguous: bool = True,
) -> Case:
    consts = scheme_constexprs(scheme) | scale_constexprs(scheme)
    codes_type = "*u8" if scheme.dtype.is_float or scheme.unsigned else "*i8"
    signature = {
        "x_ptr": _X_TYPES[x_dtype], "codes_ptr": codes_type, "scale_ptr": "*fp32",
        "zero_ptr": "*i32" if scheme.has_zero else "*fp32", "global_ptr": "*fp32",
        "cols": "i32", "num_segments": "i32", "num_groups": "i32", "group_size": "i32",
        "block_rows": "i32",
        "stride_xm": "i32", "stride_xn": "constexpr" if contiguous else "i32",
        "stride_cm": "i32", "stride_cn": "constexpr",
        "stride_sm": "i32", "stride_sg": "i32", "stride_zm": "i32", "stride_zg": "i32",
    }
    block_s, block_g = (64, 128) if single else (2, 4096)
    constexprs = dict(
        consts, COMPUTE_QPARAMS=compute, SINGLE_CHUNK=single, BLOCK_S=block_s, BLOCK_G=block_g,
        stride_cn=1,
    )
    if contiguous:  # Triton specialises unit strides of contiguous tensors to constants
        constexprs["stride_xn"] = 1
    signature.update({k: "constexpr" for k in constexprs})
    return ("quantkit.kernels.quantize", "_quantize_kernel", signature, constexprs)


def _tensor_qparams_case(scheme: QuantScheme, global_only: bool = False) -> Case:
    consts = scheme_constexprs(scheme)
    keys = ("HAS_ZERO", "UNSIGNED", "QMIN", "QMAX", "ABSMAX_CODE", "MAX_VALUE")
    constexprs = {k: consts[k] for k in keys} | scale_constexprs(scheme) | {
        "GLOBAL_ONLY": global_only, "BLOCK_P": 1024}
    signature = {
        "part_ptr": "*fp32", "scale_ptr": "*fp32",
        "zero_ptr": "*i32" if scheme.has_zero else "*fp32", "global_ptr": "*fp32", "num_parts": "i32",
    } | {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.quantize", "_tensor_qparams_kernel", signature, constexprs)


def _block_qparams_case(scheme: QuantScheme) -> Case:
    consts = scheme_constexprs(scheme)
    constexprs = {"ABSMAX_CODE": consts["ABSMAX_CODE"], "MAX_VALUE": consts["MAX_VALUE"],
                  **scale_constexprs(scheme), "R": scheme.block_rows, "C": scheme.groupsize,
                  "BLOCK_R": 64, "BLOCK_C": scheme.groupsize, "stride_sg": 1}
    signature = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "global_ptr": "*fp32", "rows": "i32",
                 "cols": "i32", "stride_xm": "i32", "stride_xn": "i32", "stride_sm": "i32",
                 } | {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.quantize", "_block_qparams_kernel", signature, constexprs)


def _partials_case(x_type: str) -> Case:
    constexprs = {"stride_xn": 1, "BLOCK_M": 4, "BLOCK_N": 2048}
    signature = {"x_ptr": x_type, "part_ptr": "*fp32", "rows": "i32", "cols": "i32",
                 "stride_xm": "i32"} | {k: "constexpr" for k in constexprs}
    return ("quantkit.kernels.quantize", "_minmax_partials_kernel", signature, constexprs)


def test_kernels_compile_for_sm90() -> None:
    int4_asym = QuantScheme("int4", "per_group", 128, has_zero=True)
    int8_sym = QuantScheme("int8", "per_token")
    int4_unsigned = QuantScheme("int4", "per_channel", unsigned=True)
    fp8 = QuantScheme("fp8", "per_tensor")
    fp8_e5m2 = QuantScheme("fp8_e5m2", "per_channel")
    fp4 = QuantScheme("fp4", "per_group", 32)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = [
        # computed qparams: every dtype kind in one pass, chunked long rows
        _quantize_case(int4_asym, fp16, compute=True, single=True),
        _quantize_case(int8_sym, bf16, compute=True, single=True),
        _quantize_case(int4_unsigned, fp32, compute=True, single=True),
        _quantize_case(fp8, bf16, compute=True, single=True),
        _quantize_case(fp8_e5m2, fp16, compute=True, single=True),
        _quantize_case(fp4, bf16, compute=True, single=True),
        _quantize_case(int8_sym, bf16, compute=True, single=False),
        _quantize_case(fp8, fp32, compute=True, single=False),
        # given qparams (quantize_with_qparams and the last per_tensor step), strided input
        _quantize_case(int4_asym, fp16, compute=False, single=True),
        _quantize_case(int8_sym, fp16, compute=False, single=False),
        _quantize_case(int4_asym, fp32, compute=True, single=True, contiguous=False),
        # per_tensor reduction
        _partials_case("*bf16"),
        _tensor_qparams_case(QuantScheme("int8", "per_tensor", has_zero=True)),
        _tensor_qparams_case(fp8),
        # block formats: MX (e8m0) and NVFP4 (e4m3 with the per-tensor scale) group scales, fp6
        # elements, the per-tensor scale reduction and 2-D block scales
        _quantize_case(QuantScheme("mxfp4", "per_group", 32), bf16, compute=True, single=True),
        _quantize_case(QuantScheme("nvfp4", "per_group", 16), fp16, compute=True, single=True),
        _quantize_case(QuantScheme("mxfp6_e2m3", "per_group", 32), fp32, compute=True, single=True),
        _quantize_case(QuantScheme("mxfp8", "per_group", 32), bf16, compute=False, single=True),
        _tensor_qparams_case(QuantScheme("nvfp4", "per_group", 16), global_only=True),
        _tensor_qparams_case(QuantScheme("nvfp4", "per_tensor")),
        _block_qparams_case(QuantScheme("fp8_block", "per_group", 128, block_rows=128)),
    ]
    compile_for_cuda(cases)

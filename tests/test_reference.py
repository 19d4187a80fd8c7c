"""The math contract in :mod:`quantkit.reference` and :mod:`quantkit.packing`.

Hand-computed examples for every path (values chosen so that scales are exact in float32),
minifloat rounding against torch's own float8 casts and a brute-force fp4 search, and
property tests (hypothesis) for the integer error bound and the packing round trip.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import packing, reference
from quantkit.dtypes import get_dtype
from quantkit.scheme import QuantScheme

FP8 = ("fp8", "fp8_e5m2")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- hand-computed integer paths


def test_symmetric_int_per_channel_full_range() -> None:
    scheme = QuantScheme("int4", "per_channel")  # full range is the default
    x = _t([[1.0, -2.5, 3.5, 7.5], [-15.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scale, zero = reference.quantize_tensor(x, scheme)
    assert zero is None
    assert torch.equal(scale, _t([[1.0], [2.0], [1.0]]))  # amax / 7.5; an all-zero row gets 1
    # round half to even: -2.5 -> -2, 3.5 -> 4, 1.5 -> 2, 0.5 -> 0; +amax: 7.5 -> 8, clamped to 7;
    # -amax: -7.5 -> -8, the code a restricted grid never uses
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -2, 4, 7], [-8, 2, 0, 0], [0, 0, 0, 0]]
    expected = _t([[1.0, -2.0, 4.0, 7.0], [-16.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(reference.dequantize(codes, scale, zero, scheme), expected)


def test_symmetric_int_per_channel_restricted_range() -> None:
    scheme = QuantScheme("int4", "per_channel", symmetric_range="restricted")
    x = _t([[1.0, -2.5, 3.5, 7.0], [-14.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scale, zero = reference.quantize_tensor(x, scheme)
    assert zero is None
    assert torch.equal(scale, _t([[1.0], [2.0], [1.0]]))  # amax / 7; an all-zero row gets 1
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -2, 4, 7], [-7, 2, 0, 0], [0, 0, 0, 0]]
    expected = _t([[1.0, -2.0, 4.0, 7.0], [-14.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(reference.dequantize(codes, scale, zero, scheme), expected)


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int8"])
def test_full_range_uses_every_code_and_restricted_one_less(name: str) -> None:
    full = QuantScheme(name, "per_channel")
    restricted = QuantScheme(name, "per_channel", symmetric_range="restricted")
    amax = full.qmax + 0.5  # exact full-range scale 1, so -amax lands exactly on the tie -(qmax + 1/2)
    x = torch.linspace(-amax, amax, 4001)[None]  # (1, 4001)
    q_full, s_full, _ = reference.quantize_tensor(x, full)
    q_res, s_res, _ = reference.quantize_tensor(x, restricted)
    levels = 1 << full.bits
    assert s_full.item() == 1.0 and s_res.item() == pytest.approx(amax / full.qmax)
    assert q_full.unique().numel() == levels and (q_full.min(), q_full.max()) == (full.qmin, full.qmax)
    assert q_res.unique().numel() == levels - 1 and (q_res.min(), q_res.max()) == (-full.qmax, full.qmax)
    # both keep every value of [-amax, amax] within half a step
    for q, s, scheme in ((q_full, s_full, full), (q_res, s_res, restricted)):
        err = (reference.dequantize(q, s, None, scheme) - x).abs().max()
        assert err <= s.item() / 2 * (1 + 1e-6)


def test_full_range_equals_the_gptq_reference_quantizer() -> None:
    """IST-DASLab/gptq ``quant.py`` (sym=True): ``scale = (xmax - xmin) / maxq`` with
    ``xmin = -xmax = -amax``, ``zero = (maxq + 1) / 2``, ``q = clamp(round(x / scale) + zero, 0,
    maxq)``: the same scales and (shifted by the zero) the same codes, for every bit width."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen)  # (64, 256)
    x[:4] = -x[:4].abs()  # rows whose amax is negative
    for bits in (2, 3, 4, 8):
        scheme = QuantScheme(f"int{bits}", "per_channel")
        codes, scale, _ = reference.quantize_tensor(x, scheme)
        maxq = 2**bits - 1
        xmax = torch.maximum(x.min(1)[0].abs(), x.max(1)[0])  # every row has a negative value
        g_scale = (xmax - (-xmax)) / maxq
        g_zero = (maxq + 1) / 2
        g_q = torch.clamp(torch.round(x / g_scale[:, None]) + g_zero, 0, maxq)
        assert torch.equal(scale[:, 0], g_scale), bits
        assert torch.equal(codes.float(), g_q - g_zero), bits


@pytest.mark.parametrize(
    ("unsigned", "zero_point", "codes"),
    [(False, -4, [-8, -4, 7, -2]), (True, 4, [0, 4, 15, 6])],
    ids=["signed", "unsigned"],
)
def test_asymmetric_int_with_zero(unsigned: bool, zero_point: int, codes: list[int]) -> None:
    scheme = QuantScheme("int4", "per_token", has_zero=True, unsigned=unsigned)
    x = _t([[-1.0, 0.0, 2.75, 0.6]])  # lo = -1, hi = 2.75: s = 3.75 / 15 = 0.25
    q, scale, zero = reference.quantize_tensor(x, scheme)
    assert torch.equal(scale, _t([[0.25]]))
    assert zero is not None and zero.dtype == torch.int32
    assert zero.item() == zero_point  # round(qmin - lo / s) = qmin + 4
    assert q.tolist() == [codes]
    assert q.dtype == (torch.uint8 if unsigned else torch.int8)
    assert torch.equal(reference.dequantize(q, scale, zero, scheme), _t([[-1.0, 0.0, 2.75, 0.5]]))


def test_asymmetric_grid_always_contains_zero() -> None:
    scheme = QuantScheme("int4", "per_channel", has_zero=True)
    x = _t([[1.0, 2.0, 3.75, 3.0]])  # lo is clamped to 0: s = 3.75 / 15, z = qmin
    q, scale, zero = reference.quantize_tensor(x, scheme)
    assert scale.item() == 0.25 and zero.item() == -8
    assert q.tolist() == [[-4, 0, 7, 4]]


def test_unsigned_without_zero_clips_negatives() -> None:
    scheme = QuantScheme("int4", "per_channel", unsigned=True)
    x = _t([[-1.0, 0.5, 1.5, 7.5], [-3.0, -1.0, -0.5, -2.0]])
    q, scale, zero = reference.quantize_tensor(x, scheme)
    assert zero is None
    assert torch.equal(scale, _t([[0.5], [1.0]]))  # max(x, 0) / 15; an all-negative row gets 1
    assert q.dtype == torch.uint8
    assert q.tolist() == [[0, 1, 3, 15], [0, 0, 0, 0]]
    assert torch.equal(
        reference.dequantize(q, scale, zero, scheme), _t([[0.0, 0.5, 1.5, 7.5], [0.0] * 4])
    )


def test_per_group_short_last_group_uses_only_its_own_columns() -> None:
    scheme = QuantScheme("int4", "per_group", groupsize=4)
    x = _t([[10.0, -75.0, 35.0, 7.0, 3.75, -0.5]])  # groups: cols 0-3 and the short 4-5
    q, scale, _ = reference.quantize_tensor(x, scheme)
    assert torch.equal(scale, _t([[10.0, 0.5]]))  # 75 / 7.5 and 3.75 / 7.5
    assert q.tolist() == [[1, -8, 4, 1, 7, -1]]
    xhat = reference.dequantize(q, scale, None, scheme)
    assert torch.equal(xhat, _t([[10.0, -80.0, 40.0, 10.0, 3.5, -0.5]]))


def test_per_group_short_last_group_with_zero() -> None:
    scheme = QuantScheme("int4", "per_group", groupsize=4, has_zero=True)
    x = _t([[10.0, -70.0, 35.0, 7.0, 3.5, -0.25]])
    q, scale, zero = reference.quantize_tensor(x, scheme)
    assert scale[0, 1].item() == 0.25  # (3.5 + 0.25) / 15, untouched by the first group
    assert zero[0, 1].item() == -7  # round(-8 + 0.25 / 0.25)
    assert q[0, 4:].tolist() == [7, -8]


def test_per_group_equals_quantizing_each_group_alone() -> None:
    scheme = QuantScheme("int3", "per_group", groupsize=128, has_zero=True)
    per_row = QuantScheme("int3", "per_channel", has_zero=True)
    x = torch.randn(5, 576)
    q, scale, zero = reference.quantize_tensor(x, scheme)
    assert scale.shape == zero.shape == (5, 5)
    for g, start in enumerate(range(0, 576, 128)):
        part = x[:, start : start + 128]
        q_g, s_g, z_g = reference.quantize_tensor(part, per_row)
        assert torch.equal(q[:, start : start + 128], q_g)
        assert torch.equal(scale[:, g : g + 1], s_g) and torch.equal(zero[:, g : g + 1], z_g)


def test_per_tensor_shares_one_scale() -> None:
    scheme = QuantScheme("int4", "per_tensor")
    x = _t([[1.0, -3.5, 0.5], [2.5, -7.5, 0.0]])
    q, scale, _ = reference.quantize_tensor(x, scheme)
    assert torch.equal(scale, _t([[1.0]]))
    assert q.tolist() == [[1, -4, 0], [2, -8, 0]]


def test_leading_dims_are_flattened_to_rows() -> None:
    scheme = QuantScheme("int8", "per_token")
    x = torch.randn(2, 3, 16)
    q, scale, _ = reference.quantize_tensor(x, scheme)
    q2, scale2, _ = reference.quantize_tensor(x.reshape(6, 16), scheme)
    assert q.shape == (6, 16) and scale.shape == (6, 1)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)
    assert reference.fake_quantize(x, scheme).shape == x.shape


# ------------------------------------------------------------------- hand-computed floats


def test_fp8_per_tensor_codes() -> None:
    scheme = QuantScheme("fp8", "per_tensor")
    x = _t([[448.0, -224.0, 1.0, 0.0]])  # amax 448: s = 1
    q, scale, _ = reference.quantize_tensor(x, scheme)
    assert scale.item() == 1.0
    # e4m3fn: 448 = 1.75 * 2^8 -> 0 1111 110; 224 -> 0 1110 110 (+ sign); 1.0 -> 0 0111 000
    assert q.tolist() == [[0x7E, 0xF6, 0x38, 0x00]]
    assert torch.equal(reference.dequantize(q, scale, None, scheme), x)


def test_fp4_per_tensor_codes_ties_to_even() -> None:
    scheme = QuantScheme("fp4", "per_tensor")
    x = _t([[6.0, -1.0, 0.25, 2.5, 5.0, -0.25]])  # amax 6: s = 1
    q, _, _ = reference.quantize_tensor(x, scheme)
    # 6 -> 0 11 1; -1 -> 1 01 0; 0.25 -> 0 (tie 0 / 0.5); 2.5 -> 2 (tie 2 / 3); 5 -> 4; -0.25 -> -0
    assert q.tolist() == [[0b0111, 0b1010, 0b0000, 0b0100, 0b0110, 0b1000]]
    assert reference.dequantize(q, torch.ones(1, 1), None, scheme).tolist() == [
        [6.0, -1.0, 0.0, 2.0, 4.0, -0.0]
    ]


# ------------------------------------------------------------ minifloat rounding vs torch


def _finite_codes(name: str) -> torch.Tensor:
    """Every uint8 bit pattern of ``name`` that is a finite number (fp8: not NaN/inf)."""
    dt = get_dtype(name)
    codes = torch.arange(1 << dt.bits, dtype=torch.int32).to(torch.uint8)
    if dt.torch_dtype is None:
        return codes
    return codes[torch.isfinite(codes.view(dt.torch_dtype).float())]


def _test_values(name: str) -> torch.Tensor:
    """randn at many scales, float32 subnormals, every grid value, every tie, +-0, +-max."""
    dt = get_dtype(name)
    gen = torch.Generator().manual_seed(1234)
    scales = [10.0**e for e in range(-12, 6)]
    values = [torch.randn(4096, generator=gen) * s for s in scales]
    grid = torch.sort(reference.decode_minifloat(_finite_codes(name), dt).unique()).values
    ties = (grid[1:] + grid[:-1]) / 2  # exact in float32: grid values have few mantissa bits
    subnormals = torch.tensor([1e-45, 1e-42, 1e-40, 2.0**-126, 2.0**-127])
    extremes = torch.tensor([0.0, -0.0, dt.max_value, -dt.max_value])
    above_ties = ties.nextafter(torch.tensor(math.inf))
    values += [grid, ties, above_ties, subnormals, -subnormals, extremes]
    return torch.cat(values).clamp(-dt.max_value, dt.max_value)


@pytest.mark.parametrize("name", FP8)
def test_generic_minifloat_equals_torch_fp8_cast(name: str) -> None:
    dt = get_dtype(name)
    x = _test_values(name)
    expected = x.to(dt.torch_dtype).view(torch.uint8)
    got = reference.encode_minifloat(reference.round_to_minifloat(x, dt), dt)
    mismatch = (got != expected).nonzero().flatten()[:5]
    assert mismatch.numel() == 0, f"{name}: x={x[mismatch].tolist()} got={got[mismatch].tolist()}"


@pytest.mark.parametrize("name", FP8)
def test_fp8_quantize_equals_torch_cast_and_saturates(name: str) -> None:
    dt = get_dtype(name)
    scheme = QuantScheme(name, "per_tensor")
    x = torch.cat([_test_values(name), torch.tensor([1e6, -1e6, dt.max_value * 1.07])])[None]
    q = reference.quantize(x, torch.ones(1, 1), None, scheme)
    clamped = x.clamp(-dt.max_value, dt.max_value)
    assert torch.equal(q, clamped.to(dt.torch_dtype).view(torch.uint8))
    assert torch.isfinite(reference.dequantize(q, torch.ones(1, 1), None, scheme)).all()


@pytest.mark.parametrize("name", [*FP8, "fp4"])
def test_decode_then_encode_is_identity_on_every_code(name: str) -> None:
    dt = get_dtype(name)
    codes = _finite_codes(name)
    values = reference.decode_minifloat(codes, dt)
    assert torch.equal(reference.encode_minifloat(values, dt), codes)
    assert torch.equal(reference.round_to_minifloat(values, dt), values)  # grid values are fixed
    if dt.torch_dtype is not None:
        assert torch.equal(values, codes.view(dt.torch_dtype).float())


def _fp4_brute_force(x: torch.Tensor) -> torch.Tensor:
    """Nearest fp4 code of the same sign as ``x``; ties go to the even code (mantissa bit 0)."""
    dt = get_dtype("fp4")
    codes = torch.arange(16, dtype=torch.uint8)
    grid = reference.decode_minifloat(codes, dt)  # (16,)
    dist = (x[:, None] - grid[None, :]).abs()  # (N, 16)
    wrong_sign = torch.signbit(x)[:, None] != (codes >= 8)[None, :]
    dist = torch.where(wrong_sign, torch.inf, dist)
    best = dist == dist.min(dim=1, keepdim=True).values
    odd = (codes & 1).bool()[None, :]
    preferred = best & ~odd
    first_best, first_even = best.float().argmax(dim=1), preferred.float().argmax(dim=1)
    pick = torch.where(preferred.any(dim=1), first_even, first_best)
    return codes[pick]


def test_fp4_rounding_matches_brute_force_nearest_with_ties_to_even() -> None:
    dt = get_dtype("fp4")
    x = torch.cat([_test_values("fp4"), torch.tensor([7.0, -100.0, 6.5])])
    got = reference.encode_minifloat(reference.round_to_minifloat(x, dt), dt)
    expected = _fp4_brute_force(x)
    mismatch = (got != expected).nonzero().flatten()[:5]
    assert mismatch.numel() == 0, f"x={x[mismatch].tolist()} got={got[mismatch].tolist()}"


# -------------------------------------------------------------------------- properties

INT_NAMES = ("int2", "int3", "int4", "int8")


@st.composite
def int_schemes_and_shapes(draw: st.DrawFn) -> tuple[QuantScheme, int, int]:
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 80))
    granularity = draw(st.sampled_from(["per_tensor", "per_channel", "per_token", "per_group"]))
    groupsize = draw(st.integers(1, cols)) if granularity == "per_group" else -1
    has_zero, unsigned = draw(st.booleans()), draw(st.booleans())
    symmetric = not has_zero and not unsigned
    scheme = QuantScheme(
        draw(st.sampled_from(INT_NAMES)), granularity, groupsize, has_zero=has_zero, unsigned=unsigned,
        symmetric_range=draw(st.sampled_from(["full", "restricted"])) if symmetric else "full",
    )
    return scheme, rows, cols


@settings(max_examples=150, deadline=None)
@given(
    case=int_schemes_and_shapes(),
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.integers(-20, 20),
    shift=st.sampled_from([0.0, 0.5, -3.0]),
)
def test_int_error_is_at_most_half_a_step_inside_the_grid(
    case: tuple[QuantScheme, int, int], seed: int, magnitude: int, shift: float
) -> None:
    scheme, rows, cols = case
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=gen) + shift) * 2.0**magnitude
    q, scale, zero = reference.quantize_tensor(x, scheme)
    assert scale.shape == scheme.scale_shape(rows, cols)
    xhat = reference.dequantize(q, scale, zero, scheme)
    s = reference.expand_to_cols(scale, rows, cols, scheme)
    z = reference.expand_to_cols(zero, rows, cols, scheme).float() if zero is not None else 0.0
    inside = (x >= (scheme.qmin - z) * s) & (x <= (scheme.qmax - z) * s)
    # float32 slack: x / s and (q - z) * s each round once, relative 2^-24 of <= 2^bits steps
    slack = s * (2.0 ** (scheme.bits + 1)) * 2.0**-23
    err = (x - xhat).abs()
    assert bool((err <= s / 2 + slack)[inside].all()), (err / s)[inside].max()
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax


@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from(packing.PACK_BITS),
    signed=st.booleans(),
    rows=st.integers(0, 5),
    cols=st.integers(0, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits: int, signed: bool, rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    dtype = torch.int8 if signed else torch.uint8
    codes = torch.randint(lo, hi, (rows, cols), generator=gen).to(dtype)
    packed = packing.pack_codes(codes, bits)
    assert packed.shape == (rows, packing.packed_cols(cols, bits))
    assert torch.equal(packing.unpack_codes(packed, bits, cols, signed), codes)


@pytest.mark.parametrize(
    ("bits", "codes", "packed"),
    [
        (4, [1, 2, -1], [0x21, 0x0F, 0, 0]),  # byte = c0 | c1 << 4; -1 stores as 0b1111
        (2, [1, 2, 3, 0, 1], [0b00111001, 0b01]),
        # word 000 111 110 101 100 011 010 001 (code 7 .. code 0), little-endian bytes
        (3, [1, 2, 3, 4, 5, 6, 7, 0], [0b11010001, 0b01011000, 0b00011111]),
        (8, [-1, 5], [0xFF, 0x05, 0, 0, 0, 0, 0, 0]),
    ],
    ids=["int4", "int2", "int3", "int8"],
)
def test_packing_layout_by_hand(bits: int, codes: list[int], packed: list[int]) -> None:
    c = torch.tensor([codes], dtype=torch.int8)
    assert packing.pack_codes(c, bits).tolist() == [packed]


def test_zero_point_scale_of_a_range_wider_than_float32_is_finite():
    """``hi - lo`` overflows float32: the scale is computed without the overflow, and the
    round trip stays within half a step."""
    scheme = QuantScheme("int8", "per_channel", -1, has_zero=True, unsigned=True)
    x = torch.tensor([[3e38, -3e38, 1e38, 0.0]])
    scale, zero = reference.compute_qparams(x, scheme)
    assert torch.isfinite(scale).all()
    torch.testing.assert_close(scale, torch.tensor([[3e38 / 255 + 3e38 / 255]]))
    x_hat = reference.dequantize(reference.quantize(x, scale, zero, scheme), scale, zero, scheme)
    assert ((x_hat - x).abs() <= scale / 2 + x.abs() * 2.4e-7).all()  # + 2 ulp of the product


@pytest.mark.parametrize("packed, cols, match", [
    (torch.zeros(3, dtype=torch.uint8), 8, "2-D"),
    (torch.zeros(2, 3, dtype=torch.uint8), -1, "cols=-1"),
    (torch.zeros(2, 2, dtype=torch.uint8), 8, "3 bytes per row"),
])
def test_unpack_rejects_bad_packed_input(packed, cols, match):
    with pytest.raises(ValueError, match=match):
        packing.unpack_codes(packed, 3, cols, signed=False)

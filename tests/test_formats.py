"""Block-scaled formats in the torch reference: fp6 grids, e8m0 (OCP MX v1.0) and e4m3 (NVFP4)
scales, 2-D blocks, NaN/inf/subnormal rules, and agreement with independent implementations
(a transcription of microsoft/microxcaling's ``_quantize_mx``, compressed-tensors' NVFP4)."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit import reference, scales
from quantkit.dtypes import SCALE_FORMATS, get_dtype
from quantkit.scheme import QuantScheme, check_format

# every fp6 value by hand: (exponent field, mantissa field) -> value, bias 1 (e2m3) / 3 (e3m2)
E2M3 = sorted({(m / 8) if e == 0 else 2.0 ** (e - 1) * (1 + m / 8) for e in range(4) for m in range(8)})
E3M2 = sorted({(m / 4) * 2.0**-2 if e == 0 else 2.0 ** (e - 3) * (1 + m / 4) for e in range(8) for m in range(4)})
MX = ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8")


def _grid(name: str) -> torch.Tensor:
    """Every finite value of an element grid, sorted (decoded from all its codes)."""
    dt = get_dtype(name)
    v = reference.decode_minifloat(torch.arange(1 << dt.bits).to(torch.uint8), dt)
    return torch.sort(v[torch.isfinite(v)].unique()).values


@pytest.mark.parametrize(("name", "table", "max_value", "smallest"), [
    ("fp6_e2m3", E2M3, 7.5, 0.125), ("fp6_e3m2", E3M2, 28.0, 0.0625)])
def test_fp6_grids_by_hand(name: str, table: list[float], max_value: float, smallest: float) -> None:
    dt = get_dtype(name)
    codes = torch.arange(64).to(torch.uint8)
    values = reference.decode_minifloat(codes, dt)
    assert sorted(set(values[:32].tolist())) == table  # positive half: sign bit 0
    assert torch.equal(values[32:], -values[:32])
    assert dt.max_value == max_value == values.max().item() and values[1].item() == smallest
    assert torch.equal(reference.encode_minifloat(values, dt), codes)  # -0.0 keeps its sign code


@pytest.mark.parametrize("name", ["fp4", "fp6_e2m3", "fp6_e3m2"])
def test_rounding_is_nearest_ties_to_even_with_saturation(name: str) -> None:
    """Every value between grid points, each midpoint (ties go to the even mantissa) and values
    beyond the largest normal (saturate), against a brute-force search of the grid."""
    dt = get_dtype(name)
    grid = _grid(name)
    pos = grid[grid >= 0]
    mids = (pos[1:] + pos[:-1]) / 2
    x = torch.cat([torch.linspace(-40, 40, 4001), mids, -mids, pos, torch.tensor([1e9, -1e9, 2.0**-140])])
    got = reference.round_to_minifloat(x.clamp(-dt.max_value, dt.max_value), dt)
    dist = (x[:, None].clamp(-dt.max_value, dt.max_value) - grid[None, :]).abs()
    best = dist == dist.min(1, keepdim=True).values
    codes = reference.encode_minifloat(grid, dt)
    even = (codes & 1) == 0
    pick = torch.where((best & even[None, :]).any(1), (best & even[None, :]).float().argmax(1), best.float().argmax(1))
    assert torch.equal(got.abs(), grid[pick].abs())


# ---------------------------------------------------------------------- e8m0: OCP MX v1.0


def _microxcaling(x: torch.Tensor, name: str, block: int) -> torch.Tensor:
    """microsoft/microxcaling ``_quantize_mx`` (mx_ops.py) for rows of ``block`` values, float
    steps as written there: ``floor(log2(amax))`` (``amax + 2**-126`` where 0) minus the element
    emax, clamped to [-127, 127], ``x / 2**e`` rounded to the nearest grid value with saturation
    (here by brute force over the grid), times ``2**e``."""
    dt = get_dtype(name)
    a = x.reshape(-1, block)
    amax = a.abs().amax(1, keepdim=True)
    e = torch.floor(torch.log2(amax + 2.0**-126 * (amax == 0).float())) - dt.emax
    e = e.clamp(-127, 127)
    y = (a / 2.0**e).clamp(-dt.max_value, dt.max_value)
    grid = _grid(dt.element_name)
    dist = (y[..., None] - grid).abs()
    best = dist == dist.min(-1, keepdim=True).values
    even = (reference.encode_minifloat(grid, dt) & 1) == 0
    idx = torch.where((best & even).any(-1), (best & even).float().argmax(-1), best.float().argmax(-1))
    return (grid[idx] * 2.0**e).reshape(x.shape)


@pytest.mark.parametrize("name", MX)
def test_mx_equals_microxcaling(name: str) -> None:
    """Random blocks over many magnitudes (log2 of these maxima is exact in float), all-zero
    blocks and blocks whose maximum is a power of two."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-6, 6, 64)[:, None]
    x[3] = 0.0
    x[5, :32] = 0.0
    x[6, 7] = 4.0 * x[6].abs().max()
    x[7, :32] = torch.arange(32) / 4.0  # max 7.75: above fp4's 6 and e2m3's 7.5, saturates
    scheme = QuantScheme(name, "per_group", 32)
    q, s, _ = reference.quantize_tensor(x, scheme)
    got = reference.dequantize(q, s, None, scheme)
    assert torch.equal(got, _microxcaling(x, name, 32))


@pytest.mark.parametrize(("amax", "exponent"), [
    (6.0, 0), (5.999, 0), (7.9, 0), (8.0, 1), (1.0, -2), (0.0, -127), (2.0**-126, -127), (1e-42, -127),
    (2.0**-124, -126), (3.0e38, 125)])
def test_mx_scale_exponent_by_hand(amax: float, exponent: int) -> None:
    """fp4 (emax 2): floor(log2 amax) - 2, clamped at -127; an fp32-subnormal or zero amax gives
    the smallest scale 2**-127 (code 0); 7.9 keeps scale 1 (the spec's floor: 7.9 saturates to 6)."""
    dt = get_dtype("mxfp4")
    e = scales.mx_exponent(torch.tensor([amax]), dt)
    assert e.item() == exponent
    s = scales.mx_scale(torch.tensor([amax]), dt)
    assert s.item() == 2.0**exponent
    assert scales.encode_scales(s, "e8m0").item() == exponent + 127


def test_e8m0_codes_round_trip_and_nan() -> None:
    codes = torch.arange(256).to(torch.uint8)
    values = scales.decode_scales(codes, "e8m0")
    assert torch.isnan(values[255]) and not torch.isnan(values[:255]).any()
    assert values[0].item() == 2.0**-127 and values[127].item() == 1.0 and values[254].item() == 2.0**127
    assert torch.equal(scales.encode_scales(values, "e8m0"), codes)
    with pytest.raises(ValueError, match="not a value of the e8m0 scale format"):
        scales.encode_scales(torch.tensor([0.75]), "e8m0")


@pytest.mark.parametrize("name", MX)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_mx_block_with_nan_or_inf_decodes_to_nan(name: str, bad: float) -> None:
    """A non-finite value makes its block's scale NaN (code 255): the whole block decodes to NaN,
    the other blocks are untouched."""
    x = torch.randn(2, 64)
    x[1, 40] = bad
    scheme = QuantScheme(name, "per_group", 32)
    q, s, _ = reference.quantize_tensor(x, scheme)
    assert scales.encode_scales(s, "e8m0")[1, 1].item() == 255
    d = reference.dequantize(q, s, None, scheme)
    assert torch.isnan(d[1, 32:]).all() and not torch.isnan(d[:, :32]).any() and not torch.isnan(d[0]).any()
    clean = x.clone()
    clean[1, 32:] = 0
    assert torch.equal(d[:, :32], reference.fake_quantize(clean, scheme)[:, :32])


def test_subnormal_elements_are_kept() -> None:
    """Values far below a block's maximum land on the element grid's subnormals (fp4: 0.5 * s)."""
    scheme = QuantScheme("mxfp4", "per_group", 32)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2] = 6.0, 0.5, 0.25  # scale 1: 0.5 is the subnormal 0b0001, 0.25 a tie -> 0
    q, s, _ = reference.quantize_tensor(x, scheme)
    assert s.item() == 1.0 and q[0, :3].tolist() == [0b0111, 0b0001, 0b0000]


def test_mxfp8_nan_element_code() -> None:
    """e4m3 elements have a NaN code (S.1111.111); fp4/fp6 store 0 (the block scale is NaN)."""
    x = torch.ones(1, 32)
    x[0, 3] = float("nan")
    q8 = reference.quantize_tensor(x, QuantScheme("mxfp8", "per_group", 32))[0]
    q4 = reference.quantize_tensor(x, QuantScheme("mxfp4", "per_group", 32))[0]
    assert q8[0, 3].item() & 0x7F == 0x7F and q4[0, 3].item() == 0


def test_fp8_specials_decode() -> None:
    codes = torch.tensor([0x7E, 0x7F, 0xFF, 0x80]).to(torch.uint8)
    v = reference.decode_minifloat(codes, get_dtype("fp8"))
    assert v[0].item() == 448.0 and torch.isnan(v[1:3]).all() and v[3].item() == 0.0
    e5 = torch.tensor([0x7C, 0xFC, 0x7D, 0x7B]).to(torch.uint8)
    v = reference.decode_minifloat(e5, get_dtype("fp8_e5m2"))
    assert v[0].item() == math.inf and v[1].item() == -math.inf and torch.isnan(v[2]) and v[3].item() == 57344.0


# --------------------------------------------------------------- e4m3 + fp32: NVFP4


def test_nvfp4_equals_compressed_tensors() -> None:
    """Global scale, block scales and fake-quantized values equal compressed-tensors' NVFP4
    (``generate_gparam``, ``calculate_qparams`` with the global scale, ``fake_quantize``) bit
    for bit, including a zero block (its fp8 scale 0 becomes 0.125) and tiny blocks."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    del ct
    args = NVFP4A16["weights"]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=gen) * torch.logspace(-3, 1, 32)[:, None]
    w[0, :16] = 0.0
    w[1, 16:32] *= 1e-7
    g = generate_gparam(w.min(), w.max())
    blocks = w.reshape(32, 8, 16)
    s, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=g)
    want = fake_quantize(w, s, None, args, global_scale=g)
    scheme = QuantScheme("nvfp4", "per_group", 16)
    q, scale, _ = reference.quantize_tensor(w, scheme)
    glob = reference.global_scale(w, scheme)
    assert torch.equal(glob.reshape(1), g)
    assert torch.equal(scale, s / g)  # compressed-tensors' scale / global_scale
    assert torch.equal(reference.dequantize(q, scale, None, scheme), want)
    assert s[0, 0].item() == 0.125  # the zero block's eps scale


def test_e4m3_scale_codes_round_trip() -> None:
    dt = get_dtype("nvfp4")
    g = scales.global_scale(torch.tensor(3.7), dt)
    amax = torch.rand(200) * 3.7
    s = scales.scale_from_amax(amax, dt, dt.max_value, "e4m3", g)
    codes = scales.encode_scales(s, "e4m3", g)
    assert codes.dtype == torch.uint8 and torch.equal(scales.decode_scales(codes, "e4m3", g), s)
    assert codes.max().item() <= 0x7E  # the largest block scale is 448 (the tensor's maximum)
    with pytest.raises(ValueError, match="not a value of the e4m3 scale format"):
        scales.encode_scales(s * 1.01, "e4m3", g)


def test_global_scale_edge_cases() -> None:
    dt = get_dtype("nvfp4")
    assert scales.global_scale(torch.tensor(0.0), dt).item() == 1.0  # 2688 / tiny overflows: 1
    assert scales.global_scale(torch.tensor(2688.0), dt).item() == 1.0
    x = torch.tensor([[1.0, float("nan"), -12.0, float("inf")]])
    assert scales.finite_amax(x).item() == 12.0


# ------------------------------------------------------------------- 2-D blocks, schemes


def test_2d_blocks_equal_quantizing_each_block_alone() -> None:
    """128 x 128 style blocks (here 4 x 8, ragged at both ends) share one scale per block."""
    x = torch.randn(10, 20) * torch.rand(10, 1) * 4
    scheme = QuantScheme("fp8_block", "per_group", 8, block_rows=4)
    q, s, _ = reference.quantize_tensor(x, scheme)
    assert s.shape == (3, 3)
    tensor_scheme = QuantScheme("fp8_block", "per_tensor", scale_format="float32")
    for i in range(3):
        for j in range(3):
            tile = x[4 * i:4 * i + 4, 8 * j:8 * j + 8]
            tq, ts, _ = reference.quantize_tensor(tile, tensor_scheme)
            assert ts.item() == s[i, j].item()
            assert torch.equal(q[4 * i:4 * i + 4, 8 * j:8 * j + 8], tq)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(dtype="int4", scale_format="e8m0"), "scales float grids only"),
    (dict(dtype="fp4", scale_format="bf16"), "choose one of: float16, float32, e8m0, e4m3"),
    (dict(dtype="fp8", granularity="per_channel", block_rows=2), "2-D blocks"),
    (dict(dtype="int4", granularity="per_group", groupsize=8, block_rows=2, has_zero=True), "without a zero point"),
])
def test_scheme_rejects_bad_formats(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kwargs)


def test_scheme_defaults_and_shapes() -> None:
    assert QuantScheme("mxfp4", "per_group", 32).scale_format == "e8m0"
    assert QuantScheme("nvfp4", "per_group", 16).has_global_scale
    assert QuantScheme("fp4", "per_group", 32).scale_format == "float16"
    blocks = QuantScheme("fp8_block", "per_group", 128, block_rows=128)
    assert blocks.scale_shape(576, 1536) == (5, 12) and blocks.describe() == "fp8_block b128x128"
    assert QuantScheme("fp4", "per_group", 32, scale_format="e8m0").describe() == "fp4 g32 e8m0"
    assert {get_dtype(n).scale_format for n in MX} == {"e8m0"} and set(SCALE_FORMATS) >= {"e4m3", "float32"}


@pytest.mark.parametrize(("args", "match"), [
    (("int4", "e8m0", None), "w_dtype.scale_format=e8m0 scales float grids only"),
    (("fp4", "fp32", None), "w_dtype.scale_format='fp32' is not valid; choose one of"),
    (("fp4", None, [0, 32]), r"w_dtype.block=\[0, 32\] is not valid"),
    (("fp4", None, [1, 2, 3]), r"w_dtype.block=\[1, 2, 3\] is not valid"),
    (("float16", "e8m0", None), "has nothing to act on"),
])
def test_check_format_names_the_keys(args: tuple, match: str) -> None:
    keys = {"dtype": "w_dtype", "scale_format": "w_dtype.scale_format", "block": "w_dtype.block"}
    with pytest.raises(ValueError, match=match):
        check_format(*args, keys)


def test_check_format_fills_the_dtype_defaults() -> None:
    assert check_format("nvfp4", None, None) == ("e4m3", (1, 16))
    assert check_format("fp8", None, 128) == ("float16", (1, 128))
    assert check_format("fp8_block", None, [1, 128]) == ("float32", (1, 128))
    assert check_format("int4", "float32", None) == ("float32", None)

"""Block-scaled formats in the Triton kernels (interpreter): quantize (scales computed in the
kernel: e8m0, e4m3 over a per-tensor scale reduced in the kernel, 2-D blocks) and dequantize
bit-exact against the torch reference, 6-bit pack/unpack, and the W-only matmuls (GEMV,
tensor-core tiles with whole groups per tile, the dequantize-first kernel) reading the stored
scale formats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit import ops, reference
from quantkit.kernels._launch import H200, INTERPRETER, run_all
from quantkit.kernels.dequantize import dequantize
from quantkit.kernels.gemv import GemvConfig, plan_dequant_gemv
from quantkit.kernels.matmul import (
    MatmulConfig, default_config, group_constexprs, plan_dequantize_packed, quant_linear_matmul,
)
from quantkit.kernels.pack import pack_codes, unpack_codes
from quantkit.kernels.quantize import quantize, quantize_with_qparams
from quantkit.matmul_reference import quant_linear_matmul_reference
from quantkit.packing import pack_codes as pack_reference
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme

SCHEMES = [
    pytest.param(QuantScheme("mxfp4", "per_group", 32), id="mxfp4"),
    pytest.param(QuantScheme("mxfp6_e2m3", "per_group", 32), id="mxfp6_e2m3"),
    pytest.param(QuantScheme("mxfp6_e3m2", "per_group", 32), id="mxfp6_e3m2"),
    pytest.param(QuantScheme("mxfp8", "per_group", 32), id="mxfp8"),
    pytest.param(QuantScheme("nvfp4", "per_group", 16), id="nvfp4"),
    pytest.param(QuantScheme("fp8_block", "per_group", 32, block_rows=8), id="fp8_block-8x32"),
    pytest.param(QuantScheme("fp6_e3m2", "per_group", 48), id="fp6_e3m2-g48-float16"),
    pytest.param(QuantScheme("nvfp4", "per_tensor"), id="nvfp4-tensor"),
    pytest.param(QuantScheme("mxfp8", "per_token"), id="mxfp8-token"),
    pytest.param(QuantScheme("fp4", "per_group", 32, scale_format="e8m0"), id="fp4-e8m0"),
    pytest.param(QuantScheme("nvfp4", "per_group", 16, block_rows=3), id="nvfp4-3x16"),
]


def _x(rows: int = 37, cols: int = 100, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Magnitudes over many binades, an all-zero group and (float32) a subnormal row: the
    interpreter flushes bf16 subnormals when it widens them, a GPU does not."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 3, rows)[:, None]
    x[0, :40] = 0.0
    x[1] = 1e-40 if dtype == torch.float32 else 1e-30
    return x.to(dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_computes_the_reference_scales_and_codes(scheme: QuantScheme, dtype: torch.dtype) -> None:
    x = _x(dtype=dtype)
    want = reference.quantize_tensor(x, scheme)
    for max_block_cols in (None, 16):  # one pass from registers, and chunked segments
        codes, scale, zero = quantize(x, scheme, max_block_cols=max_block_cols)
        assert torch.equal(codes, want[0]) and torch.equal(scale, want[1]) and zero is None
    assert torch.equal(quantize_with_qparams(x, want[1], None, scheme), want[0])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequantize_is_bit_exact(scheme: QuantScheme, out_dtype: torch.dtype) -> None:
    codes, scale, _ = reference.quantize_tensor(_x(), scheme)
    want = reference.dequantize(codes, scale, None, scheme, out_dtype)
    got = dequantize(codes, scale, None, scheme, out_dtype)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_dequantize_decodes_nan_scales_and_codes() -> None:
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    for name in ("mxfp4", "mxfp8"):
        scheme = QuantScheme(name, "per_group", 32)
        codes, scale, _ = reference.quantize_tensor(x, scheme)
        got = dequantize(codes, scale, None, scheme)
        want = reference.dequantize(codes, scale, None, scheme)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[1, :32]).all()
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("cols", [1, 4, 5, 8, 13, 100])
@pytest.mark.parametrize("signed", [False, True])
def test_6_bit_pack_unpack(cols: int, signed: bool) -> None:
    lo, hi = (-32, 32) if signed else (0, 64)
    codes = torch.randint(lo, hi, (9, cols)).to(torch.int8 if signed else torch.uint8)
    packed = pack_codes(codes, 6)
    assert torch.equal(packed, pack_reference(codes, 6)) and packed.shape[1] == -(-cols // 8) * 6
    assert torch.equal(unpack_codes(packed, 6, cols, signed), codes)


def _layer(scheme: QuantScheme, n: int = 40, k: int = 192) -> QuantLinear:
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen))
    return QuantLinear.from_linear(lin, scheme)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """One output-dtype ulp of the largest output (fp32 summation order, and the GEMV does not
    round the weight to x.dtype first)."""
    rtol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * want.float().abs().max().item())


MATMUL_SCHEMES = [p for p in SCHEMES if p.values[0].granularity == "per_group"]


@pytest.mark.parametrize("scheme", MATMUL_SCHEMES)
@pytest.mark.parametrize("m", [1, 3, 20], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32], ids=str)
def test_quant_linear_matmul_reads_the_scale_format(scheme: QuantScheme, m: int, x_dtype: torch.dtype) -> None:
    q = _layer(scheme)
    x = torch.randn(m, 192).to(x_dtype)
    want = ops.quant_linear_matmul(x, q.qweight, q.scales, q.qzeros, q.bias, scheme, backend="torch",
                                   global_scale=q.global_scale)
    got = ops.quant_linear_matmul(x, q.qweight, q.scales, q.qzeros, q.bias, scheme, backend="triton",
                                  global_scale=q.global_scale)
    _close(got, want)


@pytest.mark.parametrize("scheme", [QuantScheme("nvfp4", "per_group", 16), QuantScheme("mxfp6_e3m2", "per_group", 32)],
                         ids=["nvfp4", "mxfp6_e3m2"])
@pytest.mark.parametrize("config", [MatmulConfig(16, 16, 64), MatmulConfig(32, 32, 128, split_k=2),
                                    MatmulConfig(16, 16, 16), GemvConfig(2, 4, 1)],
                         ids=["sub-groups", "sub-groups-split", "tile-per-group", "gemv"])
def test_tiles_holding_several_groups(scheme: QuantScheme, config: object) -> None:
    q = _layer(scheme)
    m = 2 if isinstance(config, GemvConfig) else 20
    x = torch.randn(m, 192).half()
    want = quant_linear_matmul_reference(x, q.qweight, q.scales, None, q.bias, scheme, 192, q.global_scale)
    _close(quant_linear_matmul(x, q.qweight, q.scales, None, q.bias, scheme, config=config,
                               global_scale=q.global_scale), want)


@pytest.mark.parametrize("scheme", MATMUL_SCHEMES)
def test_dequantize_first_kernel_is_bit_exact(scheme: QuantScheme) -> None:
    """The large-M path's dequantizer gives exactly the reference's weight in x.dtype."""
    q = _layer(scheme)
    for dtype in (torch.float16, torch.float32):
        w, launches = plan_dequantize_packed(q.qweight, q.scales, q.qzeros, scheme, 192, dtype, INTERPRETER,
                                             q.global_scale)
        run_all(launches, w.device)
        assert torch.equal(w, q.dequantized_weight(dtype))


def test_planner_choices_for_block_formats() -> None:
    """nvfp4's groups of 16 on an H200: 32-column (and wider) tiles hold whole groups, one scale
    load per group instead of per element; the GEMV scales per 32-bit word."""
    cfg = default_config(16, 4096, 4096, 16, H200)
    consts = group_constexprs(16, 4096, cfg.block_k)
    assert not consts["TILE_GROUPS"] and consts["SUB_GROUPS"] == cfg.block_k // 16 > 1
    scheme = QuantScheme("nvfp4", "per_group", 16)
    meta = dict(device="meta")
    _, launches = plan_dequant_gemv(torch.empty(1, 4096, dtype=torch.float16, **meta),
                                    torch.empty(4096, 2048, dtype=torch.uint8, **meta),
                                    torch.empty(4096, 256, dtype=torch.uint8, **meta), None, None, scheme, H200,
                                    global_scale=torch.empty(1, 1, **meta))
    assert launches[0].constexprs["SCALE_PER_WORD"] and launches[0].constexprs["SCALE_FMT"] == 2


def test_matmul_rejects_wrong_scale_storage() -> None:
    q = _layer(QuantScheme("nvfp4", "per_group", 16))
    x = torch.randn(1, 192).half()
    with pytest.raises(ValueError, match="e4m3 scales need global_scale"):
        quant_linear_matmul(x, q.qweight, q.scales, None, None, q.w_scheme)
    with pytest.raises(TypeError, match="scales must be uint8"):
        quant_linear_matmul(x, q.qweight, q.effective_scales(), None, None, q.w_scheme, global_scale=q.global_scale)

"""The decode GEMV (:mod:`quantkit.kernels.gemv`) against the torch reference, in the interpreter.

Each case checks that the planner chose the GEMV (or, where it must not apply, the tensor-core
kernel) and compares with :func:`quant_linear_matmul_reference` within one output-dtype ulp of
the largest output (the kernel sums fp32 products in another order than torch; see
``tests/test_kernels_matmul.py``). K is ragged for every grid (the last 32-bit word or int3 unit
is partly padding) but keeps rows 4-byte aligned, which the GEMV needs.
"""

from __future__ import annotations

import pytest
import torch

from quantkit.kernels._launch import H200, INTERPRETER, run_all
from quantkit.kernels.gemv import MAX_M, GemvConfig, _dequant_gemv_kernel, gemv_config
from quantkit import reference
from quantkit.kernels.matmul import (
    dequant_then_gemm,
    plan_dequantize_packed,
    plan_quant_linear_matmul,
    quant_linear_matmul,
)
from quantkit.matmul_reference import quant_linear_matmul_reference, unpack_weight
from quantkit.scheme import QuantScheme
from tests.test_kernels_matmul import _assert_close, _weight_storage

pytestmark = pytest.mark.interpreter

N = 37
# ragged K with 4-byte aligned packed rows: ceil(K / 8) * bits bytes per row
K_FOR_BITS = {2: 204, 3: 220, 4: 200, 8: 196}


def _run(scheme: QuantScheme, m: int, k: int, x_dtype: torch.dtype = torch.float16, *,
         bias: bool = True, config: GemvConfig | None = None, gemv: bool = True) -> None:
    qweight, scales, qzeros = _weight_storage(scheme, N, k)
    x = torch.randn(m, k).to(x_dtype)
    b = torch.randn(N).half() if bias else None
    out, launches = plan_quant_linear_matmul(x, qweight, scales, qzeros, b, scheme, INTERPRETER,
                                             config=config)
    assert (launches[0].kernel is _dequant_gemv_kernel) == gemv, launches[0].kernel
    run_all(launches, x.device)
    want = quant_linear_matmul_reference(x, qweight, scales, qzeros, b, scheme, k)
    _assert_close(out.to(x_dtype), want)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("has_zero, unsigned", [(False, False), (True, False), (False, True),
                                                (True, True)],
                         ids=["sym", "asym", "unsigned", "unsigned-asym"])
def test_gemv_int_grids(bits: int, has_zero: bool, unsigned: bool, m: int) -> None:
    """Every integer grid, signed and unsigned codes, with and without zero points."""
    scheme = QuantScheme(f"int{bits}", "per_group", 64, has_zero=has_zero, unsigned=unsigned)
    _run(scheme, m, K_FOR_BITS[bits])


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("name", ["fp4", "fp8", "fp8_e5m2"])
def test_gemv_float_grids(name: str, m: int) -> None:
    """fp4 e2m1 and fp8 codes, subnormals included (their fp16 placement is exact)."""
    scheme = QuantScheme(name, "per_group", 32)
    _run(scheme, m, K_FOR_BITS[scheme.bits])


@pytest.mark.parametrize(
    "granularity, groupsize, bits",
    [
        pytest.param("per_group", 128, 4, id="g128-per-chunk"),
        pytest.param("per_group", 32, 4, id="g32-per-chunk"),
        pytest.param("per_group", 16, 4, id="g16-per-word"),
        pytest.param("per_group", 8, 4, id="g8-per-word"),
        pytest.param("per_group", 8, 8, id="int8-g8-per-word"),
        pytest.param("per_group", 32, 2, id="int2-g32-per-word"),
        pytest.param("per_channel", -1, 4, id="channel"),
        pytest.param("per_tensor", -1, 3, id="tensor"),
    ],
)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gemv_granularities(granularity: str, groupsize: int, bits: int,
                            x_dtype: torch.dtype) -> None:
    """Scales and zeros per chunk, per word (groups shorter than a lane's chunk), per channel,
    per tensor; fp16 / bf16 / fp32 activations (fp32 loads 4 values per 16 bytes)."""
    scheme = QuantScheme(f"int{bits}", granularity, groupsize, has_zero=granularity != "per_tensor")
    _run(scheme, 2, K_FOR_BITS[bits], x_dtype)


@pytest.mark.parametrize(
    "name, has_zero, k, m",
    [
        ("int4", True, 1100, 1), ("int3", True, 1116, 1), ("int8", True, 700, 1),
        ("int4", False, 1100, 3), ("int2", False, 2256, 1), ("int2", True, 2256, 3),
        ("fp4", False, 1100, 1), ("int4", True, 2048, 3),
    ],
    ids=["int4", "int3", "int8", "int4-sym-m3", "int2-sym", "int2-m3", "fp4", "int4-no-tail-m3"],
)
def test_gemv_loops_over_k_tiles(name: str, has_zero: bool, k: int, m: int) -> None:
    """One warp (a 32-lane K-tile) walks whole tiles without masks, then a ragged last one with
    them (none where K is a whole number of tiles); rows past N and M are clamped into range."""
    scheme = QuantScheme(name, "per_group", 32, has_zero=has_zero)
    _run(scheme, m, k, config=GemvConfig(4 if m > 1 else 1, 4, 1), bias=False)


def test_gemv_broadcast_qparams_and_no_bias() -> None:
    """(1, G) scales and zeros shared by every row."""
    scheme = QuantScheme("int4", "per_group", 32, has_zero=True)
    qweight, scales, qzeros = _weight_storage(scheme, N, 200)
    x = torch.randn(1, 200).half()
    got = quant_linear_matmul(x, qweight, scales[:1], qzeros[:1], None, scheme)
    _assert_close(got, quant_linear_matmul_reference(x, qweight, scales[:1], qzeros[:1], None,
                                                     scheme, 200))


@pytest.mark.parametrize(
    "scheme, k, x_strided",
    [
        pytest.param(QuantScheme("int4", "per_group", 7), 200, False, id="group-splits-a-word"),
        pytest.param(QuantScheme("int2", "per_group", 32), 200, False, id="rows-not-word-aligned"),
        pytest.param(QuantScheme("int4", "per_group", 32), 200, True, id="x-strided-along-k"),
    ],
)
def test_gemv_falls_back_to_tensor_cores(scheme: QuantScheme, k: int, x_strided: bool) -> None:
    """Where the GEMV cannot apply the planner takes the tensor-core kernel (same results)."""
    qweight, scales, qzeros = _weight_storage(scheme, N, k)
    x = torch.randn(k, 2).half().t() if x_strided else torch.randn(2, k).half()
    out, launches = plan_quant_linear_matmul(x, qweight, scales, qzeros, None, scheme, INTERPRETER)
    assert launches[0].kernel is not _dequant_gemv_kernel
    run_all(launches, x.device)
    _assert_close(out.to(x.dtype),
                  quant_linear_matmul_reference(x, qweight, scales, qzeros, None, scheme, k))


def test_gemv_takes_at_most_max_m_rows() -> None:
    scheme = QuantScheme("int4", "per_group", 32)
    _run(scheme, MAX_M + 1, 200, gemv=False)


def test_gemv_config_rejected_where_it_cannot_apply() -> None:
    scheme = QuantScheme("int4", "per_group", 7)
    qweight, scales, _ = _weight_storage(scheme, N, 200)
    with pytest.raises(ValueError, match="the GEMV does not apply"):
        quant_linear_matmul(torch.randn(1, 200).half(), qweight, scales, None, None, scheme,
                            config=GemvConfig(1, 4, 1))


@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (576, 576)])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_gemv_h200_grid(m: int, n: int, k: int) -> None:
    """On an H200 the grid gives every SM 8 warps where the layer allows it, without splitting
    K, and lanes cover K with at most half a tile masked."""
    cfg = gemv_config(m, n, k, 4, H200)
    warps = -(-n // cfg.block_n) * cfg.num_warps
    assert warps >= 8 * H200.sm_count or cfg.block_n == 1, cfg
    tile = cfg.lanes * 32
    assert k >= tile // 2 or cfg.num_warps == 1, cfg


# --------------------------------------------------------------------------------------------
# Large M: the weight dequantized once (bit-exact), then one dense GEMM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme",
    [
        pytest.param(QuantScheme("int4", "per_group", 64, has_zero=True), id="int4-g64-asym"),
        pytest.param(QuantScheme("int3", "per_group", 7, unsigned=True), id="int3-g7-gathered"),
        pytest.param(QuantScheme("int8", "per_channel"), id="int8-channel"),
        pytest.param(QuantScheme("fp4", "per_group", 32), id="fp4"),
        pytest.param(QuantScheme("fp8", "per_tensor"), id="fp8-tensor"),
    ],
)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dequantize_packed_is_bit_exact(scheme: QuantScheme, out_dtype: torch.dtype) -> None:
    """``W = (q - z) * s`` in fp32, rounded once to the output dtype: the reference's bits."""
    qweight, scales, qzeros = _weight_storage(scheme, N, 200)
    w, launches = plan_dequantize_packed(qweight, scales, qzeros, scheme, 200, out_dtype,
                                         INTERPRETER)
    run_all(launches, qweight.device)
    codes, scale, zero = unpack_weight(qweight, scales, qzeros, scheme, 200)
    assert torch.equal(w, reference.dequantize(codes, scale, zero, scheme, out_dtype=out_dtype))


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dequant_then_gemm(x_dtype: torch.dtype) -> None:
    """The path a GPU takes from ``DEQUANT_GEMM_MIN_M`` rows (run here on the CPU)."""
    scheme = QuantScheme("int4", "per_group", 32, has_zero=True)
    qweight, scales, qzeros = _weight_storage(scheme, N, 200)
    x = torch.randn(20, 200).to(x_dtype)
    b = torch.randn(N).half()
    got = dequant_then_gemm(x, qweight, scales, qzeros, b, scheme, INTERPRETER)
    _assert_close(got, quant_linear_matmul_reference(x, qweight, scales, qzeros, b, scheme, 200))

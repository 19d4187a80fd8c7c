"""Triton kernel that turns codes back into values: ``x_hat = (q - z) * s`` or ``value(q) * s``.

Bit-exact with :func:`quantkit.reference.dequantize`::

    int grids:    x_hat = (float(q) - float(z)) * s          (without a zero point: float(q) * s)
    float grids:  x_hat = decode(q) * s                      (decode is exact: see _triton_math;
                                                              e4m3fn NaN and e5m2 inf/NaN codes
                                                              decode as such)

``s`` is the float32 scale of the element's group (scale formats are decoded by the caller:
:func:`quantkit.scales.decode_scales`); with 2-D blocks row ``r`` uses scale row
``r // block_rows``.

computed in fp32 (a subtraction then a product: no FMA contraction can apply) and rounded
once to ``out_dtype`` (ties to even; bf16 is rounded with integer bit arithmetic and stored
as raw bits, because the interpreter's fp32 -> bf16 cast truncates and mangles subnormals;
a NaN becomes the quiet NaN 0x7FC0).

Shapes and dtypes::

    codes  (rows, cols)                    int8 (signed int grids) or uint8 (otherwise), any strides
    scale  scheme.scale_shape(rows, cols)  float32 (fp16/bf16 widen exactly), size-1 dims broadcast
    zero   same rules as scale             integer, exactly when ``scheme.has_zero``
    out    (rows, cols)                    float32 / float16 / bfloat16, contiguous

No divisibility constraints; the last group of a row may be shorter.

Tiling: a program owns a ``(BLOCK_M, BLOCK_N)`` tile of codes, so loads of codes and stores of
values are contiguous along rows for every group size. Per-row and per-tensor scales are one
load per row of the tile; per-group scales are gathered per column (``col // groupsize``)
from the ``ceil(cols / g)``-entry row of scales, which stays in L1: the kernel is memory
bound on ``rows * cols * (1 + out_bytes)`` bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.kernels._triton_math import SPECIALS_OF, bf16_bits, minifloat_decode, minifloat_specials
from quantkit.kernels.quantize import (
    broadcast_strides,
    check_matrix,
    check_qparams,
    check_scheme,
    codes_dtype,
    scheme_constexprs,
)
from quantkit.scheme import QuantScheme

# A GPU program moves 8K codes (8 rows x 1024 columns for long rows); the interpreter pays per
# block operation, so CPU tensors get one tile as large as the tensor (capped).
_GPU_TILE = 8192
_GPU_MAX_BLOCK_N = 1024
_INTERPRET_TILE = 1 << 16
_INTERPRET_MAX_BLOCK_N = 1 << 14

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequantize_kernel(
    # pointers
    codes_ptr, scale_ptr, zero_ptr, out_ptr,
    # sizes
    rows, cols, group_size, block_rows,
    # strides
    stride_cm, stride_cn, stride_sm, stride_sg, stride_zm, stride_zg, stride_om, stride_on,
    # quantization
    IS_FLOAT: tl.constexpr, HAS_ZERO: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr, SPECIALS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    # meta
    OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Dequantize one ``(BLOCK_M, BLOCK_N)`` tile of codes."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = offs_m < rows
    mask = row_ok[:, None] & (offs_n < cols)[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = offs_m.to(tl.int64)  # rows * stride can exceed 2**31

    c_ptrs = codes_ptr + rows64[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    c = tl.load(c_ptrs, mask=mask, other=0)  # (BLOCK_M, BLOCK_N) int8/uint8
    if IS_FLOAT:
        q = minifloat_decode(c, EXP_BITS, MANT_BITS, BIAS)  # (BLOCK_M, BLOCK_N) fp32
        q = minifloat_specials(q, c, EXP_BITS, MANT_BITS, SPECIALS)
    else:
        q = c.to(tl.float32)  # (BLOCK_M, BLOCK_N)

    if PER_GROUP:
        grp = offs_n // group_size  # (BLOCK_N,) group of each column
        s_ptrs = scale_ptr + (rows64 // block_rows)[:, None] * stride_sm + grp[None, :] * stride_sg
        s = tl.load(s_ptrs, mask=mask, other=1.0)  # (BLOCK_M, BLOCK_N)
        if HAS_ZERO:
            z_ptrs = zero_ptr + rows64[:, None] * stride_zm + grp[None, :] * stride_zg
            q = q - tl.load(z_ptrs, mask=mask, other=0).to(tl.float32)
    else:  # one scale per row; stride_sm == 0 for per_tensor
        s = tl.load(scale_ptr + rows64 * stride_sm, mask=row_ok, other=1.0)[:, None]  # (M, 1)
        if HAS_ZERO:
            z = tl.load(zero_ptr + rows64 * stride_zm, mask=row_ok, other=0)  # (BLOCK_M,)
            q = q - z.to(tl.float32)[:, None]
    v = q * s  # (BLOCK_M, BLOCK_N) fp32
    o_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :] * stride_on
    if OUT_BF16:  # out_ptr is an int16 view of the bf16 output
        tl.store(o_ptrs, bf16_bits(v).to(tl.int16), mask=mask)
    else:
        tl.store(o_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _tile(rows: int, cols: int, on_gpu: bool) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` for a ``(rows, cols)`` problem."""
    if on_gpu:
        tile, max_n = _GPU_TILE, _GPU_MAX_BLOCK_N
    else:
        tile, max_n = _INTERPRET_TILE, _INTERPRET_MAX_BLOCK_N
    block_n = min(triton.next_power_of_2(cols), max_n)
    block_m = max(1, min(tile // block_n, triton.next_power_of_2(rows)))
    return block_m, block_n


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of ``codes (rows, cols)`` in ``out_dtype``: ``(q - z) * s`` or ``value(q) * s``.

    Bit-exact with :func:`quantkit.reference.dequantize` (see the module docstring).

    Args:
        codes: ``(rows, cols)``, int8 for signed integer grids, uint8 otherwise (what
            :func:`quantkit.kernels.quantize.quantize` returns); any strides; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        scale: float32 of ``scheme.scale_shape(rows, cols)`` (size-1 dims broadcast).
        zero: integer tensor of the same shape when ``scheme.has_zero``, else ``None``.
        out_dtype: float32, float16 or bfloat16.

    Returns:
        A new contiguous ``(rows, cols)`` tensor of ``out_dtype`` on the device of ``codes``.
    """
    scheme = check_scheme(scheme)
    expected = codes_dtype(scheme)
    codes = check_matrix(codes, "codes", (torch.int8, torch.uint8))
    if codes.dtype != expected:
        raise TypeError(
            f"codes must be {str(expected).removeprefix('torch.')} for {scheme.describe()}, "
            f"got {codes.dtype}"
        )
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    rows, cols = codes.shape
    scale, zero, _, _ = check_qparams(scale, zero, scheme, rows, cols, codes.device)
    out, launches = plan_dequantize(codes, scale, zero, scheme, out_dtype, Target.of(codes.device))
    run_all(launches, codes.device)
    return out


def plan_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme,
    out_dtype: torch.dtype, target: Target,
) -> tuple[torch.Tensor, list[Launch]]:
    """The output and launch of :func:`dequantize` on ``target``: ``scale`` float32 and
    ``zero`` int32 as :func:`quantkit.kernels.quantize.check_qparams` returns them."""
    rows, cols = codes.shape
    out = torch.empty(rows, cols, dtype=out_dtype, device=codes.device)
    s_strides = broadcast_strides(scale)
    z_strides = (0, 0) if zero is None else broadcast_strides(zero)
    consts = scheme_constexprs(scheme)
    block_m, block_n = _tile(rows, cols, target.gpu)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    args = (
        codes, scale, scale if zero is None else zero,  # zero_ptr unused without a zero
        out.view(torch.int16) if out.dtype == torch.bfloat16 else out,  # bf16 stored as bits
        rows, cols, scheme.group_cols(cols), scheme.block_rows if scale.shape[0] > 1 else 1,
        codes.stride(0), codes.stride(1), *s_strides, *z_strides, out.stride(0), out.stride(1),
    )
    constexprs = dict(
        IS_FLOAT=consts["IS_FLOAT"], HAS_ZERO=consts["HAS_ZERO"],
        EXP_BITS=consts["EXP_BITS"], MANT_BITS=consts["MANT_BITS"], BIAS=consts["BIAS"],
        SPECIALS=SPECIALS_OF[scheme.dtype.specials], PER_GROUP=scheme.granularity == "per_group",
        OUT_BF16=out.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    launch = Launch(_dequantize_kernel, grid, args, constexprs,
                    num_warps=8 if target.gpu else 4)
    return out, [launch]

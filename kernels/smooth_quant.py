"""Fused SmoothQuant scaling + dynamic per-token activation quantization, one kernel.

Math, bit-exact with :func:`quantkit.matmul_reference.smooth_quantize_reference`, i.e. with
``quantkit.reference.quantize_tensor(x.float() / smooth.float(), scheme)``::

    y[m, k] = x[m, k] / smooth[k]                  fp32, correctly rounded (tl.div_rn)
    lo = min(y[m, :], 0), hi = max(y[m, :], 0)     per row (token)
    scale, zero from (lo, hi)                      as quantkit.reference.compute_qparams
    codes = quantize(y, scale, zero)               as quantkit.reference.quantize

The scale and code arithmetic is that of :mod:`quantkit.kernels.quantize`
(:func:`scale_zero_from_minmax`, :func:`quantize_values`), which reproduces the reference
operation for operation; any per-token scheme works (int with or without zero point,
unsigned, fp8/fp4 grids), the usual one being symmetric int8 for W8A8.

Shapes and dtypes::

    x       (M, K)   float16 / bfloat16 / float32, any strides
    smooth  (K,)     float16 / bfloat16 / float32 (positive, finite: not checked)
    codes   (M, K)   int8 (signed int grids) or uint8 (unsigned, float-grid bit patterns)
    scale   (M, 1)   float32
    zero    (M, 1)   int32, only when ``scheme.has_zero``

Tiling: a program owns ``BLOCK_M`` rows. A row that fits ``max_block_cols`` (16384 on a GPU:
every LLM hidden size) is loaded once, reduced and quantized from registers, so ``x`` is read
once and ``smooth`` once per program; longer rows are walked twice in chunks (min/max, then
quantize). Memory bound: ``M * K * (x_bytes + 1)`` bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.kernels.matmul import X_DTYPES
from quantkit.kernels.quantize import (
    check_matrix,
    check_scheme,
    codes_dtype,
    quantize_values,
    scale_zero_from_minmax,
    scheme_constexprs,
)
from quantkit.matmul_reference import check_per_row
from quantkit.scheme import QuantScheme

_GPU_MAX_SINGLE = 16384  # longest row quantized from registers in one pass on a GPU
_GPU_TILE = 8192  # BLOCK_M * BLOCK_K target for short rows
_INTERPRET_MAX_SINGLE = 1 << 16
_INTERPRET_TILE = 1 << 16


@triton.jit
def _smoothed_chunk(x_rows, smooth_ptr, offs_k, m_ok, K, stride_xk):
    """``x / smooth`` of columns ``offs_k`` of rows ``x_rows`` as fp32 ``(BLOCK_M, BLOCK_K)``;
    masked lanes are 0 (never change ``min(y, 0)`` / ``max(y, 0)``)."""
    k_ok = offs_k < K
    x = tl.load(x_rows[:, None] + offs_k[None, :].to(tl.int64) * stride_xk,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    s = tl.load(smooth_ptr + offs_k, mask=k_ok, other=1.0).to(tl.float32)  # (BLOCK_K,)
    return tl.div_rn(x, tl.broadcast_to(s[None, :], x.shape))


@triton.jit
def _smooth_quant_kernel(
    # pointers
    x_ptr, smooth_ptr, codes_ptr, scale_ptr, zero_ptr,
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk, stride_cm,
    # quantization
    IS_FLOAT: tl.constexpr, HAS_ZERO: tl.constexpr, UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr, ABSMAX_CODE: tl.constexpr,
    # meta
    SINGLE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Smooth, reduce and quantize ``BLOCK_M`` rows (``SINGLE_CHUNK``: ``K <= BLOCK_K``)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    m_ok = offs_m < M
    rows64 = offs_m.to(tl.int64)
    x_rows = x_ptr + rows64 * stride_xm  # (BLOCK_M,)
    c_rows = codes_ptr + rows64 * stride_cm

    if SINGLE_CHUNK:
        y = _smoothed_chunk(x_rows, smooth_ptr, offs_k, m_ok, K, stride_xk)  # (BLOCK_M, BLOCK_K)
        lo = tl.minimum(tl.min(y, axis=1), 0.0)  # (BLOCK_M,)
        hi = tl.maximum(tl.max(y, axis=1), 0.0)
    else:
        lo = tl.zeros((BLOCK_M,), tl.float32)  # starting at 0 applies min(y, 0)
        hi = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, K, BLOCK_K):
            y = _smoothed_chunk(x_rows, smooth_ptr, start + offs_k, m_ok, K, stride_xk)
            lo = tl.minimum(lo, tl.min(y, axis=1))
            hi = tl.maximum(hi, tl.max(y, axis=1))
    scale, zero = scale_zero_from_minmax(
        lo, hi, HAS_ZERO, UNSIGNED, QMIN, QMAX, ABSMAX_CODE
    )  # (BLOCK_M,) fp32, int32
    tl.store(scale_ptr + offs_m, scale, mask=m_ok)
    if HAS_ZERO:
        tl.store(zero_ptr + offs_m, zero, mask=m_ok)
    scale_2d = tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K))
    zero_2d = tl.broadcast_to(zero[:, None], (BLOCK_M, BLOCK_K))

    if SINGLE_CHUNK:
        code = quantize_values(y, scale_2d, zero_2d, IS_FLOAT, HAS_ZERO, QMIN, QMAX,
                               EXP_BITS, MANT_BITS, BIAS, MAX_VALUE)  # (BLOCK_M, BLOCK_K) int32
        mask = m_ok[:, None] & (offs_k < K)[None, :]
        tl.store(c_rows[:, None] + offs_k[None, :], code.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, K, BLOCK_K):
            offs = start + offs_k
            y = _smoothed_chunk(x_rows, smooth_ptr, offs, m_ok, K, stride_xk)
            code = quantize_values(y, scale_2d, zero_2d, IS_FLOAT, HAS_ZERO, QMIN, QMAX,
                                   EXP_BITS, MANT_BITS, BIAS, MAX_VALUE)
            mask = m_ok[:, None] & (offs < K)[None, :]
            tl.store(c_rows[:, None] + offs[None, :], code.to(codes_ptr.dtype.element_ty),
                     mask=mask)


def smooth_quantize_per_token(
    x: torch.Tensor,
    smooth: torch.Tensor,
    scheme: QuantScheme,
    *,
    max_block_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize_tensor(x / smooth, scheme)`` with per-token scales, in one kernel.

    Args:
        x: ``(M, K)`` float16/bfloat16/float32, finite, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        smooth: ``(K,)`` SmoothQuant divisors (float16/bfloat16/float32), on x's device.
        scheme: granularity ``per_token`` (or ``per_channel``: also one scale per row).
        max_block_cols: longest row held in registers (a power of two; default 16384 on a
            GPU); longer rows are processed in two chunked passes. Tests lower it.

    Returns:
        ``codes (M, K)``, ``scale (M, 1)`` float32, ``zero (M, 1)`` int32 or None; bit-exact
        with :func:`quantkit.matmul_reference.smooth_quantize_reference`.
    """
    scheme = check_scheme(scheme)
    check_per_row(scheme)
    x = check_matrix(x, "x", X_DTYPES)
    M, K = x.shape
    if not isinstance(smooth, torch.Tensor):
        raise TypeError(f"smooth must be a torch.Tensor, got {type(smooth).__name__}")
    if tuple(smooth.shape) != (K,) or smooth.dtype not in X_DTYPES:
        raise ValueError(
            f"smooth must be a float16/bfloat16/float32 tensor of shape ({K},), got "
            f"{smooth.dtype} {tuple(smooth.shape)}"
        )
    if smooth.device != x.device:
        raise ValueError(f"smooth is on {smooth.device} but x is on {x.device}")
    if max_block_cols is not None and (
        not isinstance(max_block_cols, int) or max_block_cols < 1
        or max_block_cols & (max_block_cols - 1)
    ):
        raise ValueError(f"max_block_cols must be a power of two or None, got {max_block_cols!r}")
    smooth = smooth.contiguous()
    codes, scale, zero, launches = plan_smooth_quantize_per_token(
        x, smooth, scheme, Target.of(x.device), max_block_cols=max_block_cols
    )
    run_all(launches, x.device)
    return codes, scale, zero


def plan_smooth_quantize_per_token(
    x: torch.Tensor,
    smooth: torch.Tensor,
    scheme: QuantScheme,
    target: Target,
    *,
    max_block_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[Launch]]:
    """The outputs ``(codes, scale, zero)`` and launch of :func:`smooth_quantize_per_token` on
    ``target`` (arguments validated, ``smooth`` contiguous; tensors may be on ``meta``)."""
    M, K = x.shape
    codes = torch.empty(M, K, dtype=codes_dtype(scheme), device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    zero = torch.empty(M, 1, dtype=torch.int32, device=x.device) if scheme.has_zero else None

    on_gpu = target.gpu
    max_single = max_block_cols or (_GPU_MAX_SINGLE if on_gpu else _INTERPRET_MAX_SINGLE)
    block_k = min(triton.next_power_of_2(K), max_single)
    tile = _GPU_TILE if on_gpu else _INTERPRET_TILE
    block_m = max(1, min(tile // block_k, triton.next_power_of_2(M)))
    args = (
        x, smooth, codes, scale, scale if zero is None else zero,
        M, K,
        x.stride(0), x.stride(1), codes.stride(0),
    )
    constexprs = dict(
        scheme_constexprs(scheme), SINGLE_CHUNK=K <= block_k, BLOCK_M=block_m, BLOCK_K=block_k
    )
    warps = min(16, max(4, block_m * block_k // 1024)) if on_gpu else 4
    launch = Launch(_smooth_quant_kernel, (triton.cdiv(M, block_m),), args, constexprs,
                    num_warps=warps)
    return codes, scale, zero, [launch]

"""Triton kernels that quantize a ``(rows, cols)`` tensor, computing its scales on the fly.

The math is :mod:`quantkit.reference`, bit for bit (every step is a correctly rounded fp32
operation in the same order; divisions use ``tl.div_rn``)::

    lo = min(x_group, 0), hi = max(x_group, 0)                        # per quantization group
    int, symmetric:   s = amax / absmax_code    (amax = max(-lo, hi); absmax_code = qmax + 0.5
                                                 full range, qmax restricted)
    int, unsigned:    s = hi / qmax             (no zero point)
    int, zero point:  s = (hi - lo) / (qmax - qmin),  z = clamp(round(qmin - lo / s), qmin, qmax)
    float grids:      s = amax / max_value      (absmax_code = max_value)
    s = 1 where s == 0
    e8m0 scales:      s = 2**clamp(floor(log2 amax) - emax, -127, 127)    (OCP MX; exponent bits)
    e4m3 scales:      s = value(fp8(g * (amax / max_value))) / g         (NVFP4; 0.125 for 0)
                      g = (1 / max(amax_tensor, 2**-126)) * (448 * max_value), per tensor
    int codes:        q = clamp(round(x / s) [+ z], qmin, qmax)       (round half to even)
    float codes:      q = bits(round_to_grid(clamp(x / s, -max_value, max_value)))

Shapes and dtypes::

    x      (rows, cols)                      float32 / float16 / bfloat16, any strides
    codes  (rows, cols)                      int8 (signed int grids) or uint8 (unsigned int,
                                             fp8 bytes, fp4 nibbles sign<<3 | exp<<1 | mant)
    scale  scheme.scale_shape(rows, cols)    float32: (1, 1), (rows, 1) or (rows, ceil(cols / g))
    zero   same shape as scale               int32, only when ``scheme.has_zero``

Any ``rows``/``cols``/``groupsize`` (``1 <= g <= cols``; the last group of a row is shorter
where ``g`` does not divide ``cols``); no divisibility constraints. 2-D blocks (``block_rows = R``)
share one scale among ``R`` rows: scale shape ``(ceil(rows / R), ceil(cols / g))``.

Tiling. The unit of work is a *segment*: one quantization group of one row (a whole row for
per_channel/per_token), ``num_segments = rows * groups_per_row``. A program owns a
``(BLOCK_S, BLOCK_G)`` tile: ``BLOCK_S`` consecutive segments, each padded to
``BLOCK_G = next_pow2(g)`` columns (~8K elements per program on a GPU; fewer segments per
program when that would leave the GPU with under ~2 programs per SM). For contiguous ``x``
and a power-of-two ``g`` a tile is one contiguous stretch of memory (16-byte vector loads and
stores), and a segment's min/max is a reduction along the tile's inner axis inside the
program: ``x`` is read once and the scale costs no extra pass or launch. Segments longer than
``max_block_cols`` (16384 on a GPU, so rows up to that length are still read once) are walked
in chunks twice: a min/max pass, then a quantize pass that re-reads the row (from L2 on a
GPU). per_tensor needs a global reduction: a grid of ``(BLOCK_M, BLOCK_N)`` tiles writes
partial min/max pairs, one program reduces them to the scale (and zero), and the segment
kernel quantizes with that scale (3 launches, deterministic, no atomics). e4m3 scales first
reduce the per-tensor ``g`` the same way (2 more launches). 2-D blocks: one program per block
computes its scale (:func:`_block_qparams_kernel`), then the segment kernel quantizes with it.
:func:`quantize_with_qparams` runs the same segment kernel with given scales; per-row and
per-tensor scales let it cut long rows into independent chunks, so only per_group with
groups longer than ``max_block_cols`` loops.

The kernels are memory bound: ``rows * cols * (in_bytes + 1)`` bytes, plus a re-read of ``x``
for per_tensor and for rows longer than ``max_block_cols``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.kernels._triton_math import (
    ROUND_LIMIT,
    SCALE_FMT_OF,
    e4m3_scale_from_amax,
    minifloat_encode,
    mx_scale_from_amax,
    round_half_even,
)
from quantkit.scheme import QuantScheme

# Tile sizes. On a GPU a program moves ~8K elements (16K for a single-pass long row) with
# 4-16 warps; the interpreter pays per block operation, so CPU tensors get far larger tiles.
_GPU_TILE = 8192  # BLOCK_S * BLOCK_G target
_GPU_MAX_SINGLE = 16384  # longest segment quantized from registers in one pass
_GPU_LOOP_CHUNK = 4096  # chunk of a longer segment
_GPU_MIN_PROGRAMS = 264  # two programs per H200 SM before tiles shrink to fewer segments
_INTERPRET_TILE = 1 << 16
_INTERPRET_MAX_SINGLE = 1 << 16
_GPU_PARTIALS_BLOCK_N = 2048  # columns of a per_tensor min/max tile on a GPU
_PARTIALS_BLOCK = 1024  # partials reduced per step of the per_tensor qparams program

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def scale_zero_from_minmax(
    lo, hi,
    HAS_ZERO: tl.constexpr, UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, ABSMAX_CODE: tl.constexpr,
):
    """``(scale fp32, zero int32)`` of groups with ``lo = min(x, 0)`` and ``hi = max(x, 0)``.

    Grids without a zero point map their largest magnitude to ``ABSMAX_CODE``
    (:attr:`QuantScheme.absmax_code`: the float grid's maximum, ``qmax`` or ``qmax + 0.5``).
    """
    if HAS_ZERO:
        levels = tl.full(lo.shape, QMAX - QMIN, tl.float32)
        scale = tl.div_rn(hi - lo, levels)
        # hi - lo beyond the float32 range: the same scale without the overflow (as the reference)
        scale = tl.where(scale == float("inf"), tl.div_rn(hi, levels) - tl.div_rn(lo, levels), scale)
    elif UNSIGNED:
        scale = tl.div_rn(hi, tl.full(lo.shape, ABSMAX_CODE, tl.float32))
    else:
        scale = tl.div_rn(tl.maximum(-lo, hi), tl.full(lo.shape, ABSMAX_CODE, tl.float32))
    scale = tl.where(scale == 0.0, 1.0, scale)
    if HAS_ZERO:
        z = QMIN - tl.div_rn(lo, scale)
        z = round_half_even(tl.minimum(tl.maximum(z, -ROUND_LIMIT), ROUND_LIMIT))
        zero = tl.minimum(tl.maximum(z, QMIN), QMAX).to(tl.int32)
    else:
        zero = tl.zeros(lo.shape, tl.int32)
    return scale, zero


@triton.jit
def group_scale_zero(
    lo, hi, g,
    HAS_ZERO: tl.constexpr, UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, ABSMAX_CODE: tl.constexpr,
    SCALE_FMT: tl.constexpr, EMAX: tl.constexpr, MAX_VALUE: tl.constexpr,
):
    """:func:`scale_zero_from_minmax` in the scheme's scale format: float scales as there, e8m0
    (``SCALE_FMT == 1``) the OCP MX power of two, e4m3 (2) NVFP4's scale with the per-tensor
    ``g`` (fp32 scalar; unused otherwise)."""
    if SCALE_FMT == 1:
        return mx_scale_from_amax(tl.maximum(-lo, hi), EMAX), tl.zeros(lo.shape, tl.int32)
    elif SCALE_FMT == 2:
        return e4m3_scale_from_amax(tl.maximum(-lo, hi), g, MAX_VALUE), tl.zeros(lo.shape, tl.int32)
    else:
        return scale_zero_from_minmax(lo, hi, HAS_ZERO, UNSIGNED, QMIN, QMAX, ABSMAX_CODE)


@triton.jit
def quantize_values(
    x, scale, zero,
    IS_FLOAT: tl.constexpr, HAS_ZERO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
):
    """int32 codes of fp32 ``x`` with ``scale`` (fp32) and ``zero`` (int32), same shapes."""
    y = tl.div_rn(x, scale)
    if IS_FLOAT:
        code = minifloat_encode(y, EXP_BITS, MANT_BITS, BIAS, MAX_VALUE)
    else:
        # x / s can be huge with given scales; beyond 2**22 the clamp below decides anyway
        y = tl.minimum(tl.maximum(y, -ROUND_LIMIT), ROUND_LIMIT)
        q = round_half_even(y)
        if HAS_ZERO:
            q = q + zero.to(tl.float32)
        code = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.int32)
    return code


@triton.jit
def _quantize_kernel(
    # pointers
    x_ptr, codes_ptr, scale_ptr, zero_ptr, global_ptr,
    # sizes
    cols, num_segments, num_groups, group_size, block_rows,
    # strides
    stride_xm, stride_xn, stride_cm, stride_cn, stride_sm, stride_sg, stride_zm, stride_zg,
    # quantization
    IS_FLOAT: tl.constexpr, HAS_ZERO: tl.constexpr, UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr, ABSMAX_CODE: tl.constexpr,
    SCALE_FMT: tl.constexpr, EMAX: tl.constexpr,
    # meta
    COMPUTE_QPARAMS: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Quantize ``BLOCK_S`` segments (row ``s // num_groups``, group ``s % num_groups``).

    ``COMPUTE_QPARAMS``: compute each segment's scale/zero from its values and store them (in
    the scale format ``SCALE_FMT``; e4m3 reads the per-tensor scale at ``global_ptr``); else load
    them (``stride_sg``/``stride_zg`` may be 0 to share one scale per row; row ``r`` reads scale
    row ``r // block_rows``: 2-D blocks).
    ``SINGLE_CHUNK``: ``group_size <= BLOCK_G``, the segment lives in registers; else it is
    walked in chunks of ``BLOCK_G`` (twice when computing qparams).
    """
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,) segment ids
    offs_g = tl.arange(0, BLOCK_G)  # (BLOCK_G,) column within a chunk of a segment
    seg_ok = offs_s < num_segments
    row = offs_s // num_groups  # (BLOCK_S,)
    grp = offs_s - row * num_groups  # (BLOCK_S,)
    col0 = grp * group_size  # (BLOCK_S,) first column of the segment
    seg_len = tl.minimum(group_size, cols - col0)  # (BLOCK_S,) the last group may be shorter
    row64 = row.to(tl.int64)  # row * stride can exceed 2**31
    col64 = col0.to(tl.int64)
    x_seg = x_ptr + row64 * stride_xm + col64 * stride_xn  # (BLOCK_S,) pointers
    c_seg = codes_ptr + row64 * stride_cm + col64 * stride_cn  # (BLOCK_S,) pointers
    s_ptrs = scale_ptr + (row64 // block_rows) * stride_sm + grp * stride_sg  # (BLOCK_S,)
    z_ptrs = zero_ptr + row64 * stride_zm + grp * stride_zg  # (BLOCK_S,)
    if SCALE_FMT == 2:
        g = tl.load(global_ptr)  # the per-tensor fp32 scale of e4m3 scales
    else:
        g = 1.0

    if SINGLE_CHUNK:
        mask = seg_ok[:, None] & (offs_g[None, :] < seg_len[:, None])  # (BLOCK_S, BLOCK_G)
        x_ptrs = x_seg[:, None] + (offs_g.to(tl.int64) * stride_xn)[None, :]
        # padding reads 0, which never changes min(x, 0) or max(x, 0)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_G)
        if COMPUTE_QPARAMS:
            lo = tl.minimum(tl.min(x, axis=1), 0.0)  # (BLOCK_S,)
            hi = tl.maximum(tl.max(x, axis=1), 0.0)  # (BLOCK_S,)
            scale, zero = group_scale_zero(
                lo, hi, g, HAS_ZERO, UNSIGNED, QMIN, QMAX, ABSMAX_CODE, SCALE_FMT, EMAX, MAX_VALUE
            )
            tl.store(s_ptrs, scale, mask=seg_ok)
            if HAS_ZERO:
                tl.store(z_ptrs, zero, mask=seg_ok)
        else:
            scale = tl.load(s_ptrs, mask=seg_ok, other=1.0).to(tl.float32)  # (BLOCK_S,)
            if HAS_ZERO:
                zero = tl.load(z_ptrs, mask=seg_ok, other=0).to(tl.int32)  # (BLOCK_S,)
            else:
                zero = tl.zeros((BLOCK_S,), tl.int32)
        code = quantize_values(
            x,
            tl.broadcast_to(scale[:, None], (BLOCK_S, BLOCK_G)),
            tl.broadcast_to(zero[:, None], (BLOCK_S, BLOCK_G)),
            IS_FLOAT, HAS_ZERO, QMIN, QMAX, EXP_BITS, MANT_BITS, BIAS, MAX_VALUE,
        )  # (BLOCK_S, BLOCK_G) int32
        c_ptrs = c_seg[:, None] + (offs_g * stride_cn)[None, :]
        tl.store(c_ptrs, code.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        if COMPUTE_QPARAMS:
            lo = tl.zeros((BLOCK_S,), tl.float32)  # starting at 0 applies min(x, 0)
            hi = tl.zeros((BLOCK_S,), tl.float32)
            for start in range(0, group_size, BLOCK_G):
                offs = start + offs_g  # (BLOCK_G,)
                mask = seg_ok[:, None] & (offs[None, :] < seg_len[:, None])
                x_ptrs = x_seg[:, None] + (offs.to(tl.int64) * stride_xn)[None, :]
                x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_G)
                lo = tl.minimum(lo, tl.min(x, axis=1))
                hi = tl.maximum(hi, tl.max(x, axis=1))
            scale, zero = group_scale_zero(
                lo, hi, g, HAS_ZERO, UNSIGNED, QMIN, QMAX, ABSMAX_CODE, SCALE_FMT, EMAX, MAX_VALUE
            )
            tl.store(s_ptrs, scale, mask=seg_ok)
            if HAS_ZERO:
                tl.store(z_ptrs, zero, mask=seg_ok)
        else:
            scale = tl.load(s_ptrs, mask=seg_ok, other=1.0).to(tl.float32)  # (BLOCK_S,)
            if HAS_ZERO:
                zero = tl.load(z_ptrs, mask=seg_ok, other=0).to(tl.int32)  # (BLOCK_S,)
            else:
                zero = tl.zeros((BLOCK_S,), tl.int32)
        scale_2d = tl.broadcast_to(scale[:, None], (BLOCK_S, BLOCK_G))
        zero_2d = tl.broadcast_to(zero[:, None], (BLOCK_S, BLOCK_G))
        for start in range(0, group_size, BLOCK_G):
            offs = start + offs_g  # (BLOCK_G,)
            mask = seg_ok[:, None] & (offs[None, :] < seg_len[:, None])
            x_ptrs = x_seg[:, None] + (offs.to(tl.int64) * stride_xn)[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_G)
            code = quantize_values(
                x, scale_2d, zero_2d,
                IS_FLOAT, HAS_ZERO, QMIN, QMAX, EXP_BITS, MANT_BITS, BIAS, MAX_VALUE,
            )  # (BLOCK_S, BLOCK_G) int32
            c_ptrs = c_seg[:, None] + (offs * stride_cn)[None, :]
            tl.store(c_ptrs, code.to(codes_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _minmax_partials_kernel(
    # pointers
    x_ptr, part_ptr,
    # sizes
    rows, cols,
    # strides
    stride_xm, stride_xn,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``part[pid] = (min(tile, 0), max(tile, 0))`` of one ``(BLOCK_M, BLOCK_N)`` tile of ``x``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (offs_m < rows)[:, None] & (offs_n < cols)[None, :]
    x_ptrs = (x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
              + offs_n.to(tl.int64)[None, :] * stride_xn)  # strided x: 64-bit offsets
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    lo = tl.minimum(tl.min(tl.min(x, axis=1), axis=0), 0.0)
    hi = tl.maximum(tl.max(tl.max(x, axis=1), axis=0), 0.0)
    pid = pid_m * tl.num_programs(1) + pid_n
    tl.store(part_ptr + 2 * pid, lo)
    tl.store(part_ptr + 2 * pid + 1, hi)


@triton.jit
def _tensor_qparams_kernel(
    # pointers
    part_ptr, scale_ptr, zero_ptr, global_ptr,
    # sizes
    num_parts,
    # quantization
    HAS_ZERO: tl.constexpr, UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, ABSMAX_CODE: tl.constexpr,
    SCALE_FMT: tl.constexpr, EMAX: tl.constexpr, MAX_VALUE: tl.constexpr,
    # meta
    GLOBAL_ONLY: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: reduce ``num_parts`` (lo, hi) pairs and store the per-tensor scale/zero, or
    with ``GLOBAL_ONLY`` the per-tensor fp32 scale of e4m3 scales,
    ``g = (1 / max(amax, 2**-126)) * (448 * MAX_VALUE)`` (1 where not finite), at ``global_ptr``.
    With e4m3 scales and not ``GLOBAL_ONLY``, ``g`` is read from ``global_ptr``."""
    offs_p = tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    lo = tl.zeros((BLOCK_P,), tl.float32)
    hi = tl.zeros((BLOCK_P,), tl.float32)
    for start in range(0, num_parts, BLOCK_P):
        mask = start + offs_p < num_parts
        lo = tl.minimum(lo, tl.load(part_ptr + 2 * (start + offs_p), mask=mask, other=0.0))
        hi = tl.maximum(hi, tl.load(part_ptr + 2 * (start + offs_p) + 1, mask=mask, other=0.0))
    lo_t = tl.min(lo, axis=0, keep_dims=True)  # (1,)
    hi_t = tl.max(hi, axis=0, keep_dims=True)  # (1,)
    offs_0 = tl.arange(0, 1)
    if GLOBAL_ONLY:
        amax = tl.maximum(tl.maximum(-lo_t, hi_t), 1.1754943508222875e-38)
        g = tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), amax) * (448.0 * MAX_VALUE)
        g = tl.where(g == float("inf"), 1.0, g)
        tl.store(global_ptr + offs_0, g)
    else:
        if SCALE_FMT == 2:
            g = tl.load(global_ptr + offs_0)
        else:
            g = tl.full((1,), 1.0, tl.float32)
        scale, zero = group_scale_zero(
            lo_t, hi_t, g, HAS_ZERO, UNSIGNED, QMIN, QMAX, ABSMAX_CODE, SCALE_FMT, EMAX, MAX_VALUE
        )  # (1,) each
        tl.store(scale_ptr + offs_0, scale)
        if HAS_ZERO:
            tl.store(zero_ptr + offs_0, zero)


@triton.jit
def _block_qparams_kernel(
    # pointers
    x_ptr, scale_ptr, global_ptr,
    # sizes
    rows, cols,
    # strides
    stride_xm, stride_xn, stride_sm, stride_sg,
    # quantization
    ABSMAX_CODE: tl.constexpr, SCALE_FMT: tl.constexpr, EMAX: tl.constexpr, MAX_VALUE: tl.constexpr,
    # meta
    R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The scale of one 2-D block of ``R`` rows by ``C`` columns (program ``(i, j)``: rows from
    ``i * R``, columns from ``j * C``; the last ones may be shorter), walked in
    ``(BLOCK_R, BLOCK_C)`` tiles (``BLOCK_C >= C``)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    c_ok = (tl.arange(0, BLOCK_C) < C) & (offs_c < cols)
    amax = tl.zeros((BLOCK_R,), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = pid_r * R + r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        r_ok = (r0 + tl.arange(0, BLOCK_R) < R) & (offs_r < rows)
        x_ptrs = (x_ptr + offs_r.to(tl.int64)[:, None] * stride_xm
                  + offs_c.to(tl.int64)[None, :] * stride_xn)
        x = tl.load(x_ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    a = tl.max(amax, axis=0, keep_dims=True)  # (1,)
    if SCALE_FMT == 2:
        g = tl.load(global_ptr + tl.arange(0, 1))
    else:
        g = tl.full((1,), 1.0, tl.float32)
    scale, _ = group_scale_zero(-a, a, g, False, False, 0.0, 0.0, ABSMAX_CODE, SCALE_FMT, EMAX, MAX_VALUE)
    tl.store(scale_ptr + pid_r * stride_sm + pid_c * stride_sg + tl.arange(0, 1), scale)


# ----------------------------------------------------------------------------------------------
# launcher helpers (shared with quantkit.kernels.dequantize)
# ----------------------------------------------------------------------------------------------


def scheme_constexprs(scheme: QuantScheme) -> dict:
    """The quantization constexprs of the kernels for ``scheme``."""
    dt = scheme.dtype
    # grids with a zero point never read ABSMAX_CODE (their scale comes from hi - lo)
    absmax_code = 0.0 if scheme.has_zero else scheme.absmax_code
    if dt.is_float:
        return dict(
            IS_FLOAT=True, HAS_ZERO=False, UNSIGNED=False, QMIN=0.0, QMAX=0.0,
            EXP_BITS=dt.exponent_bits, MANT_BITS=dt.mantissa_bits, BIAS=dt.exponent_bias,
            MAX_VALUE=float(dt.max_value), ABSMAX_CODE=absmax_code,
        )
    return dict(
        IS_FLOAT=False, HAS_ZERO=scheme.has_zero, UNSIGNED=scheme.unsigned,
        QMIN=float(scheme.qmin), QMAX=float(scheme.qmax),
        EXP_BITS=0, MANT_BITS=0, BIAS=0, MAX_VALUE=0.0, ABSMAX_CODE=absmax_code,
    )


def scale_constexprs(scheme: QuantScheme) -> dict:
    """The scale-format constexprs (``SCALE_FMT``, ``EMAX``) of the quantize kernels."""
    return dict(SCALE_FMT=SCALE_FMT_OF[scheme.scale_format],
                EMAX=scheme.dtype.emax if scheme.dtype.is_float else 0)


def codes_dtype(scheme: QuantScheme) -> torch.dtype:
    """int8 for signed integer grids, uint8 otherwise (as :func:`quantkit.reference.quantize`)."""
    return torch.int8 if scheme.dtype.is_int and not scheme.unsigned else torch.uint8


def check_scheme(scheme: object) -> QuantScheme:
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")
    return scheme


def check_device(t: torch.Tensor, name: str) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{name} is on {t.device}: the Triton quantize kernels need a CUDA tensor, or "
            "TRITON_INTERPRET=1 set before quantkit.kernels is imported"
        )


def check_matrix(t: object, name: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``t`` must be a non-empty 2-D tensor of one of ``dtypes`` on a usable device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {t.dtype}")
    check_device(t, name)
    return t


def broadcast_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of a 2-D ``t`` with 0 on size-1 dims (they broadcast)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def check_qparams(
    scale: object, zero: object, scheme: QuantScheme, rows: int, cols: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int], tuple[int, int]]:
    """Validate given ``scale``/``zero`` for a ``(rows, cols)`` tensor.

    Each must be 2-D with every dim either 1 (broadcast) or that of
    ``scheme.scale_shape(rows, cols)``; ``zero`` is required exactly when ``scheme.has_zero``.
    Returns ``(scale fp32, zero int32 | None, scale strides, zero strides)`` with stride 0 on
    broadcast dims.
    """
    expected = scheme.scale_shape(rows, cols)  # also validates groupsize against cols

    def _check(t: object, name: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or any(n not in (1, e) for n, e in zip(t.shape, expected)):
            raise ValueError(
                f"{name} must have shape {expected} for {scheme.describe()} on a "
                f"({rows}, {cols}) tensor (size-1 dims broadcast), got {tuple(t.shape)}"
            )
        if t.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name} must be {names}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")
        return t

    # fp16/bf16 scales widen to fp32 exactly, as torch's type promotion does in the reference
    scale = _check(scale, "scale", _X_DTYPES).to(torch.float32)
    if scheme.has_zero:
        if zero is None:
            raise ValueError(f"zero is required: {scheme.describe()} has a zero point")
        int_dtypes = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
        zero = _check(zero, "zero", int_dtypes)
        zero = zero.to(torch.int32)
        return scale, zero, broadcast_strides(scale), broadcast_strides(zero)
    if zero is not None:
        raise ValueError(f"zero must be None: {scheme.describe()} has no zero point")
    return scale, None, broadcast_strides(scale), (0, 0)


# ----------------------------------------------------------------------------------------------
# launchers: planners (tiles and grids for a Target, no validation) and the public launchers
# ----------------------------------------------------------------------------------------------


def _segments_launch(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    scheme: QuantScheme, target: Target, *, compute: bool, group_size: int, num_groups: int,
    scale_strides: tuple[int, int], zero_strides: tuple[int, int], max_block_cols: int | None,
    global_scale: torch.Tensor | None = None, block_rows: int = 1,
) -> Launch:
    """:func:`_quantize_kernel` over ``rows * num_groups`` segments of ``group_size``
    (``global_scale``: the (1, 1) fp32 per-tensor scale e4m3 scales are computed with)."""
    on_gpu = target.gpu
    tile = _GPU_TILE if on_gpu else _INTERPRET_TILE
    max_single = max_block_cols or (_GPU_MAX_SINGLE if on_gpu else _INTERPRET_MAX_SINGLE)
    num_segments = x.shape[0] * num_groups
    single = group_size <= max_single
    if single:
        block_g = triton.next_power_of_2(group_size)
    else:
        block_g = max_block_cols or (_GPU_LOOP_CHUNK if on_gpu else _INTERPRET_MAX_SINGLE)
    block_s = max(1, min(tile // block_g, triton.next_power_of_2(num_segments)))
    if on_gpu:  # few long segments (decode-time activations): more programs, fewer rows each
        while block_s > 1 and triton.cdiv(num_segments, block_s) < _GPU_MIN_PROGRAMS:
            block_s //= 2
    args = (
        x, codes, scale, scale if zero is None else zero,  # zero_ptr unused without a zero
        scale if global_scale is None else global_scale,  # read only by e4m3 scales
        x.shape[1], num_segments, num_groups, group_size, block_rows,
        x.stride(0), x.stride(1), codes.stride(0), codes.stride(1),
        *scale_strides, *zero_strides,
    )
    constexprs = dict(
        scheme_constexprs(scheme), **scale_constexprs(scheme),
        COMPUTE_QPARAMS=compute, SINGLE_CHUNK=single, BLOCK_S=block_s, BLOCK_G=block_g,
    )
    warps = min(16, max(4, block_s * block_g // 1024)) if on_gpu else 4
    return Launch(_quantize_kernel, (triton.cdiv(num_segments, block_s),), args, constexprs,
                  num_warps=warps)


def _check_block_cols(max_block_cols: object) -> int | None:
    if max_block_cols is None:
        return None
    if (
        isinstance(max_block_cols, bool) or not isinstance(max_block_cols, int)
        or max_block_cols < 1 or max_block_cols & (max_block_cols - 1)
    ):
        raise ValueError(f"max_block_cols must be a power of two or None, got {max_block_cols!r}")
    return max_block_cols


def quantize(
    x: torch.Tensor, scheme: QuantScheme, *, max_block_cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scale/zero of ``x (rows, cols)`` under ``scheme`` and its codes, in fused kernels.

    Bit-exact with :func:`quantkit.reference.quantize_tensor` (see the module docstring for
    the math, shapes and dtypes). ``x`` is float32/float16/bfloat16, 2-D, non-empty, any
    strides, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``); it must be finite (NaN and
    inf are not checked here: :func:`quantkit.ops.quantize` checks them).

    Args:
        max_block_cols: longest group (or row) held in registers at once (a power of two);
            longer ones are processed in chunks of this size. ``None``: 16384 on a GPU. Tests
            lower it to exercise the chunked path on small shapes.

    Returns:
        ``codes (rows, cols)`` int8/uint8, ``scale`` float32 of ``scheme.scale_shape``, and
        ``zero`` int32 of the same shape when ``scheme.has_zero`` (else ``None``).
    """
    scheme = check_scheme(scheme)
    x = check_matrix(x, "x", _X_DTYPES)
    max_block_cols = _check_block_cols(max_block_cols)
    scheme.scale_shape(*x.shape)  # validates groupsize against cols
    codes, scale, zero, launches = plan_quantize(
        x, scheme, Target.of(x.device), max_block_cols=max_block_cols
    )
    run_all(launches, x.device)
    return codes, scale, zero


def plan_quantize(
    x: torch.Tensor, scheme: QuantScheme, target: Target, *, max_block_cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[Launch]]:
    """The outputs ``(codes, scale, zero)`` and launches of :func:`quantize` on ``target``
    (arguments already validated; tensors may live on the ``meta`` device)."""
    rows, cols = x.shape
    shape = scheme.scale_shape(rows, cols)
    dev = x.device
    codes = torch.empty(rows, cols, dtype=codes_dtype(scheme), device=dev)
    scale = torch.empty(shape, dtype=torch.float32, device=dev)
    zero = torch.empty(shape, dtype=torch.int32, device=dev) if scheme.has_zero else None
    launches: list[Launch] = []
    glob = None
    if scheme.has_global_scale:  # e4m3 scales: the per-tensor fp32 scale first (2 launches)
        glob = torch.empty(1, 1, dtype=torch.float32, device=dev)
        launches += _tensor_launches(x, scale, zero, glob, scheme, target, max_block_cols,
                                     global_only=True)
    if scheme.granularity == "per_tensor":  # partial (lo, hi) per tile -> one scale -> quantize
        launches += _tensor_launches(x, scale, zero, glob, scheme, target, max_block_cols)
        launches.append(_rowwise_given_launch(
            x, codes, scale, zero, scheme, target, (0, 0), (0, 0), max_block_cols, glob))
    elif scheme.block_rows > 1:  # 2-D blocks: one program per block computes its scale
        launches.append(_block_qparams_launch(x, scale, glob, scheme, target))
        launches.append(_segments_launch(
            x, codes, scale, zero, scheme, target, compute=False,
            group_size=scheme.group_cols(cols), num_groups=scale.shape[1],
            scale_strides=scale.stride(), zero_strides=(0, 0), max_block_cols=max_block_cols,
            global_scale=glob, block_rows=scheme.block_rows,
        ))
    else:
        launches.append(_segments_launch(
            x, codes, scale, zero, scheme, target, compute=True,
            group_size=scheme.group_cols(cols), num_groups=scale.shape[1],
            scale_strides=scale.stride(), zero_strides=(0, 0) if zero is None else zero.stride(),
            max_block_cols=max_block_cols, global_scale=glob,
        ))
    return codes, scale, zero, launches


def _tensor_launches(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, glob: torch.Tensor | None,
    scheme: QuantScheme, target: Target, max_block_cols: int | None, global_only: bool = False,
) -> list[Launch]:
    """Partial (lo, hi) per tile of ``x``, then one program reducing them to the per-tensor
    scale (and zero), or with ``global_only`` to the fp32 per-tensor scale of e4m3 scales."""
    rows, cols = x.shape
    tile = _GPU_TILE if target.gpu else _INTERPRET_TILE
    max_n = max_block_cols or (_GPU_PARTIALS_BLOCK_N if target.gpu else tile)
    block_n = min(triton.next_power_of_2(cols), max_n)
    block_m = max(1, min(tile // block_n, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    parts = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=x.device)
    partials = Launch(
        _minmax_partials_kernel, grid,
        (x, parts, rows, cols, x.stride(0), x.stride(1)),
        dict(BLOCK_M=block_m, BLOCK_N=block_n),
        num_warps=8 if target.gpu else 4,
    )
    consts = scheme_constexprs(scheme)
    keys = ("HAS_ZERO", "UNSIGNED", "QMIN", "QMAX", "ABSMAX_CODE", "MAX_VALUE")
    qparams = Launch(
        _tensor_qparams_kernel, (1,),
        (parts, scale, scale if zero is None else zero, scale if glob is None else glob, parts.shape[0]),
        {k: consts[k] for k in keys} | scale_constexprs(scheme)
        | dict(GLOBAL_ONLY=global_only, BLOCK_P=_PARTIALS_BLOCK),
        num_warps=4,
    )
    return [partials, qparams]


def _block_qparams_launch(x: torch.Tensor, scale: torch.Tensor, glob: torch.Tensor | None,
                          scheme: QuantScheme, target: Target) -> Launch:
    """:func:`_block_qparams_kernel`: one program per 2-D block, tiles of at most ~8K values on
    a GPU (the interpreter takes a whole block at once)."""
    rows, cols = x.shape
    r, c = scheme.block_rows, scheme.group_cols(cols)
    block_c = triton.next_power_of_2(c)
    tile = _GPU_TILE if target.gpu else _INTERPRET_TILE
    block_r = max(1, min(triton.next_power_of_2(r), tile // block_c))
    consts = scheme_constexprs(scheme)
    args = (x, scale, scale if glob is None else glob, rows, cols, x.stride(0), x.stride(1),
            *scale.stride())
    constexprs = dict(ABSMAX_CODE=consts["ABSMAX_CODE"], MAX_VALUE=consts["MAX_VALUE"],
                      **scale_constexprs(scheme), R=r, C=c, BLOCK_R=block_r, BLOCK_C=block_c)
    return Launch(_block_qparams_kernel, tuple(scale.shape), args, constexprs,
                  num_warps=8 if target.gpu else 4)


def _rowwise_given_launch(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    scheme: QuantScheme, target: Target, scale_strides: tuple[int, int],
    zero_strides: tuple[int, int], max_block_cols: int | None,
    global_scale: torch.Tensor | None = None,
) -> Launch:
    """Quantize with one given scale per row (or tensor): rows split into independent chunks."""
    cols = x.shape[1]
    max_single = max_block_cols or (_GPU_MAX_SINGLE if target.gpu else _INTERPRET_MAX_SINGLE)
    if cols <= max_single:
        chunk = cols
    else:
        chunk = max_block_cols or (_GPU_LOOP_CHUNK if target.gpu else _INTERPRET_MAX_SINGLE)
    return _segments_launch(
        x, codes, scale, zero, scheme, target, compute=False,
        group_size=chunk, num_groups=triton.cdiv(cols, chunk),
        # segments are chunks of a row: the scale (and zero) of a chunk is that of its row
        scale_strides=(scale_strides[0], 0), zero_strides=(zero_strides[0], 0),
        max_block_cols=max_block_cols, global_scale=global_scale,
    )


def quantize_with_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    *,
    max_block_cols: int | None = None,
) -> torch.Tensor:
    """Codes of ``x (rows, cols)`` with given ``scale``/``zero`` (e.g. static activation scales).

    Bit-exact with :func:`quantkit.reference.quantize`: ``q = clamp(round(x / s) [+ z], qmin,
    qmax)`` or the float-grid codes of ``clamp(x / s, -max, max)``; values of any magnitude
    saturate (``x / s`` is clamped to ``+-2**22`` before rounding, which cannot change a code).

    Args:
        x: ``(rows, cols)`` float32/float16/bfloat16, any strides.
        scale: float32 (float16/bfloat16 widen exactly) of ``scheme.scale_shape(rows, cols)``;
            size-1 dims broadcast, e.g. a ``(1, 1)`` static scale for a per_token scheme.
            Positive and finite (not checked: that would synchronise the GPU).
        zero: integer tensor of the same rules when ``scheme.has_zero``, else ``None``.
        max_block_cols: see :func:`quantize`.

    Returns:
        ``codes (rows, cols)``: int8 for signed integer grids, else uint8.
    """
    scheme = check_scheme(scheme)
    x = check_matrix(x, "x", _X_DTYPES)
    max_block_cols = _check_block_cols(max_block_cols)
    rows, cols = x.shape
    scale, zero, _, _ = check_qparams(scale, zero, scheme, rows, cols, x.device)
    codes, launches = plan_quantize_with_qparams(
        x, scale, zero, scheme, Target.of(x.device), max_block_cols=max_block_cols
    )
    run_all(launches, x.device)
    return codes


def plan_quantize_with_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    target: Target,
    *,
    max_block_cols: int | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """The codes and launch of :func:`quantize_with_qparams` on ``target``: ``scale`` float32
    and ``zero`` int32 as :func:`check_qparams` returns them (size-1 dims broadcast)."""
    rows, cols = x.shape
    s_strides = broadcast_strides(scale)
    z_strides = (0, 0) if zero is None else broadcast_strides(zero)
    codes = torch.empty(rows, cols, dtype=codes_dtype(scheme), device=x.device)
    if scheme.granularity == "per_group":
        launch = _segments_launch(
            x, codes, scale, zero, scheme, target, compute=False,
            group_size=scheme.group_cols(cols), num_groups=scheme.num_groups(cols),
            scale_strides=s_strides, zero_strides=z_strides, max_block_cols=max_block_cols,
            block_rows=scheme.block_rows if scale.shape[0] > 1 else 1,
        )
    else:
        launch = _rowwise_given_launch(
            x, codes, scale, zero, scheme, target, s_strides, z_strides, max_block_cols
        )
    return codes, [launch]

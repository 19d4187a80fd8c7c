"""Weight-only dequant GEMM/GEMV (W4A16, W3A16, W2A16, W8A16, fp4/fp6/fp8 and MX/NVFP4 weights)
of ``QuantLinear``.

Math (the reference is :func:`quantkit.matmul_reference.quant_linear_matmul_reference`)::

    W[n, k] = (q[n, k] - z[n, g]) * s[n, g]      int grids (no zero point: q * s)
    W[n, k] = value(q[n, k]) * s[n, g]           float grids (fp4 e2m1, fp6 e2m3 / e3m2,
                                                 fp8 e4m3fn / e5m2)
    y = x @ W.to(x.dtype).T + bias               float32 accumulation, rounded once to x.dtype

with ``g = k // groupsize`` (per_group; the last group may be shorter) or ``g = 0``, and scale row
``n // block_rows`` (2-D blocks). ``s`` is decoded from the stored scale format in the kernel
(:func:`quantkit.kernels._triton_math.decode_scale`): float16/bfloat16/float32 values, e8m0 codes
``2**(E - 127)`` or e4m3 codes over the per-tensor fp32 ``global_scale`` (``value(E) / g``, one
``div_rn``, as :func:`quantkit.scales.decode_scales`).

Storage read as :class:`quantkit.quant_linear.QuantLinear` keeps it (layout of
:mod:`quantkit.packing`: each run of 8 codes is ``bits`` bytes, a little-endian word)::

    x        (M, K)                          float16 / bfloat16 / float32, any strides
    qweight  (N, ceil(K / 8) * bits)         uint8, row stride any, bytes contiguous
    scales   scheme.scale_shape(N, K)        float16 / bfloat16 / float32 (uint8 codes for e8m0 and
                                             e4m3 scales), size-1 dims broadcast
    global_scale (1, 1)                      float32, e4m3 scale formats only
    qzeros   (N|1, ceil(G / 8) * bits)       uint8 packed zero points of all G groups (has_zero)
    bias     (N,)                            any float dtype, optional
    out      (M, N)                          x.dtype

No divisibility constraints on M, N, K or the group size.

Three paths, chosen by :func:`plan_quant_linear_matmul` / :func:`quant_linear_matmul`:

* decode (``M <= 4``, word-aligned rows): the GEMV of :mod:`quantkit.kernels.gemv`;
* ``_dequant_matmul_kernel`` otherwise: ``(BLOCK_M, BLOCK_N)`` output tiles in grouped launch
  order for L2 reuse of weight tiles, the ``(BLOCK_N, BLOCK_K)`` weight tile dequantized in
  registers (:func:`dequant_tile`) then ``tl.dot`` in x's dtype (fp16/bf16 tensor cores; fp32
  x uses a 3xTF32 dot: fp32-accurate products from three tensor-core MMAs, where an IEEE fp32
  dot would run on CUDA cores and spill). When the output has too few tiles to give every SM
  two programs (``M = 16 .. 128`` on 4096-wide layers) K is split over programs that store fp32
  partial tiles, summed in split order by ``_split_k_reduce_kernel`` (a second launch; the same
  bits on every run, unlike atomics);
* from :data:`DEQUANT_GEMM_MIN_M` rows on a GPU: the weight dequantized once
  (``_dequant_packed_kernel``) and one cuBLAS GEMM.

Each K-tile loads ``BLOCK_K / 8`` runs of ``bits`` bytes per weight row (6 bits: half runs of 4
codes in 3 bytes), rebuilds each run's word with shifts and extracts the codes. Scales and
zeros: when no K-tile straddles two groups (``groupsize % BLOCK_K == 0``, or a single group per
row) one scale (and one zero, unpacked from ``qzeros`` in the kernel) per weight row and tile;
when a tile holds ``SUB_GROUPS`` whole groups (``BLOCK_K % groupsize == 0``: nvfp4's groups of 16
in a 32-wide tile) one per row and group, broadcast over the group; otherwise they are gathered
per element (the launcher picks ``BLOCK_K`` to avoid that where it can).

In the Triton interpreter bf16 arithmetic and bf16 ``tl.dot`` are wrong, so for bf16 inputs
on CPU the kernel dots in fp32 with the weight rounded to bf16 by integer bit arithmetic
(the same values the GPU's bf16 path multiplies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.kernels._triton_math import (
    SCALE_FMT_OF, bf16_bits, decode_scale, minifloat_decode, packed_code_at,
)
from quantkit.kernels.gemv import GemvConfig, plan_dequant_gemv, weight_constexprs
from quantkit.kernels.quantize import check_matrix, check_scheme
from quantkit.packing import PACK_BITS, packed_cols
from quantkit.scheme import QuantScheme

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CODED_SCALES = ("e8m0", "e4m3")  # stored as uint8 codes
DOT16_MAX_M = 16  # up to this many rows: one 16-row tensor-core tile (decode batches)
# From this many rows on a GPU the weight is dequantized once and multiplied by cuBLAS: the fused
# kernel dequantizes every weight tile once per 128-row M-tile (~11 SASS per weight element
# each time on sm90), so at M = 512 that is ~44 instructions per weight against ~3 plus a
# 2-byte store for one pass, while both GEMMs run on the same tensor cores.
DEQUANT_GEMM_MIN_M = 512


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and launch parameters of one matmul launch.

    Every tile is a ``tl.dot`` (``block_m``, ``block_n``, ``block_k >= 16``); ``split_k > 1``
    splits the K-tiles over programs whose fp32 partial tiles are summed in split order by a
    second kernel (deterministic: the same bits on every run).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "split_k", "group_m"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or (name.startswith("block") and v & (v - 1)):
                raise ValueError(
                    f"MatmulConfig.{name} must be a positive power of two, got {v!r}"
                )
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) < 16:
                raise ValueError(
                    f"MatmulConfig.{name} must be >= 16 (the smallest tl.dot tile), "
                    f"got {getattr(self, name)}"
                )


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets ``(BLOCK_M,), (BLOCK_N,)`` of this program's output tile, in
    grouped order: ``GROUP_M`` row-tiles share each weight column-tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def k_tile_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """``[first, last)`` K-tiles of split ``pid_k`` (contiguous, about equal shares; the last
    splits may get none)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * per_split
    return first, tl.minimum(first + per_split, k_tiles)


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, SPLIT_K: tl.constexpr,
               OUT_BF16: tl.constexpr):
    """Store an fp32 (or int32) ``(BLOCK_M, BLOCK_N)`` tile: into slab ``pid_k`` of a
    ``(SPLIT_K, M, N)`` partials workspace of its dtype when split over K (summed in split order
    by :func:`_split_k_reduce_kernel`: deterministic, unlike atomics), else rounded once to the
    output dtype (bf16 through its int16 bits)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K > 1:
        slab = tl.program_id(1).to(tl.int64) * M * N
        tl.store(o_ptrs + slab, acc, mask=mask)
    elif OUT_BF16:
        tl.store(o_ptrs, bf16_bits(acc).to(tl.int16), mask=mask)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    # pointers
    part_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # sizes
    M, N,
    # strides (the partials are a contiguous (SPLIT_K, M, N) workspace)
    stride_sxm, stride_swn, stride_om, stride_on,
    # meta
    SPLIT_K: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out = sum_s part[s]`` in split order (int32 partials sum exactly), then the epilogue:
    ``(acc * x_scale[m]) * w_scale[n]`` when ``SCALED``, ``+ bias[n]``, rounded once."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    p_ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.load(p_ptrs, mask=mask, other=0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptrs + s * M * N, mask=mask, other=0)
    if out_ptr.dtype.element_ty == tl.int32:  # the raw int8 accumulator: exact
        y = acc
    else:
        y = acc.to(tl.float32)
    if SCALED:
        sx = tl.load(x_scale_ptr + offs_m * stride_sxm, mask=m_ok, other=0.0).to(tl.float32)
        sw = tl.load(w_scale_ptr + offs_n * stride_swn, mask=n_ok, other=0.0).to(tl.float32)
        y = (y * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if OUT_BF16:
        tl.store(o_ptrs, bf16_bits(y).to(tl.int16), mask=mask)
    else:
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def plan_split_k_reduce(
    partials: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    target: Target,
    *,
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
) -> Launch:
    """The launch summing a ``(SPLIT_K, M, N)`` partials workspace into ``out (M, N)`` (with the
    int8/fp8 scale epilogue when ``x_scale``/``w_scale`` are given, broadcast along size-1 dims)."""
    split, M, N = partials.shape
    scaled = x_scale is not None
    stride_sxm = 0 if not scaled or x_scale.shape[0] == 1 else x_scale.stride(0)
    stride_swn = 0 if not scaled or w_scale.shape[0] == 1 else w_scale.stride(0)
    block_m = min(16, triton.next_power_of_2(M))
    # 16 x 64 outputs over 128 threads: 8 per thread and partial, all SPLIT_K loads in flight
    block_n = 64 if target.gpu else min(256, triton.next_power_of_2(N))
    args = (
        partials, x_scale if scaled else partials, w_scale if scaled else partials,
        partials if bias is None else bias,
        out.view(torch.int16) if out.dtype == torch.bfloat16 else out,
        M, N, stride_sxm, stride_swn, out.stride(0), out.stride(1),
    )
    constexprs = dict(SPLIT_K=split, SCALED=scaled, HAS_BIAS=bias is not None,
                      OUT_BF16=out.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    return Launch(_split_k_reduce_kernel, grid, args, constexprs, 4, 1, dict(weights_per_iter=None))


@triton.jit
def load_code_tile(q_rows, n_ok, k0, K, BITS: tl.constexpr, BYTES_P2: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw ``(BLOCK_N, BLOCK_K)`` int32 codes of columns ``k0 .. k0 + BLOCK_K`` (``k0 % 8 == 0``)
    of the packed rows ``q_rows`` (zero past ``K``). Runs of ``CPR`` codes in ``BPR`` bytes: 8 in
    ``BITS``, or for 6 bits half runs of 4 codes in 3 bytes (every word fits 24 bits)."""
    if BITS == 8:  # one byte per code
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_ok[:, None] & (offs_k < K)[None, :]
        return tl.load(q_rows[:, None] + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    CPR: tl.constexpr = 4 if BITS == 6 else 8
    BPR: tl.constexpr = 3 if BITS == 6 else BITS
    offs_r = k0 // CPR + tl.arange(0, BLOCK_K // CPR)  # (R,) runs of CPR codes
    offs_b = tl.arange(0, BYTES_P2)  # byte within a run (BYTES_P2 >= BPR)
    run_ok = offs_r < tl.cdiv(K, CPR)
    b_ptrs = q_rows[:, None, None] + (offs_r[:, None] * BPR + offs_b[None, :])[None, :, :]
    b_mask = n_ok[:, None, None] & (run_ok[:, None] & (offs_b < BPR)[None, :])[None, :, :]
    byte = tl.load(b_ptrs, mask=b_mask, other=0).to(tl.int32)  # (BLOCK_N, R, BYTES_P2)
    word = tl.sum(byte << (offs_b * 8)[None, None, :], axis=2)  # (BLOCK_N, R), <= 24 bits
    offs_j = tl.arange(0, CPR)
    c = (word[:, :, None] >> (offs_j * BITS)[None, None, :]) & ((1 << BITS) - 1)  # (N, R, CPR)
    return tl.reshape(c, (BLOCK_N, BLOCK_K))


@triton.jit
def magic_float(v, HALF: tl.constexpr):
    """``2**23 + v`` in fp32 (``2**10 + v`` in fp16 if ``HALF``) for ints ``0 <= v < 2**10``:
    ``v`` or-ed into the mantissa, no slow-pipe I2F. The difference of two such values is
    ``v1 - v2`` exactly."""
    if HALF:
        f = (v | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        f = (v | 0x4B000000).to(tl.float32, bitcast=True)
    return f


@triton.jit
def dequant_tile(q_rows, s_rows, z_rows, n_ok, k0, K, group_size, stride_sg, g,
                 BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr,
                 IS_FLOAT: tl.constexpr, EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr,
                 EXP_BIAS: tl.constexpr, TILE_GROUPS: tl.constexpr, SUB_GROUPS: tl.constexpr,
                 SCALE_FMT: tl.constexpr, BYTES_P2: tl.constexpr,
                 HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights ``(BLOCK_N, BLOCK_K)`` of columns ``k0 .. k0 + BLOCK_K`` of the packed rows
    ``q_rows``: ``(q - z) * s`` or ``value(q) * s`` as :func:`quantkit.reference.dequantize`.

    Integer codes: ``q - z = magic(c_u) - magic(z_u)`` exactly, where ``c_u = c + 2**(BITS-1)``
    for signed grids (a flip of the code's top bit) and likewise for ``z``. fp32, or fp16 when
    ``HALF`` (an integer grid with fp16 scales): ``q - z`` is exact in fp16 and the fp16 product
    of two fp16 values is the fp32 product rounded once, i.e. the reference's
    ``W.to(float16)``, at two weights per instruction.
    ``TILE_GROUPS``: no K-tile straddles two groups (one scale per weight row and tile);
    ``SUB_GROUPS > 1``: a tile holds that many whole groups (one scale per row and group,
    broadcast); otherwise scales (and zeros) are gathered per element. Scales are decoded from
    ``SCALE_FMT`` (e4m3 with the per-tensor ``g``).
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    k_ok = offs_k < K
    c = load_code_tile(q_rows, n_ok, k0, K, BITS, BYTES_P2, BLOCK_N, BLOCK_K)  # (N, K) int32
    CT: tl.constexpr = tl.float16 if HALF else tl.float32
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SIGNED else 0
    if TILE_GROUPS:  # one group per tile: a (BLOCK_N, 1) scale
        grp = k0 // group_size
        s = decode_scale(tl.load(s_rows + grp * stride_sg, mask=n_ok, other=1), g, SCALE_FMT)
        s = s.to(CT)[:, None]
        if HAS_ZERO:
            z = packed_code_at(z_rows, grp + tl.zeros_like(n_ok.to(tl.int32)), n_ok, BITS, SIGNED)
            z = z[:, None]
    elif SUB_GROUPS > 1:  # whole groups inside the tile: (BLOCK_N, SUB_GROUPS) broadcast
        GS: tl.constexpr = BLOCK_K // SUB_GROUPS
        grp = k0 // GS + tl.arange(0, SUB_GROUPS)  # (SUB_GROUPS,)
        smask = n_ok[:, None] & (grp * GS < K)[None, :]
        s = decode_scale(tl.load(s_rows[:, None] + grp[None, :] * stride_sg, mask=smask, other=1),
                         g, SCALE_FMT).to(CT)  # (BLOCK_N, SUB_GROUPS)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, SUB_GROUPS, GS)), (BLOCK_N, BLOCK_K))
        if HAS_ZERO:
            z = packed_code_at(z_rows[:, None], grp[None, :], smask, BITS, SIGNED)
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, SUB_GROUPS, GS)), (BLOCK_N, BLOCK_K))
    else:  # groups change inside the tile: gather per element
        grp = offs_k // group_size  # (BLOCK_K,)
        wmask = n_ok[:, None] & k_ok[None, :]
        s = tl.load(s_rows[:, None] + grp[None, :] * stride_sg, mask=wmask, other=1)
        s = decode_scale(s, g, SCALE_FMT).to(CT)  # (BLOCK_N, BLOCK_K)
        if HAS_ZERO:
            z = packed_code_at(z_rows[:, None], grp[None, :], wmask, BITS, SIGNED)
    if IS_FLOAT:
        q = minifloat_decode(c, EXP_BITS, MANT_BITS, EXP_BIAS)  # (BLOCK_N, BLOCK_K) fp32
    elif HAS_ZERO:
        q = magic_float(c ^ OFFSET, HALF) - magic_float(z + OFFSET, HALF)
    else:
        MAGIC: tl.constexpr = 1024.0 if HALF else 8388608.0
        q = magic_float(c ^ OFFSET, HALF) - (MAGIC + OFFSET)
    return q * s


@triton.jit
def _dequant_matmul_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, global_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, group_size, block_rows,
    # strides
    stride_xm, stride_xk, stride_qn, stride_sn, stride_sg, stride_zn, stride_om, stride_on,
    # quantization
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, IS_FLOAT: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, EXP_BIAS: tl.constexpr,
    TILE_GROUPS: tl.constexpr, SUB_GROUPS: tl.constexpr, SCALE_FMT: tl.constexpr,
    HALF: tl.constexpr,
    # meta
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, OUT_BF16: tl.constexpr, BYTES_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` output tile over this program's share of the K-tiles.

    ``DOT``: ``"fp16"`` / ``"bf16"`` (tensor cores in that dtype), ``"fp32"`` (3xTF32 dot),
    ``"bf16_emulated"`` (fp32 dot of bf16-rounded values: the interpreter's bf16 path).
    """
    offs_m, offs_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # (BLOCK_M,), (BLOCK_N,)
    pid_k = tl.program_id(1)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows64 = offs_n.to(tl.int64)  # N * row stride can exceed 2**31
    q_rows = qweight_ptr + rows64 * stride_qn  # (BLOCK_N,) first byte of each weight row
    s_rows = scales_ptr + (rows64 // block_rows) * stride_sn  # (BLOCK_N,) 0 stride: per_tensor
    z_rows = qzeros_ptr + rows64 * stride_zn
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm  # (BLOCK_M,)
    g = tl.load(global_ptr) if SCALE_FMT == 2 else 1.0  # e4m3 scales' per-tensor fp32 scale

    first, last = k_tile_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(first, last):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_ok = offs_k < K
        x = tl.load(x_rows[:, None] + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)

        w = dequant_tile(q_rows, s_rows, z_rows, n_ok, k0, K, group_size, stride_sg, g, BITS,
                         SIGNED, HAS_ZERO, IS_FLOAT, EXP_BITS, MANT_BITS, EXP_BIAS, TILE_GROUPS,
                         SUB_GROUPS, SCALE_FMT, BYTES_P2, HALF, BLOCK_N, BLOCK_K)  # (N, K) fp32

        if DOT == "fp16":
            w_op = w.to(tl.float16)
            x_op = x.to(tl.float16)
        elif DOT == "bf16":
            w_op = w.to(tl.bfloat16)
            x_op = x.to(tl.bfloat16)
        elif DOT == "bf16_emulated":  # bf16 rounding (ties to even) carried out in fp32
            w_op = (bf16_bits(w) << 16).to(tl.float32, bitcast=True)
            x_op = x.to(tl.float32)
        else:
            w_op = w
            x_op = x.to(tl.float32)
        if DOT == "fp16" or DOT == "bf16":
            acc = tl.dot(x_op, tl.trans(w_op), acc)
        else:
            acc = tl.dot(x_op, tl.trans(w_op), acc, input_precision="tf32x3")

    if HAS_BIAS and SPLIT_K == 1:  # split over K: the reduction adds the bias
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on, SPLIT_K, OUT_BF16)


@triton.jit
def _dequant_packed_kernel(
    # pointers
    qweight_ptr, scales_ptr, qzeros_ptr, global_ptr, out_ptr,
    # sizes
    N, K, group_size, block_rows,
    # strides
    stride_qn, stride_sn, stride_sg, stride_zn, stride_on,
    # quantization
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, IS_FLOAT: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, EXP_BIAS: tl.constexpr,
    TILE_GROUPS: tl.constexpr, SUB_GROUPS: tl.constexpr, SCALE_FMT: tl.constexpr,
    HALF: tl.constexpr,
    # meta
    OUT_BF16: tl.constexpr, BYTES_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[n, k] = W[n, k]`` rounded once to the output dtype, one ``(BLOCK_N, BLOCK_K)`` tile
    per program: the first step of the dequantize-then-cuBLAS path for large M."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = offs_n < N
    rows64 = offs_n.to(tl.int64)
    g = tl.load(global_ptr) if SCALE_FMT == 2 else 1.0  # e4m3 scales' per-tensor fp32 scale
    w = dequant_tile(qweight_ptr + rows64 * stride_qn, scales_ptr + (rows64 // block_rows) * stride_sn,
                     qzeros_ptr + rows64 * stride_zn, n_ok, k0, K, group_size, stride_sg, g, BITS,
                     SIGNED, HAS_ZERO, IS_FLOAT, EXP_BITS, MANT_BITS, EXP_BIAS, TILE_GROUPS,
                     SUB_GROUPS, SCALE_FMT, BYTES_P2, HALF, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_ok[:, None] & (offs_k < K)[None, :]
    o_ptrs = out_ptr + rows64[:, None] * stride_on + offs_k[None, :]
    if OUT_BF16:  # out_ptr is an int16 view of the bf16 output
        tl.store(o_ptrs, bf16_bits(w).to(tl.int16), mask=mask)
    else:
        tl.store(o_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_for(tiles: int, k_tiles: int, target: Target) -> int:
    """K-splits that give about two programs per SM when the output has too few tiles,
    keeping at least 4 K-tiles per program."""
    want = 2 * target.sm_count
    if tiles >= want:
        return 1
    return max(1, min(triton.cdiv(want, tiles), k_tiles // 4, 32))


def _fit_groups(block_k: int, group_size: int, K: int, min_block_k: int) -> int:
    """Lower ``block_k`` to a power-of-two divisor of the group size (one scale per weight row
    and K-tile) unless that would go below ``min_block_k``: then scales are gathered."""
    divisor = group_size & -group_size  # largest power of two dividing group_size
    if group_size < K and divisor >= min_block_k:
        return min(block_k, divisor)
    return block_k


def word_aligned(K: int, bits: int) -> bool:
    """Whether packed rows of ``K`` codes are whole 16-byte vectors of whole runs (int3 runs are
    3 bytes, int8 tiles decode byte-wise): otherwise the code tile is gathered byte by byte."""
    return bits in (2, 4) and (K * bits) % 128 == 0


def default_config(M: int, N: int, K: int, group_size: int, target: Target, *,
                   x_dtype: torch.dtype = torch.float16, bits: int = 4,
                   scale_format: str = "float16") -> MatmulConfig:
    """Tensor-core tiles for H100/H200 (and large single tiles for the interpreter).

    GPU: ``M <= 16`` a 16 x 64 x 128 tile (decode batches the GEMV does not take); larger ``M``
    64/128 x 128 x 64 (8 warps for 128 x 128), 3 pipeline stages; fp32 activations (a 3xTF32
    dot, three MMAs per step) halve ``BLOCK_K``; code rows that are not whole 16-byte vectors
    (int3, int8, K not a multiple of 32 codes: gathered byte by byte, see
    :func:`word_aligned`) and group sizes no power of two divides (scales gathered per element)
    take ``BLOCK_K = 32``, and narrower tiles where that alone still spills on sm90 (gathered
    scales with 64 rows; 6-bit codes with 128 rows; with fp32 activations half the columns in
    16-row tiles, with gathered codes or scales and where scales decode from e8m0/e4m3 bytes, a
    quarter with 6-bit codes). Otherwise ``BLOCK_K`` drops to the group size
    (>= 32) so that a K-tile has one scale per row, or holds whole groups of a block format's
    16/32. Small grids are split over K.
    """
    if not target.gpu:  # interpreter: few, large block operations
        block_m = max(16, min(64, triton.next_power_of_2(M)))
        block_n = max(16, min(128, triton.next_power_of_2(N)))
        block_k = _fit_groups(max(16, min(256, triton.next_power_of_2(K))), group_size, K, 16)
        return MatmulConfig(block_m, block_n, block_k, num_warps=4, num_stages=1)
    if M <= DOT16_MAX_M:
        block_m, block_n, block_k, warps = 16, 64, 128, 4
    else:
        block_m = 64 if M <= 64 else 128
        block_n, block_k, warps = 128, 64, 8 if block_m == 128 else 4
    aligned = word_aligned(K, bits)
    if x_dtype == torch.float32:
        block_k = max(32, block_k // 2)
    block_k = _fit_groups(block_k if aligned else 32, group_size, K, 32)
    # scales and zeros gathered per element (tiles holding whole groups of a block format's
    # 16/32 load one scale per group instead)
    gathered = group_size < K and group_size % block_k != 0 and block_k % group_size != 0
    if gathered:
        block_k = 32
    if gathered and block_m == 64:  # the gathered / byte-wise tiles take the registers
        block_n = 64
    if bits == 6 and block_m == 128:  # 4 codes in 3 bytes: the widest decode of all
        block_n = 64
    # fp32 activations (three MMAs per step) take half the columns in 16-row tiles and with
    # gathered codes or scales or scales that decode from e8m0/e4m3 bytes; 6-bit codes a quarter
    if x_dtype == torch.float32 and (block_m == 16 or gathered or not aligned or scale_format != "float16"):
        block_n //= 2
    if x_dtype == torch.float32 and bits == 6:
        block_n //= 2
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = split_k_for(tiles, triton.cdiv(K, block_k), target)
    return MatmulConfig(block_m, block_n, block_k, split, num_warps=warps, num_stages=3)


def scale_block_rows(scheme: QuantScheme, scales: torch.Tensor) -> int:
    """Weight rows per scale row: ``block_rows`` of 2-D blocks (1 when the scales broadcast)."""
    return scheme.block_rows if scales.shape[0] > 1 else 1


def group_constexprs(group_size: int, K: int, block_k: int) -> dict:
    """``TILE_GROUPS`` (one group per K-tile) and ``SUB_GROUPS`` (whole groups per K-tile) of
    :func:`dequant_tile` for tiles of ``block_k`` columns."""
    tile = group_size % block_k == 0 or group_size >= K
    sub = block_k // group_size if not tile and block_k % group_size == 0 else 1
    return dict(TILE_GROUPS=tile, SUB_GROUPS=sub)


def check_scales(scales: object, scheme: QuantScheme, expected: tuple[int, int],
                 global_scale: object, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``scales`` in the scheme's scale format (float values, or uint8 codes of e8m0/e4m3) and
    the ``(1, 1)`` float32 ``global_scale`` exactly when the format is e4m3."""
    coded = scheme.scale_format in _CODED_SCALES
    scales, _ = check_broadcast(scales, "scales", expected, (torch.uint8,) if coded else _SCALE_DTYPES,
                                device)
    if not scheme.has_global_scale:
        if global_scale is not None:
            raise ValueError(f"global_scale must be None: {scheme.describe()} has {scheme.scale_format} scales")
        return scales, None
    if not isinstance(global_scale, torch.Tensor) or global_scale.numel() != 1 or (
            global_scale.dtype != torch.float32) or global_scale.device != device:
        raise ValueError(f"{scheme.describe()}: e4m3 scales need global_scale, a (1, 1) float32 tensor on "
                         f"{device}; got {global_scale!r}")
    return scales, global_scale.reshape(1, 1)


def half_weights(scheme: QuantScheme, scales: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`dequant_tile` may compute in fp16: an integer grid, fp16 scales and fp16
    weights wanted (then every fp16 step is exact or the reference's single rounding)."""
    return scheme.dtype.is_int and scales.dtype == torch.float16 and dtype == torch.float16


def dot_kind(dtype: torch.dtype, on_gpu: bool) -> str:
    """The ``DOT`` constexpr for activations of ``dtype``."""
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16" if on_gpu else "bf16_emulated"
    return "fp32"


def check_bias(bias: object, n: int, device: torch.device) -> torch.Tensor | None:
    """``bias`` must be None or a floating-point ``(n,)`` tensor on ``device``."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise TypeError(f"bias must be a floating-point tensor or None, got {got}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but x is on {device}")
    return bias.contiguous()


def check_broadcast(
    t: object, name: str, expected: tuple[int, int], dtypes: tuple[torch.dtype, ...],
    device: torch.device,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``t`` 2-D with each dim 1 or that of ``expected``; returns it and its strides (0 on
    size-1 dims, which broadcast)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or any(n not in (1, e) for n, e in zip(t.shape, expected)):
        raise ValueError(
            f"{name} must have shape {expected} (size-1 dims broadcast), got {tuple(t.shape)}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return t, tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def quant_linear_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    *,
    config: MatmulConfig | GemvConfig | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(qweight, scales, qzeros).T + bias`` in one fused kernel.

    See the module docstring for the math, shapes and dtypes; the reference is
    :func:`quantkit.matmul_reference.quant_linear_matmul_reference` (same values up to fp32
    summation order).

    Args:
        x: ``(M, K)`` float16 / bfloat16 / float32 on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        qweight: ``(N, ceil(K / 8) * bits)`` uint8 packed weight codes.
        scales: ``scheme.scale_shape(N, K)`` float16/bfloat16/float32, or uint8 codes for e8m0
            and e4m3 scale formats (size-1 dims broadcast).
        qzeros: ``(N|1, ceil(G / 8) * bits)`` uint8 when ``scheme.has_zero``, else None.
        bias: ``(N,)`` float tensor or None.
        scheme: the weight's :class:`QuantScheme` (bits in 2/3/4/6/8, int or float grid).
        config: tiles to use instead of :func:`default_config` (tests, tuning).
        global_scale: ``(1, 1)`` float32, the per-tensor scale of e4m3 scale formats.

    Returns:
        ``(M, N)`` tensor of ``x.dtype``.
    """
    scheme = check_scheme(scheme)
    if scheme.bits not in PACK_BITS:
        raise ValueError(f"{scheme.describe()}: packed weights need bits in {PACK_BITS}")
    x = check_matrix(x, "x", X_DTYPES)
    qweight = check_matrix(qweight, "qweight", (torch.uint8,))
    M, K = x.shape
    N = qweight.shape[0]
    bits = scheme.bits
    if qweight.shape[1] != packed_cols(K, bits) or qweight.stride(1) != 1:
        raise ValueError(
            f"qweight must be (N, {packed_cols(K, bits)}) uint8 with contiguous rows for K={K} "
            f"(x.shape[1]) at {bits} bits, got {tuple(qweight.shape)} strides {qweight.stride()}"
        )
    expected = scheme.scale_shape(N, K)  # validates groupsize against K
    scales, global_scale = check_scales(scales, scheme, expected, global_scale, x.device)
    signed = scheme.dtype.is_int and not scheme.unsigned
    if scheme.has_zero:
        if qzeros is None:
            raise ValueError(f"qzeros is required: {scheme.describe()} has a zero point")
        zbytes = packed_cols(expected[1], bits)  # every group's zero point, never broadcast
        qzeros, _ = check_broadcast(
            qzeros, "qzeros", (expected[0], zbytes), (torch.uint8,), x.device
        )
        if qzeros.shape[1] != zbytes or qzeros.stride(1) != 1:
            raise ValueError(
                f"qzeros must have {zbytes} contiguous bytes per row (all {expected[1]} "
                f"groups), got {tuple(qzeros.shape)}"
            )
    elif qzeros is not None:
        raise ValueError(f"qzeros must be None: {scheme.describe()} has no zero point")
    bias = check_bias(bias, N, x.device)
    if config is not None and not isinstance(config, (MatmulConfig, GemvConfig)):
        raise TypeError(
            f"config must be a MatmulConfig, a GemvConfig or None, got {type(config).__name__}"
        )
    target = Target.of(x.device)
    if dequantizes_first(M, target, config):
        return dequant_then_gemm(x, qweight, scales, qzeros, bias, scheme, target, global_scale)
    out, launches = plan_quant_linear_matmul(
        x, qweight, scales, qzeros, bias, scheme, target, config=config, global_scale=global_scale,
    )
    run_all(launches, x.device)
    return out


def dequantizes_first(M: int, target: Target, config: object = None) -> bool:
    """Whether :func:`quant_linear_matmul` takes the dequantize-then-cuBLAS path (large M on a
    GPU, no explicit config)."""
    return config is None and target.gpu and M >= DEQUANT_GEMM_MIN_M


def dequant_then_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    target: Target,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The large-M path: the weight dequantized once into ``x.dtype``, then one dense GEMM
    (cuBLAS on a GPU), with the bias rounded to ``x.dtype`` and added in its epilogue."""
    w, launches = plan_dequantize_packed(qweight, scales, qzeros, scheme, x.shape[1], x.dtype,
                                         target, global_scale)
    run_all(launches, x.device)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def plan_dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    scheme: QuantScheme,
    K: int,
    out_dtype: torch.dtype,
    target: Target,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """The ``(N, K)`` weight buffer of ``out_dtype`` and the launch of
    :func:`_dequant_packed_kernel` that fills it (arguments validated by the caller)."""
    N = qweight.shape[0]
    group_size = scheme.group_cols(K)
    block_n, block_k = (32, 128) if target.gpu else (triton.next_power_of_2(min(N, 64)), 256)
    block_k = _fit_groups(block_k, group_size, K, 32)
    out = torch.empty(N, K, dtype=out_dtype, device=qweight.device)
    stride_sn, stride_sg = (0 if n == 1 else st for n, st in zip(scales.shape, scales.stride()))
    stride_zn = 0 if qzeros is None or qzeros.shape[0] == 1 else qzeros.stride(0)
    args = (
        qweight, scales, qweight if qzeros is None else qzeros,
        scales if global_scale is None else global_scale,
        out.view(torch.int16) if out_dtype == torch.bfloat16 else out,
        N, K, group_size, scale_block_rows(scheme, scales),
        qweight.stride(0), stride_sn, stride_sg, stride_zn, out.stride(0),
    )
    constexprs = weight_constexprs(scheme) | group_constexprs(group_size, K, block_k) | dict(
        SCALE_FMT=SCALE_FMT_OF[scheme.scale_format],
        HALF=half_weights(scheme, scales, out_dtype),
        OUT_BF16=out_dtype == torch.bfloat16, BYTES_P2=triton.next_power_of_2(scheme.bits),
        BLOCK_N=block_n, BLOCK_K=block_k,
    )
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    info = dict(weights_per_iter=None, weight_bits=scheme.bits)
    return out, [Launch(_dequant_packed_kernel, grid, args, constexprs, 4, 1, info)]


def plan_quant_linear_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    target: Target,
    *,
    config: MatmulConfig | GemvConfig | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """The output and launches of :func:`quant_linear_matmul` on ``target`` (arguments already
    validated; tensors may live on the ``meta`` device for the static inspection)."""
    if not isinstance(config, MatmulConfig):  # None or a GemvConfig: the decode GEMV if it applies
        gemv = plan_dequant_gemv(x, qweight, scales, qzeros, bias, scheme, target, config=config,
                                 global_scale=global_scale)
        if gemv is not None:
            return gemv
        if config is not None:
            raise ValueError(f"{config!r} given but the GEMV does not apply to these arguments")
    M, K = x.shape
    N = qweight.shape[0]
    group_size = scheme.group_cols(K)
    cfg = config or default_config(M, N, K, group_size, target, x_dtype=x.dtype,
                                   bits=scheme.bits, scale_format=scheme.scale_format)
    stride_sn, stride_sg = (0 if n == 1 else st for n, st in zip(scales.shape, scales.stride()))
    stride_zn = 0 if qzeros is None or qzeros.shape[0] == 1 else qzeros.stride(0)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # split over K: each split stores its fp32 partial tile, one more launch sums them in order
    dest = torch.empty(cfg.split_k, M, N, dtype=torch.float32, device=x.device) if (
        cfg.split_k > 1) else out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    args = (
        x, qweight, scales, qweight if qzeros is None else qzeros,
        scales if global_scale is None else global_scale,
        qweight if bias is None else bias,
        dest.view(torch.int16) if dest.dtype == torch.bfloat16 else dest,
        M, N, K, group_size, scale_block_rows(scheme, scales),
        x.stride(0), x.stride(1), qweight.stride(0), stride_sn, stride_sg, stride_zn,
        dest.stride(-2), dest.stride(-1),
    )
    constexprs = weight_constexprs(scheme) | group_constexprs(group_size, K, cfg.block_k) | dict(
        SCALE_FMT=SCALE_FMT_OF[scheme.scale_format],
        HALF=half_weights(scheme, scales, x.dtype),
        HAS_BIAS=bias is not None, DOT=dot_kind(x.dtype, target.gpu),
        OUT_BF16=dest.dtype == torch.bfloat16, BYTES_P2=triton.next_power_of_2(scheme.bits),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
    )
    info = dict(config=cfg, weights_per_iter=cfg.block_n * cfg.block_k, weight_bits=scheme.bits)
    launches = [Launch(_dequant_matmul_kernel, grid, args, constexprs, cfg.num_warps,
                       cfg.num_stages, info)]
    if cfg.split_k > 1:
        launches.append(plan_split_k_reduce(dest, out, bias, target))
    return out, launches

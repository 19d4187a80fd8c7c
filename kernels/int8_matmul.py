"""W8A8 int8 GEMM with per-token / per-channel scales (and the shared scaled-GEMM kernel).

Math (the reference is :func:`quantkit.matmul_reference.int8_matmul_reference`)::

    acc[m, n] = sum_k xq[m, k] * wq[n, k]                  int32, exact (tl.dot on int8)
    y[m, n]   = ((float(acc) * sx[m]) * sw[n]) + bias[n]    fp32 in this order, rounded once

Shapes and dtypes::

    xq       (M, K)          int8 activation codes, any strides
    x_scale  (M, 1) | (1, 1) float32 (fp16/bf16 widen exactly): per token or per tensor
    wq       (N, K)          int8 weight codes, any strides (rows K-contiguous is fastest)
    w_scale  (N, 1) | (1, 1) float32: per channel or per tensor
    bias     (N,)            any float dtype, optional
    out      (M, N)          float16 / bfloat16 / float32, or int32 = the raw accumulator

No divisibility constraints on M, N, K. The integer accumulator is exact, so the int32
output is bit-exact with the reference; in the Triton interpreter the fp32 epilogue is too
(on a GPU the last multiply-add may contract into an FMA: one rounding fewer).

:func:`_scaled_mm_kernel` is also the kernel of :mod:`quantkit.kernels.fp8_matmul`
(``ACC_INT=False``: fp8 operands, fp32 accumulator promoted every 128 K; see there). Tiles:
``(BLOCK_M, BLOCK_N)`` outputs in grouped order, ``BLOCK_K = 128`` bytes of K per step (a full
128-byte line of each operand row); for int8, decode-sized M uses 16-row tiles and splits K
over programs, each storing its raw int32 accumulator tile; a second launch sums them in split
order (exact) and applies the scales and bias once, so split-K results are bit-identical to the
unsplit ones and the same on every run. Configs must suit the 8-bit tensor cores (:func:`check_scaled_mm_config`):
``block_m >= 16`` and ``block_k >= 32`` (an 8-bit MMA consumes 32 bytes of K; sm90 rejects
smaller 8-bit dots), and the interpreter's default tiles obey the same rules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.matmul import (
    MatmulConfig,
    check_bias,
    check_broadcast,
    k_tile_range,
    output_tile,
    plan_split_k_reduce,
    split_k_for,
    store_tile,
)
from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.kernels.quantize import broadcast_strides, check_matrix
from quantkit.matmul_reference import FP8_PROMOTE_K

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCK_K = 32  # an 8-bit MMA (mma.sync m16n8k32, wgmma k32) consumes 32 bytes of K
FP8_MIN_BLOCK_M = 64  # one warpgroup's wgmma; Triton runs smaller fp8 tiles as fp16 mma.sync
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _scaled_mm_kernel(
    # pointers
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_sam, stride_sbn, stride_om, stride_on,
    # meta
    ACC_INT: tl.constexpr, CODES_U8: tl.constexpr, PROMOTE_K: tl.constexpr,
    RAW_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = (a @ b.T) * sa * sb.T + bias`` for one output tile and this program's K-tiles.

    ``ACC_INT``: int8 operands, int32 accumulator (else e4m3fn operands, fp32 accumulator).
    ``CODES_U8``: the e4m3fn operands arrive as their uint8 bit patterns (the interpreter,
    which cannot load fp8 with a zero fill) and are bitcast in registers.
    ``PROMOTE_K``: fp8 only, the K-span a tensor-core partial sum covers before it is added to
    the fp32 accumulator (``max_num_imprecise_acc``; a divisor of ``BLOCK_K``).
    ``RAW_ACC``: store the accumulator itself (no scales, no bias).
    """
    offs_m, offs_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # (BLOCK_M,), (BLOCK_N,)
    pid_k = tl.program_id(1)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64) * stride_am  # (BLOCK_M,)
    b_rows = b_ptr + offs_n.to(tl.int64) * stride_bn  # (BLOCK_N,)

    first, last = k_tile_range(pid_k, K, BLOCK_K, SPLIT_K)
    if ACC_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(first, last):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_ok = offs_k < K
        a_ptrs = a_rows[:, None] + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        b_ptrs = b_rows[:, None] + offs_k[None, :] * stride_bk  # (BLOCK_N, BLOCK_K)
        a_mask = m_ok[:, None] & k_ok[None, :]
        b_mask = n_ok[:, None] & k_ok[None, :]
        if ACC_INT:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
            b = tl.load(b_ptrs, mask=b_mask, other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            if CODES_U8:
                a = tl.load(a_ptrs, mask=a_mask, other=0).to(tl.float8e4nv, bitcast=True)
                b = tl.load(b_ptrs, mask=b_mask, other=0).to(tl.float8e4nv, bitcast=True)
            else:  # fp8 straight from memory into the tensor cores' shared-memory operands
                a = tl.load(a_ptrs, mask=a_mask, other=0.0)
                b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=PROMOTE_K)

    if RAW_ACC or SPLIT_K > 1:  # split over K: the reduction applies scales and bias
        y = acc
    else:
        sa = tl.load(sa_ptr + offs_m.to(tl.int64) * stride_sam, mask=m_ok, other=1.0)
        sb = tl.load(sb_ptr + offs_n.to(tl.int64) * stride_sbn, mask=n_ok, other=1.0)
        y = acc.to(tl.float32) * sa.to(tl.float32)[:, None]  # (BLOCK_M, BLOCK_N)
        y = y * sb.to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, stride_on, SPLIT_K, OUT_BF16)


def scaled_mm_config(
    M: int, N: int, K: int, target: Target, code_dtype: torch.dtype = torch.int8
) -> MatmulConfig:
    """Fixed tiles for 1-byte operands on H100/H200 (large single tiles in the interpreter).

    int8: 16/64/128-row tiles by ``M``, ``BLOCK_K = 128``, split-K where the output has too few
    tiles. Rows whose length is not a multiple of 16 bytes are read byte by byte, which costs
    registers: those take ``BLOCK_K = 32`` (at 128 they spill 0.1-4 KB on sm90). fp8: see
    :func:`fp8_mm_config` (tiles that never change a row's summation).
    """
    if code_dtype == torch.float8_e4m3fn:
        return fp8_mm_config(M, N, target)
    if not target.gpu:
        bm = max(16, min(64, triton.next_power_of_2(M)))
        bn = max(16, min(128, triton.next_power_of_2(N)))
        bk = max(MIN_BLOCK_K, min(256, triton.next_power_of_2(K)))
        return MatmulConfig(bm, bn, bk, num_warps=4, num_stages=1)
    if M <= 16:
        bm, bn, warps = 16, 64, 4
    elif M <= 64:
        bm, bn, warps = 64, 128, 4
    else:
        bm, bn, warps = 128, 128, 8
    bk = 128 if K % 16 == 0 else MIN_BLOCK_K
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = split_k_for(tiles, triton.cdiv(K, bk), target)
    return MatmulConfig(bm, bn, bk, split, num_warps=warps, num_stages=4 if bm <= 64 else 3)


def fp8_mm_config(M: int, N: int, target: Target) -> MatmulConfig:
    """fp8 tiles: the same wgmma, K-tiles, promotion and no K split for every ``M``.

    ``BLOCK_K`` is :data:`FP8_PROMOTE_K` everywhere (interpreter included, so that its
    per-tile ``tl.dot`` sums the same K-ranges as the GPU's tensor-core partial sums). Only the
    output tile follows the shape, which changes which outputs a program owns, never how one
    is summed: on the GPU the largest of 128x128, 128x64 (``M > 64`` only), 64x128, 64x64,
    64x32, 64x16 that gives every SM a program (without split-K, narrow column tiles are what
    fills the GPU for decode-sized ``M``), else 64x16.
    """
    bk = FP8_PROMOTE_K
    if not target.gpu:
        return MatmulConfig(FP8_MIN_BLOCK_M, max(16, min(128, triton.next_power_of_2(N))), bk,
                            num_warps=4, num_stages=1)
    tiles = [(64, 128), (64, 64), (64, 32), (64, 16)]
    if M > 64:
        tiles = [(128, 128), (128, 64)] + tiles
    for bm, bn in tiles:
        if triton.cdiv(M, bm) * triton.cdiv(N, bn) >= target.sm_count:
            break
    if bm == 128:  # two warpgroups, each a 64-row wgmma
        return MatmulConfig(bm, bn, bk, 1, num_warps=8, num_stages=3)
    return MatmulConfig(bm, bn, bk, 1, num_warps=4, num_stages=4)


def check_scaled_mm_config(config: object, code_dtype: torch.dtype) -> MatmulConfig:
    """``config`` must be a :class:`MatmulConfig` whose tiles the 8-bit tensor cores run.

    All 8-bit operands: ``block_m >= 16`` (``tl.dot``) and ``block_k >= 32`` (an 8-bit MMA
    consumes 32 bytes of K; sm90 rejects smaller dots). fp8 also: ``block_m >= 64`` (smaller
    tiles make Triton upcast to fp16 mma.sync, other numerics than the wgmma of larger M),
    ``block_k`` a multiple of :data:`FP8_PROMOTE_K` and ``split_k == 1`` (the summation
    order of :func:`quantkit.matmul_reference.fp8_matmul_reference`).
    """
    if not isinstance(config, MatmulConfig):
        raise TypeError(f"config must be a MatmulConfig or None, got {type(config).__name__}")
    if config.block_m < 16:
        raise ValueError(
            f"config.block_m must be >= 16 (tl.dot tiles; 16, 32, 64, ...), got {config.block_m}"
        )
    if config.block_k < MIN_BLOCK_K:
        raise ValueError(
            f"config.block_k must be >= {MIN_BLOCK_K} for 8-bit operands (sm90 8-bit dots take "
            f"K in steps of 32; allowed 32, 64, 128, ...), got {config.block_k}"
        )
    if code_dtype != torch.float8_e4m3fn:
        return config
    if config.block_m < FP8_MIN_BLOCK_M:
        raise ValueError(
            f"config.block_m must be >= {FP8_MIN_BLOCK_M} for fp8 (64, 128, ...: smaller tiles "
            f"run another instruction, with other numerics), got {config.block_m}"
        )
    if config.block_k % FP8_PROMOTE_K:
        raise ValueError(
            f"config.block_k must be a multiple of {FP8_PROMOTE_K} for fp8 (the fp32 promotion "
            f"interval; allowed 128, 256, 512, ...), got {config.block_k}"
        )
    if config.split_k != 1:
        raise ValueError(
            f"config.split_k must be 1 for fp8 (a K split changes the summation order), "
            f"got {config.split_k}"
        )
    return config


def scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    code_dtype: torch.dtype,
    out_dtypes: tuple[torch.dtype, ...],
    config: MatmulConfig | None,
) -> torch.Tensor:
    """Validate and launch :func:`_scaled_mm_kernel` for ``code_dtype`` (int8 or fp8) operands."""
    xq = check_matrix(xq, "xq", (code_dtype,))
    wq = check_matrix(wq, "wq", (code_dtype,))
    M, K = xq.shape
    N = wq.shape[0]
    if wq.shape[1] != K:
        raise ValueError(
            f"wq must be (N, K={K}) to match xq {tuple(xq.shape)}, got {tuple(wq.shape)}"
        )
    if wq.device != xq.device:
        raise ValueError(f"wq is on {wq.device} but xq is on {xq.device}")
    if out_dtype not in out_dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in out_dtypes)
        raise ValueError(f"out_dtype must be one of {names}, got {out_dtype}")
    x_scale, _ = check_broadcast(x_scale, "x_scale", (M, 1), _SCALE_DTYPES, xq.device)
    w_scale, _ = check_broadcast(w_scale, "w_scale", (N, 1), _SCALE_DTYPES, xq.device)
    bias = check_bias(bias, N, xq.device)
    if config is not None:
        check_scaled_mm_config(config, code_dtype)
    out, launches = plan_scaled_mm(
        xq, x_scale, wq, w_scale, bias, out_dtype, Target.of(xq.device), config=config
    )
    run_all(launches, xq.device)
    return out


def plan_scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    target: Target,
    *,
    config: MatmulConfig | None = None,
) -> tuple[torch.Tensor, list[Launch]]:
    """The output buffer and launches of :func:`scaled_mm` on ``target`` (arguments validated:
    int8 or float8_e4m3fn codes; tensors may live on the ``meta`` device).

    The buffer is the int32/fp32 workspace when the launch splits K (the caller casts).
    """
    M, K = xq.shape
    N = wq.shape[0]
    raw = out_dtype == torch.int32
    stride_sam = broadcast_strides(x_scale)[0]
    stride_sbn = broadcast_strides(w_scale)[0]
    cfg = config or scaled_mm_config(M, N, K, target, xq.dtype)
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    # split over K: each split stores its raw accumulator tile (int32: exact), one more launch
    # sums them in split order and applies the scales and bias once
    acc_dtype = torch.int32 if xq.dtype == torch.int8 else torch.float32
    dest = torch.empty(cfg.split_k, M, N, dtype=acc_dtype, device=xq.device) if (
        cfg.split_k > 1) else out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    fp8 = xq.dtype == torch.float8_e4m3fn
    codes_u8 = fp8 and not target.gpu  # the interpreter loads fp8 codes as bytes
    args = (
        *(t.view(torch.uint8) if codes_u8 else t for t in (xq, wq)),
        x_scale, w_scale, x_scale if bias is None else bias,
        dest.view(torch.int16) if dest.dtype == torch.bfloat16 else dest,
        M, N, K,
        xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), stride_sam, stride_sbn,
        dest.stride(-2), dest.stride(-1),
    )
    constexprs = dict(
        ACC_INT=not fp8, CODES_U8=codes_u8, PROMOTE_K=FP8_PROMOTE_K if fp8 else 0,
        RAW_ACC=raw, HAS_BIAS=bias is not None,
        OUT_BF16=dest.dtype == torch.bfloat16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
    )
    info = dict(config=cfg, weights_per_iter=cfg.block_n * cfg.block_k, weight_bits=8)
    launches = [Launch(_scaled_mm_kernel, grid, args, constexprs, cfg.num_warps,
                       cfg.num_stages, info)]
    if cfg.split_k > 1:
        launches.append(plan_split_k_reduce(
            dest, out, None if raw else bias, target,
            **({} if raw else dict(x_scale=x_scale, w_scale=w_scale)),
        ))
    return out, launches


def int8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``y = (xq @ wq.T) * x_scale * w_scale.T + bias`` with an exact int32 accumulator.

    Args:
        xq: ``(M, K)`` int8 on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        x_scale: ``(M, 1)`` (per token) or ``(1, 1)`` (per tensor) float32.
        wq: ``(N, K)`` int8; ``w_scale``: ``(N, 1)`` (per channel) or ``(1, 1)`` float32.
        bias: ``(N,)`` float tensor or None.
        out_dtype: float16 / bfloat16 / float32, or int32 for the raw accumulator (scales and
            bias ignored).
        config: tiles instead of :func:`scaled_mm_config` (``block_m >= 16``,
            ``block_k >= 32``).

    Returns:
        ``(M, N)`` of ``out_dtype``; see the module docstring for exactness.
    """
    return scaled_mm(
        xq, x_scale, wq, w_scale, bias, out_dtype, code_dtype=torch.int8,
        out_dtypes=OUT_DTYPES + (torch.int32,), config=config,
    )

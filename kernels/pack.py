"""Triton kernels that pack 2/3/4/6/8-bit codes into dense bytes and unpack them.

Layout (identical to the reference :mod:`quantkit.packing`, bit for bit): along the last
dimension every run of 8 codes becomes ``bits`` bytes. Code ``j`` of a run occupies bits
``[j*bits, (j+1)*bits)`` of the run's little-endian ``8*bits``-bit word::

    word = sum_j (code_j & (2**bits - 1)) << (j * bits)        # j = 0..7
    byte_b = (word >> (8 * b)) & 0xFF                          # b = 0..bits-1

so int4 stores ``c0 | c1 << 4``, int2 ``c0 | c1 << 2 | c2 << 4 | c3 << 6``, int3 packs 8 codes
into 3 bytes and int8 is a copy. 6-bit codes (fp6) are handled as half runs of 4 codes in 3 bytes
(the same bytes: 24 bits end on a byte boundary), so every word fits in 32 bits. The last run of a row is zero-padded when ``cols % 8 != 0``;
unpacking needs ``cols`` to drop the padding. Signed codes are stored as their low ``bits``
two's-complement bits and sign-extended on unpack.

Shapes and dtypes::

    codes  (rows, cols)                      int8 (signed) or uint8
    packed (rows, ceil(cols / 8) * bits)     uint8

Constraints: ``bits`` in {2, 3, 4, 6, 8}; any ``rows``/``cols`` (no divisibility needed); codes
may be strided (any ``stride_cm``/``stride_cn``), outputs are contiguous. Codes outside the
``bits``-bit range are truncated to their low bits, as in the reference.

Each program handles a tile of ``BLOCK_M`` rows x ``BLOCK_R`` runs (``8 * BLOCK_R`` codes per
row), so every load and store touches contiguous bytes of a row: the kernels are memory bound
and move ``rows * cols * (1 + bits / 8)`` bytes. The 8-codes axis (and the ``bits``-bytes axis,
padded to a power of two for int3) is the innermost tensor dimension, which keeps each run
inside one thread: the word is assembled with thread-local shifts and adds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.packing import CODES_PER_RUN, PACK_BITS, packed_cols

# Tile sizes. On a GPU a tile of 8 rows x 128 runs (8 KiB of int8 codes) keeps loads and stores
# vectorised and gives thousands of programs for LLM-sized matrices; the Triton interpreter pays
# per block operation, so CPU tensors get one tile as large as the tensor (capped).
_GPU_TILE_RUNS = 1024  # BLOCK_M * BLOCK_R on a GPU
_GPU_MAX_BLOCK_R = 128
_INTERPRET_MAX_BLOCK_M = 256
_INTERPRET_MAX_BLOCK_R = 512


@triton.jit
def _pack_kernel(
    # pointers
    codes_ptr, packed_ptr,
    # sizes
    rows, cols, runs,
    # strides
    stride_cm, stride_cn, stride_pm,
    # quantization
    BITS: tl.constexpr,
    # meta
    CPR: tl.constexpr, BPR: tl.constexpr,
    BYTES_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Pack a ``(BLOCK_M, CPR * BLOCK_R)`` tile of codes into ``(BLOCK_M, BPR * BLOCK_R)`` bytes:
    runs of ``CPR`` codes in ``BPR`` bytes (8 in ``BITS``; 6 bits: half runs, 4 in 3)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    offs_j = tl.arange(0, CPR)  # code within a run
    offs_b = tl.arange(0, BYTES_P2)  # byte within a run (BYTES_P2 >= BPR)
    row_ok = offs_m < rows
    rows64 = offs_m.to(tl.int64)  # rows * stride can exceed 2**31

    offs_n = offs_r[:, None] * CPR + offs_j[None, :]  # (BLOCK_R, CPR) column of each code
    c_ptrs = codes_ptr + rows64[:, None, None] * stride_cm + offs_n[None, :, :] * stride_cn
    c_mask = row_ok[:, None, None] & (offs_n < cols)[None, :, :]
    # masked codes read as 0: that is the zero padding of the last run
    c = tl.load(c_ptrs, mask=c_mask, other=0).to(tl.int32)  # (BLOCK_M, BLOCK_R, 8)

    if BITS == 8:
        # a run of 8 bytes is its own packing: only reinterpret the sign
        packed = c & 0xFF  # (BLOCK_M, BLOCK_R, 8)
    else:
        c = c & ((1 << BITS) - 1)  # two's-complement low bits
        # the fields are disjoint, so the sum is their bitwise or; CPR * BITS <= 24 bits
        word = tl.sum(c << (offs_j * BITS)[None, None, :], axis=2)  # (BLOCK_M, BLOCK_R) int32
        packed = (word[:, :, None] >> (offs_b * 8)[None, None, :]) & 0xFF  # (M, R, BYTES_P2)

    offs_p = offs_r[:, None] * BPR + offs_b[None, :]  # (BLOCK_R, BYTES_P2) byte column
    p_ptrs = packed_ptr + rows64[:, None, None] * stride_pm + offs_p[None, :, :]
    p_mask = row_ok[:, None, None] & ((offs_r < runs)[:, None] & (offs_b < BPR)[None, :])[None]
    tl.store(p_ptrs, packed.to(tl.uint8), mask=p_mask)


@triton.jit
def _unpack_kernel(
    # pointers
    packed_ptr, codes_ptr,
    # sizes
    rows, cols, runs,
    # strides
    stride_pm, stride_pn, stride_cm,
    # quantization
    BITS: tl.constexpr, SIGNED: tl.constexpr,
    # meta
    CPR: tl.constexpr, BPR: tl.constexpr,
    BYTES_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Unpack a ``(BLOCK_M, BPR * BLOCK_R)`` byte tile into ``(BLOCK_M, CPR * BLOCK_R)`` codes."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    offs_j = tl.arange(0, CPR)  # code within a run
    offs_b = tl.arange(0, BYTES_P2)  # byte within a run (BYTES_P2 >= BPR)
    row_ok = offs_m < rows
    rows64 = offs_m.to(tl.int64)

    offs_p = offs_r[:, None] * BPR + offs_b[None, :]  # (BLOCK_R, BYTES_P2) byte column
    p_ptrs = packed_ptr + rows64[:, None, None] * stride_pm + offs_p[None, :, :] * stride_pn
    p_mask = row_ok[:, None, None] & ((offs_r < runs)[:, None] & (offs_b < BPR)[None, :])[None]
    byte = tl.load(p_ptrs, mask=p_mask, other=0).to(tl.int32)  # (BLOCK_M, BLOCK_R, BYTES_P2)

    if BITS == 8:
        c = byte  # (BLOCK_M, BLOCK_R, 8), already one code per byte
        if SIGNED:
            c = tl.where(c >= 128, c - 256, c)
    else:
        word = tl.sum(byte << (offs_b * 8)[None, None, :], axis=2)  # (BLOCK_M, BLOCK_R) int32
        c = (word[:, :, None] >> (offs_j * BITS)[None, None, :]) & ((1 << BITS) - 1)  # (M, R, CPR)
        if SIGNED:
            # move the field's sign bit to bit 31, then shift back arithmetically
            c = (c << (32 - BITS)) >> (32 - BITS)

    offs_n = offs_r[:, None] * CPR + offs_j[None, :]  # (BLOCK_R, CPR) column of each code
    c_ptrs = codes_ptr + rows64[:, None, None] * stride_cm + offs_n[None, :, :]
    c_mask = row_ok[:, None, None] & (offs_n < cols)[None, :, :]
    tl.store(c_ptrs, c.to(codes_ptr.dtype.element_ty), mask=c_mask)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")
    return bits


def _check_device(t: torch.Tensor, name: str) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{name} is on {t.device}: the Triton pack kernels need a CUDA tensor, or "
            "TRITON_INTERPRET=1 set before quantkit.kernels is imported"
        )


def run_layout(bits: int, cols: int) -> tuple[int, int, int]:
    """``(codes per run, bytes per run, runs per row)`` the kernels use: runs of 8 codes in
    ``bits`` bytes, 6-bit codes in half runs of 4 codes in 3 bytes (every run of the stored
    layout is two of them, so the zero padding of the last run is written too)."""
    cpr, bpr = (4, 3) if bits == 6 else (CODES_PER_RUN, bits)
    return cpr, bpr, triton.cdiv(cols, CODES_PER_RUN) * (CODES_PER_RUN // cpr)


def _tile(rows: int, runs: int, on_gpu: bool, bits: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_R)`` for a ``(rows, runs)`` problem. 8-bit runs are 8 bytes each way (the
    widest tile): a quarter of the runs per program keeps them in registers (ptxas put the full
    tile in local memory for rows whose stride is not a multiple of 16)."""
    if on_gpu:
        block_r = min(triton.next_power_of_2(runs), _GPU_MAX_BLOCK_R)
        tile_runs = _GPU_TILE_RUNS // 4 if bits == 8 else _GPU_TILE_RUNS
        block_m = min(triton.next_power_of_2(rows), max(1, tile_runs // block_r))
        return block_m, block_r
    block_r = min(triton.next_power_of_2(runs), _INTERPRET_MAX_BLOCK_R)
    block_m = min(triton.next_power_of_2(rows), _INTERPRET_MAX_BLOCK_M)
    return block_m, block_r


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes (rows, cols)`` int8/uint8 into ``(rows, ceil(cols/8)*bits)`` uint8.

    Bit-exact with :func:`quantkit.packing.pack_codes` (see the module docstring for the
    layout). ``codes`` may be non-contiguous; the result is a new contiguous tensor on the
    same device.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2 or codes.dtype not in (torch.int8, torch.uint8):
        raise ValueError(
            f"codes must be a 2-D int8/uint8 tensor (rows, cols), got {codes.dtype} "
            f"{tuple(codes.shape)}"
        )
    _check_device(codes, "codes")
    packed, launches = plan_pack_codes(codes, bits, Target.of(codes.device))
    run_all(launches, codes.device)
    return packed


def plan_pack_codes(
    codes: torch.Tensor, bits: int, target: Target
) -> tuple[torch.Tensor, list[Launch]]:
    """The output and launches of :func:`pack_codes` on ``target`` (arguments validated;
    tensors may live on the ``meta`` device). An empty output needs no launch."""
    rows, cols = codes.shape
    cpr, bpr, runs = run_layout(bits, cols)
    packed = torch.empty(rows, packed_cols(cols, bits), dtype=torch.uint8, device=codes.device)
    if packed.numel() == 0:
        return packed, []
    block_m, block_r = _tile(rows, runs, target.gpu, bits)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(runs, block_r))
    args = (codes, packed, rows, cols, runs, codes.stride(0), codes.stride(1), packed.stride(0))
    constexprs = dict(
        BITS=bits, CPR=cpr, BPR=bpr, BYTES_P2=triton.next_power_of_2(bpr), BLOCK_M=block_m,
        BLOCK_R=block_r,
    )
    return packed, [Launch(_pack_kernel, grid, args, constexprs, num_warps=4)]


def unpack_codes(packed: torch.Tensor, bits: int, cols: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(rows, cols)`` int8 if ``signed`` else uint8.

    Bit-exact with :func:`quantkit.packing.unpack_codes`. ``packed`` must be uint8 with
    exactly ``ceil(cols/8)*bits`` bytes per row; signed codes are sign-extended from ``bits``.
    """
    bits = _check_bits(bits)
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 0:
        raise ValueError(f"cols must be a non-negative int, got {cols!r}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    nbytes = packed_cols(cols, bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[1] != nbytes:
        raise ValueError(
            f"packed must be a 2-D uint8 tensor with {nbytes} bytes per row "
            f"for cols={cols}, bits={bits}; got {packed.dtype} {tuple(packed.shape)}"
        )
    _check_device(packed, "packed")
    codes, launches = plan_unpack_codes(packed, bits, cols, signed, Target.of(packed.device))
    run_all(launches, packed.device)
    return codes


def plan_unpack_codes(
    packed: torch.Tensor, bits: int, cols: int, signed: bool, target: Target
) -> tuple[torch.Tensor, list[Launch]]:
    """The output and launches of :func:`unpack_codes` on ``target`` (arguments validated)."""
    rows = packed.shape[0]
    cpr, bpr, runs = run_layout(bits, cols)
    codes = torch.empty(
        rows, cols, dtype=torch.int8 if signed else torch.uint8, device=packed.device
    )
    if codes.numel() == 0:
        return codes, []
    block_m, block_r = _tile(rows, runs, target.gpu, bits)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(runs, block_r))
    args = (packed, codes, rows, cols, runs, packed.stride(0), packed.stride(1), codes.stride(0))
    constexprs = dict(
        BITS=bits, SIGNED=signed, CPR=cpr, BPR=bpr,
        BYTES_P2=triton.next_power_of_2(bpr), BLOCK_M=block_m, BLOCK_R=block_r,
    )
    return codes, [Launch(_unpack_kernel, grid, args, constexprs, num_warps=4)]

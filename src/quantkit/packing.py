"""Pure-torch reference for packing 2/3/4/6/8-bit codes into dense bytes.

Layout (one rule for every bit width): along the last dimension, each run of 8 codes
becomes ``bits`` bytes. Code ``j`` of a run occupies bits ``[j*bits, (j+1)*bits)`` of the
run's little-endian ``8*bits``-bit word. So int4 stores ``byte = c0 | c1 << 4``, int2
``c0 | c1 << 2 | c2 << 4 | c3 << 6``, int3 packs 8 codes into 3 bytes, 6-bit codes (fp6) 8 into
6 bytes (each half run of 4 codes fills 3 bytes), int8 is a copy. A row is therefore one
little-endian bit stream with code ``k`` at bit ``k * bits``.
A last run shorter than 8 codes is zero-padded; :func:`unpack_codes` needs ``cols`` to
drop the padding. Signed codes are stored as their low ``bits`` two's-complement bits and
sign-extended on unpack.

Shapes: ``codes (rows, cols)`` int8/uint8  <->  ``packed (rows, ceil(cols / 8) * bits)`` uint8.
"""

from __future__ import annotations

import math

import torch

PACK_BITS = (2, 3, 4, 6, 8)
CODES_PER_RUN = 8


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row of ``cols`` packed codes."""
    return math.ceil(cols / CODES_PER_RUN) * bits


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes (rows, cols)`` int8/uint8 into ``(rows, ceil(cols/8)*bits)`` uint8."""
    _check_bits(bits)
    if codes.dim() != 2 or codes.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"codes must be a 2-D int8/uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    rows, cols = codes.shape
    runs = math.ceil(cols / CODES_PER_RUN)
    c = codes.to(torch.int64) & ((1 << bits) - 1)  # two's complement low bits
    c = torch.nn.functional.pad(c, (0, runs * CODES_PER_RUN - cols)).reshape(rows, runs, CODES_PER_RUN)
    shifts = torch.arange(CODES_PER_RUN, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)  # (rows, runs) int64, 8*bits <= 64 bits used
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # (rows, runs, bits)
    return packed.reshape(rows, runs * bits).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(rows, cols)`` int8 if ``signed`` else uint8."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D (rows, bytes); got shape {tuple(packed.shape)}")
    if cols < 0:
        raise ValueError(f"cols={cols} must be >= 0")
    rows, nbytes = packed.shape
    if packed.dtype != torch.uint8 or nbytes != packed_cols(cols, bits):
        raise ValueError(
            f"packed must be uint8 with {packed_cols(cols, bits)} bytes per row for "
            f"cols={cols}, bits={bits}; got {packed.dtype} {tuple(packed.shape)}"
        )
    runs = nbytes // bits
    b = packed.to(torch.int64).reshape(rows, runs, bits)
    word = (b << (torch.arange(bits, device=packed.device) * 8)).sum(dim=-1)  # (rows, runs)
    shifts = torch.arange(CODES_PER_RUN, device=packed.device) * bits
    c = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, runs, 8)
    c = c.reshape(rows, runs * CODES_PER_RUN)[:, :cols]
    if signed:
        c = torch.where(c >= (1 << (bits - 1)), c - (1 << bits), c)
        return c.to(torch.int8)
    return c.to(torch.uint8)

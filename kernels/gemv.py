"""Decode GEMV on packed low-bit weights: ``y = x @ dequant(W).T + bias`` for ``M <= 4`` rows.

Math (the reference is :func:`quantkit.matmul_reference.quant_linear_matmul_reference`)::

    W[n, k] = (q[n, k] - z[n, g]) * s[n, g]      int grids (no zero point: q * s)
    W[n, k] = value(q[n, k]) * s[n, g]           float grids (fp4 e2m1, fp6 e2m3 / e3m2,
                                                 fp8 e4m3fn / e5m2)
    y[m, n] = sum_k x[m, k] * W[n, k] + bias[n]  fp32 accumulation, rounded once to x.dtype

Storage as :mod:`quantkit.packing` lays it out, read as 32-bit words: for 2/4/8 bits code ``j``
of a word occupies bits ``[j*bits, (j+1)*bits)`` (``32 / bits`` codes per word); for 3 and 6
bits a *unit* of three words holds 32 (16) codes, code ``j`` at bit ``bits*j`` of the 96-bit
little-endian value (int3 codes 10 and 21, fp6 codes 5 and 10 straddle two words). Scales are
read in their stored format (row ``n // block_rows`` for 2-D blocks): float values, e8m0 codes
(the power of two built from the exponent bits) or e4m3 codes, whose bits are placed into an
fp16 (like the float weight codes below); the per-tensor ``1 / g`` of e4m3 scales and the
``2**8`` of that placement are applied once per output, not per scale. Requirements (the planner checks them and otherwise
uses the tensor-core kernel of :mod:`quantkit.kernels.matmul`): every weight row starts on a
4-byte boundary, ``x`` is contiguous along K, and a group holds a whole number of words.

Why it is laid out this way (a decode step is a pure weight stream: at H200 bandwidth a 4-bit
weight leaves about 3.5 thread-instructions per element, so the loop must be lean):

* Lane ``t`` of the ``T = 32 * num_warps`` lanes of a program owns a *chunk* of
  ``CHUNK = 4 * 32 / bits`` consecutive codes per weight row (one 128-bit load; int3 and fp6:
  one 96-bit unit of 32 or 16 codes) and the same ``CHUNK`` activations. Lanes and warps both run along
  K, so a program's K-tile is ``T * CHUNK`` codes (4096 int4 codes with 4 warps) and it owns
  ``BLOCK_N`` whole rows. ``x`` is loaded as ``CHUNK / XV`` tiles of ``XV`` contiguous values
  (16 bytes) per lane, which is exactly the lane-to-K map of the weight words: no layout
  conversion, shared memory or barrier in the loop.
* The accumulator keeps the packed-word layout ``(BLOCK_M, BLOCK_N, T)`` and is reduced across
  lanes once, after the loop (no shuffles inside it).
* Integer codes become floats without a conversion instruction: the code's field is shifted
  to the top of an fp32 mantissa and or-ed with the bits of 1.0, giving ``f = 1 + c / 2**bits``
  exactly (a shift and a LOP3; signed codes get their sign bit flipped in the same LOP3, which
  adds ``2**(bits-1)``). Then ``sum_j x_j (c_j - z) = 2**bits * (sum_j x_j f_j) - (2**bits + z)
  * sum_j x_j``: one FFMA per weight, and the zero point and scale cost two FFMAs per chunk.
  Every product ``x * f`` is exact in fp32 (11 + bits + 1 significant bits).
* 2- and 4-bit codes go in pairs, so the shift is paid once per two codes: shifting the odd
  code of a pair to the top of the mantissa leaves its even neighbour in the ``bits`` bits
  below, read with a second mask as ``f_lo = 1 + c / 2**(2 bits)`` into a second partial sum,
  and ``x (1 + c / 2**bits) = 2**bits x f_lo - (2**bits - 1) x`` folds it back once per chunk.
  Its products stay exact (11 + 2 bits + 1 significant bits); the sum keeps ``bits`` fewer
  bits of the code's contribution, about 2**-20 relative for int4, far below an fp16 output's
  2**-11. (8-bit pairs would not be exact, and 3-bit codes straddle words.)
* At ``M = 1`` whole K-tiles are read without masks (a masked load clears its registers
  first): weight rows past ``N`` read the last row instead (never stored) and only the ragged
  last K-tile carries masks. (2- and 4-bit pairs and the unmasked tiles stay at ``M = 1``: with
  more rows their extra registers make ptxas spill, so those rows keep masked loads.)
* Float codes (fp4/fp8) are placed into fp16 bit positions (subnormals included, which fp16
  hardware converts exactly), widened to fp32 and scaled back by ``2**(15 - bias)``.
* Scales and zero points are loaded once per chunk (or once per word for groups shorter than a
  chunk), never per element. Weights are streamed with an evict-first cache policy.
* No split-K: the planner picks ``BLOCK_N`` so that the grid has programs for every SM, which
  keeps the result independent of the launch and bit-reproducible run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.kernels._launch import Launch, Target
from quantkit.kernels._triton_math import SCALE_FMT_OF, bf16_bits, decode_scale, packed_code_at
from quantkit.scheme import QuantScheme


@triton.jit
def split2(t):
    """The two halves of the last (size-2) dimension of ``t``."""
    return tl.split(t)


@triton.jit
def split4(t):
    """Elements ``0..3`` of the last (size-4) dimension of ``t``."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def split8(t):
    """Elements ``0..7`` of the last (size-8) dimension of ``t``."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + (4, 2)))
    t0, t2, t4, t6 = split4(even)
    t1, t3, t5, t7 = split4(odd)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def pick(w0, w1, w2, w3, I: tl.constexpr):
    """``(w0, w1, w2, w3)[I]`` for a constexpr ``I``."""
    if I == 0:
        return w0
    elif I == 1:
        return w1
    elif I == 2:
        return w2
    else:
        return w3


@triton.jit
def shift_to(w, FROM: tl.constexpr, TO: tl.constexpr):
    """``w`` (uint32) shifted so that bit ``FROM`` lands on bit ``TO`` (bits shifted out vanish)."""
    if TO >= FROM:
        return w << (TO - FROM)
    else:
        return w >> (FROM - TO)


@triton.jit
def field_at(w0, w1, w2, w3, J: tl.constexpr, BITS: tl.constexpr, TO: tl.constexpr):
    """Code ``J`` of a lane's chunk moved to bits ``[TO, TO + BITS)`` of a uint32 (other bits are
    garbage: mask them). Chunks are 4 words of ``32 / BITS`` codes, or one 3-word unit (3 and 6
    bits)."""
    if BITS == 3 or BITS == 6:
        LO: tl.constexpr = BITS * J
        Q: tl.constexpr = LO // 32
        OFF: tl.constexpr = LO % 32
        v = shift_to(pick(w0, w1, w2, w3, Q), OFF, TO)
        if OFF + BITS > 32:  # the high bits come from the next word
            v = v | (pick(w0, w1, w2, w3, Q + 1) << (32 - OFF + TO))
        return v
    else:
        CPW: tl.constexpr = 32 // BITS
        return shift_to(pick(w0, w1, w2, w3, J // CPW), (J % CPW) * BITS, TO)


@triton.jit
def int_code_value(v, field_mask, one_bits, SIGNED: tl.constexpr):
    """The fp32 whose bits are ``v``'s code field (``field_mask``) or-ed with ``one_bits``
    (signed codes: xor-ed, which also flips the code's sign bit); see :func:`code_value`."""
    if SIGNED:
        return ((v & field_mask) ^ one_bits).to(tl.float32, bitcast=True)
    return ((v & field_mask) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def code_value(w0, w1, w2, w3, field_mask, one_bits, J: tl.constexpr, BITS: tl.constexpr,
               SIGNED: tl.constexpr, IS_FLOAT: tl.constexpr, EXP_BITS: tl.constexpr,
               MANT_BITS: tl.constexpr):
    """fp32 ``(BLOCK_N, T)`` stand-in of code ``J`` of each lane's chunk.

    int grids: ``1 + c_u / 2**BITS`` with ``c_u`` the code (signed codes offset by
    ``2**(BITS - 1)``), built in the fp32 bits: the field moved to the top of the mantissa, masked
    with ``field_mask`` and or-ed (signed: xor-ed, which also flips the code's sign bit) with
    ``one_bits``. Both constants arrive as kernel arguments on purpose: a LOP3 has one immediate
    slot, and with two literals ptxas rematerialises the second into a register before most
    codes (measured ~0.55 SASS per weight); as arguments one stays in a register for the whole
    loop. Float grids: ``value(c) * 2**(BIAS - 15)`` from the code's fields placed into fp16 bits.
    """
    if IS_FLOAT:
        MAG: tl.constexpr = EXP_BITS + MANT_BITS  # the code is sign | exponent | mantissa
        LO: tl.constexpr = 10 - MANT_BITS  # fp16 mantissa bits end at bit 10
        mag = field_at(w0, w1, w2, w3, J, BITS, LO) & (((1 << MAG) - 1) << LO)
        sign = field_at(w0, w1, w2, w3, J, BITS, 15 - MAG) & 0x8000
        h = (mag | sign).to(tl.uint16).to(tl.float16, bitcast=True)
        return h.to(tl.float32)
    else:
        TOP: tl.constexpr = 23 - BITS  # the field fills the top BITS mantissa bits
        return int_code_value(field_at(w0, w1, w2, w3, J, BITS, TOP), field_mask, one_bits,
                              SIGNED)


@triton.jit
def x_at(x0, x1, x2, x3, x4, x5, x6, x7, V: tl.constexpr):
    """``(x0, ..., x7)[V]`` for a constexpr ``V``."""
    if V < 4:
        return pick(x0, x1, x2, x3, V)
    return pick(x4, x5, x6, x7, V - 4)


@triton.jit
def add_product(part, f, x, FIRST: tl.constexpr):
    """``part + f * x`` as ``(BLOCK_M, BLOCK_N, T)`` for codes ``f (BLOCK_N, T)`` and activations
    ``x (BLOCK_M, T)``; the first product of a chunk replaces ``part`` (ptxas does not drop an
    addition of zero, which would cost a register clear per partial sum and chunk)."""
    product = f[None, :, :] * x[:, None, :]
    if FIRST:
        return product
    return part + product


@triton.jit
def chunk_dot(w0, w1, w2, w3, field_mask, one_bits, field_mask_lo, one_bits_lo, x_lane, k_lane,
              m_ok, K, C0: tl.constexpr, NC: tl.constexpr, XV: tl.constexpr, BITS: tl.constexpr,
              SIGNED: tl.constexpr, IS_FLOAT: tl.constexpr, EXP_BITS: tl.constexpr,
              MANT_BITS: tl.constexpr, MASKED: tl.constexpr):
    """``(sum_c x[c] * f(code c), sum_c x[c])`` over codes ``C0 .. C0 + NC`` of the lanes' chunks:
    ``(BLOCK_M, BLOCK_N, T)`` and ``(BLOCK_M, 1, T)`` fp32.

    ``x_lane (BLOCK_M, T, 1)`` points at each lane's first activation of the chunk, which is
    activation ``k_lane (1, T, 1)``; activations are read ``XV`` at a time (16 bytes), those
    past ``K`` as zero where ``MASKED``.

    2- and 4-bit integer codes are taken in pairs: one shift moves the odd code of a pair to the
    top of the mantissa and its even neighbour to the ``BITS`` bits below, and each gets its own
    mask (``field_mask_lo``, ``one_bits_lo``) and partial sum (see the module docstring).
    """
    PAIRS: tl.constexpr = (BITS == 2 or BITS == 4) and not IS_FLOAT and x_lane.shape[0] == 1
    offs_v = tl.arange(0, XV)[None, None, :]
    part = tl.zeros((x_lane.shape[0], w0.shape[0], w0.shape[1]), tl.float32)
    part_lo = tl.zeros((x_lane.shape[0], w0.shape[0], w0.shape[1]), tl.float32)
    xsum = tl.zeros((x_lane.shape[0], 1, w0.shape[1]), tl.float32)
    xsum_lo = tl.zeros((x_lane.shape[0], 1, w0.shape[1]), tl.float32)
    for xc in tl.static_range(NC // XV):
        C = C0 + xc * XV
        if MASKED:
            xmask = m_ok & (k_lane + (C + offs_v) < K)
            x = tl.load(x_lane + (C + offs_v), mask=xmask, other=0.0).to(tl.float32)
        else:
            x = tl.load(x_lane + (C + offs_v)).to(tl.float32)  # (M, T, XV)
        if XV == 8:
            x0, x1, x2, x3, x4, x5, x6, x7 = split8(x)
        else:
            x0, x1, x2, x3 = split4(x)
            x4, x5, x6, x7 = x0, x1, x2, x3  # unused
        if PAIRS:  # the even codes' activations are needed apart
            xs_even = (x0 + x2) + (x4 + x6) if XV == 8 else x0 + x2
            xs = xs_even + ((x1 + x3) + (x5 + x7) if XV == 8 else x1 + x3)
        elif XV == 8:  # (summed as pairs ptxas spills at 4 rows of int3)
            xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        else:
            xs = (x0 + x1) + (x2 + x3)
        if PAIRS:
            for v in tl.static_range(0, XV, 2):
                # the odd code at the top of the mantissa, the even one just below it
                t = field_at(w0, w1, w2, w3, C + v + 1, BITS, 23 - BITS)
                f_hi = int_code_value(t, field_mask, one_bits, SIGNED)
                f_lo = int_code_value(t, field_mask_lo, one_bits_lo, SIGNED)
                part = add_product(part, f_hi, x_at(x0, x1, x2, x3, x4, x5, x6, x7, v + 1),
                                   xc == 0 and v == 0)
                part_lo = add_product(part_lo, f_lo, x_at(x0, x1, x2, x3, x4, x5, x6, x7, v),
                                      xc == 0 and v == 0)
            xsum_lo += xs_even[:, None, :]
        else:
            for v in tl.static_range(XV):
                f = code_value(w0, w1, w2, w3, field_mask, one_bits, C + v, BITS, SIGNED,
                               IS_FLOAT, EXP_BITS, MANT_BITS)
                part = add_product(part, f, x_at(x0, x1, x2, x3, x4, x5, x6, x7, v),
                                   xc == 0 and v == 0)
        if not IS_FLOAT:  # float codes carry no offset to take out
            xsum += xs[:, None, :]
    if PAIRS:
        # an even code's f_lo = 1 + c / 2**(2 BITS):
        # x (1 + c / 2**BITS) = 2**BITS x f_lo - (2**BITS - 1) x
        part += part_lo * (1 << BITS) - xsum_lo * ((1 << BITS) - 1)
    return part, xsum


@triton.jit
def chunk_scale(raw, SCALE_FMT: tl.constexpr):
    """fp32 scales of stored ``raw`` scales for :func:`chunk_qparams`: float and e8m0 scales
    decoded exactly; e4m3 codes placed into fp16 bits (value * 2**-8, the NaN code never occurs
    in stored weights), the ``2**8 / g`` being applied to the output."""
    if SCALE_FMT == 2:
        h = ((raw.to(tl.int32) & 0x7F) << 7).to(tl.uint16).to(tl.float16, bitcast=True)
        return h.to(tl.float32)
    else:
        return decode_scale(raw, 1.0, SCALE_FMT)


@triton.jit
def chunk_qparams(s_rows, z_rows, n_ok, k, K, group_size, stride_sg, BITS: tl.constexpr,
                  SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, IS_FLOAT: tl.constexpr,
                  EXP_BIAS: tl.constexpr, SCALE_FMT: tl.constexpr, MASKED: tl.constexpr):
    """Effective scale and zero ``(BLOCK_N, T)`` of the group holding activation ``k (T,)`` in each
    row, such that the group's contribution is ``s * (part - zz * xsum)`` for :func:`chunk_dot`'s
    sums (lanes past ``K`` get a zero scale; e4m3 scales still lack their ``2**8 / g``)."""
    g = k // group_size
    s_ptrs = s_rows[:, None] + g[None, :] * stride_sg
    if MASKED:
        mask = n_ok[:, None] & (k < K)[None, :]
        s = chunk_scale(tl.load(s_ptrs, mask=mask, other=0), SCALE_FMT)
    else:
        mask = None
        s = chunk_scale(tl.load(s_ptrs), SCALE_FMT)
    if IS_FLOAT:  # part sums value * 2**(BIAS - 15): scale back (exact power of two)
        return s * (1 << (15 - EXP_BIAS)), tl.zeros_like(s)
    # part sums 1 + c_u / 2**BITS with c_u = c (+ 2**(BITS - 1) if signed); the weight is c - z
    zu = tl.zeros_like(s)
    if SIGNED:
        zu += 1 << (BITS - 1)
    if HAS_ZERO:
        zu += packed_code_at(z_rows[:, None], g[None, :], mask, BITS, SIGNED).to(tl.float32)
    return s * (1 << BITS), 1.0 + zu * (1.0 / (1 << BITS))


@triton.jit
def load_words(ptrs, mask, MASKED: tl.constexpr):
    """One ``(BLOCK_N, T)`` uint32 word per lane from ``(BLOCK_N, T, 1)`` pointers (``MASKED``:
    zero where ``mask`` is false)."""
    if MASKED:
        w = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, eviction_policy="evict_first")
    return tl.reshape(w, (w.shape[0], w.shape[1])).to(tl.uint32, bitcast=True)


@triton.jit
def accumulate(acc, part, xsum, s, zz, IS_FLOAT: tl.constexpr):
    """``acc + s * (part - zz * xsum)``: one group's contribution (see :func:`chunk_qparams`)."""
    if IS_FLOAT:
        return acc + s[None, :, :] * part
    return acc + s[None, :, :] * (part - zz[None, :, :] * xsum)


@triton.jit
def k_tile(acc, k0, w_ptrs, x_lane, m_ok, n_ok, s_rows, z_rows, offs_t, offs_w, K, K_WORDS,
           group_size, stride_sg, field_mask, one_bits, field_mask_lo, one_bits_lo,
           BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr,
           IS_FLOAT: tl.constexpr, EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr,
           EXP_BIAS: tl.constexpr, SCALE_PER_WORD: tl.constexpr, SCALE_FMT: tl.constexpr,
           XV: tl.constexpr, MASKED: tl.constexpr):
    """``acc`` plus the K-tile starting at activation ``k0``. ``MASKED``: rows past ``M`` or
    ``N`` (``m_ok``, ``n_ok``) and weight words and activations past ``K`` read as zero;
    otherwise every load is in range."""
    UNIT: tl.constexpr = BITS == 3 or BITS == 6  # 3-word units (12-byte, not 16-byte aligned)
    WORDS: tl.constexpr = 3 if UNIT else 4  # 32-bit words per lane and row in a tile
    CHUNK: tl.constexpr = 96 // BITS if UNIT else 128 // BITS  # codes per lane and row in a tile
    CPW: tl.constexpr = 96 // BITS if UNIT else 32 // BITS  # codes per scale step (SCALE_PER_WORD)
    word0 = (k0 // CHUNK) * WORDS  # first word of this K-tile in each row
    word = (word0 + offs_t * WORDS)[None, :, None] + offs_w[None, None, :]
    if UNIT:
        row_ok = n_ok[:, None, None]
        w0 = load_words(w_ptrs + word0, row_ok & (word < K_WORDS), MASKED)
        w1 = load_words(w_ptrs + (word0 + 1), row_ok & (word + 1 < K_WORDS), MASKED)
        w2 = load_words(w_ptrs + (word0 + 2), row_ok & (word + 2 < K_WORDS), MASKED)
        w3 = w2  # unused
    else:
        if MASKED:
            w = tl.load(w_ptrs + word0, mask=n_ok[:, None, None] & (word < K_WORDS), other=0,
                        eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + word0, eviction_policy="evict_first")
        w0, w1, w2, w3 = split4(w.to(tl.uint32, bitcast=True))  # (BLOCK_N, T) each
    k_lane = (k0 + offs_t * CHUNK)[None, :, None]  # (1, T, 1)
    if SCALE_PER_WORD:
        for i in tl.static_range(CHUNK // CPW):
            part, xsum = chunk_dot(w0, w1, w2, w3, field_mask, one_bits, field_mask_lo,
                                   one_bits_lo, x_lane + k0, k_lane, m_ok, K, i * CPW, CPW, XV,
                                   BITS, SIGNED, IS_FLOAT, EXP_BITS, MANT_BITS, MASKED)
            s, zz = chunk_qparams(s_rows, z_rows, n_ok, k0 + offs_t * CHUNK + i * CPW, K,
                                  group_size, stride_sg, BITS, SIGNED, HAS_ZERO, IS_FLOAT,
                                  EXP_BIAS, SCALE_FMT, MASKED)
            acc = accumulate(acc, part, xsum, s, zz, IS_FLOAT)
    else:
        part, xsum = chunk_dot(w0, w1, w2, w3, field_mask, one_bits, field_mask_lo, one_bits_lo,
                               x_lane + k0, k_lane, m_ok, K, 0, CHUNK, XV, BITS, SIGNED, IS_FLOAT,
                               EXP_BITS, MANT_BITS, MASKED)
        s, zz = chunk_qparams(s_rows, z_rows, n_ok, k0 + offs_t * CHUNK, K, group_size, stride_sg,
                              BITS, SIGNED, HAS_ZERO, IS_FLOAT, EXP_BIAS, SCALE_FMT, MASKED)
        acc = accumulate(acc, part, xsum, s, zz, IS_FLOAT)
    return acc


@triton.jit
def _dequant_gemv_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, global_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, K_WORDS, group_size, block_rows,
    # code-to-float constants (see code_value; *_lo: the lower code of a pair, see chunk_dot)
    field_mask, one_bits, field_mask_lo, one_bits_lo,
    # strides (qweight in 32-bit words)
    stride_xm, stride_qn, stride_sn, stride_sg, stride_zn, stride_om, stride_on,
    # quantization
    BITS: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, IS_FLOAT: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, EXP_BIAS: tl.constexpr,
    SCALE_PER_WORD: tl.constexpr, SCALE_FMT: tl.constexpr,
    # meta
    HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, XV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    """``BLOCK_M`` rows of ``x`` times ``BLOCK_N`` whole weight rows (see the module docstring).

    ``SCALE_PER_WORD``: the group changes inside a lane's chunk (groups shorter than a chunk),
    so scales and zeros are applied per 32-bit word instead of per chunk.
    """
    UNIT: tl.constexpr = BITS == 3 or BITS == 6  # 3-word units (12-byte, not 16-byte aligned)
    WORDS: tl.constexpr = 3 if UNIT else 4  # 32-bit words per lane and row in a tile
    CHUNK: tl.constexpr = 96 // BITS if UNIT else 128 // BITS  # codes per lane and row in a tile
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_t = tl.arange(0, T)  # (T,) lanes along K
    n_ok = offs_n < N
    m_ok = (offs_m < M)[:, None, None]  # (M, 1, 1)
    if BLOCK_M == 1:  # rows past N read the last row (never stored): no row masks needed
        rows64 = tl.minimum(offs_n, N - 1).to(tl.int64)  # N * row stride can exceed 2**31
    else:  # rows are masked (see the K loop below)
        rows64 = offs_n.to(tl.int64)
    # each lane's chunk of every row: 4 contiguous words (128 bits), or a 3-word unit read as
    # three (BLOCK_N, T) tiles (12-byte units are not 16-byte aligned)
    offs_w = tl.arange(0, 1) if UNIT else tl.arange(0, 4)
    w_ptrs = (qweight_ptr + rows64[:, None, None] * stride_qn
              + (offs_t * WORDS)[None, :, None] + offs_w[None, None, :])  # (BLOCK_N, T, 4 | 1)
    x_lane = (x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm
              + (offs_t * CHUNK)[None, :, None])  # (M, T, 1)
    s_rows = scales_ptr + (rows64 // block_rows) * stride_sn  # (BLOCK_N,)
    z_rows = qzeros_ptr + rows64 * stride_zn

    # M = 1: whole K-tiles without masks (a masked load clears its registers first), then the
    # ragged last tile with masks along K. More rows keep one masked loop: there a second copy
    # of the loop body makes ptxas spill (fp32 activations, 3 or 4 rows).
    TILE: tl.constexpr = T * CHUNK
    acc = tl.zeros((BLOCK_M, BLOCK_N, T), tl.float32)
    if BLOCK_M == 1:
        k_full = (K // TILE) * TILE
        for k0 in range(0, k_full, TILE):
            acc = k_tile(acc, k0, w_ptrs, x_lane, m_ok, n_ok, s_rows, z_rows, offs_t, offs_w, K,
                         K_WORDS, group_size, stride_sg, field_mask, one_bits, field_mask_lo,
                         one_bits_lo, BITS, SIGNED, HAS_ZERO, IS_FLOAT, EXP_BITS, MANT_BITS,
                         EXP_BIAS, SCALE_PER_WORD, SCALE_FMT, XV, False)
        if k_full < K:
            acc = k_tile(acc, k_full, w_ptrs, x_lane, m_ok, n_ok, s_rows, z_rows, offs_t, offs_w,
                         K, K_WORDS, group_size, stride_sg, field_mask, one_bits, field_mask_lo,
                         one_bits_lo, BITS, SIGNED, HAS_ZERO, IS_FLOAT, EXP_BITS, MANT_BITS,
                         EXP_BIAS, SCALE_PER_WORD, SCALE_FMT, XV, True)
    else:
        for k0 in range(0, K, TILE):
            acc = k_tile(acc, k0, w_ptrs, x_lane, m_ok, n_ok, s_rows, z_rows, offs_t, offs_w, K,
                         K_WORDS, group_size, stride_sg, field_mask, one_bits, field_mask_lo,
                         one_bits_lo, BITS, SIGNED, HAS_ZERO, IS_FLOAT, EXP_BITS, MANT_BITS,
                         EXP_BIAS, SCALE_PER_WORD, SCALE_FMT, XV, True)

    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N): the only cross-lane reduction
    if SCALE_FMT == 2:  # e4m3 scales were summed as value * 2**-8 (chunk_scale): times 2**8 / g
        y = tl.div_rn(y * 256.0, tl.load(global_ptr) + tl.zeros_like(y))
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if OUT_BF16:  # out_ptr is an int16 view of the bf16 output
        tl.store(o_ptrs, bf16_bits(y).to(tl.int16), mask=mask)
    else:
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of :func:`_dequant_gemv_kernel`: ``block_m`` activation rows and ``block_n``
    weight rows per program, ``num_warps`` warps whose ``32 * num_warps`` lanes run along K."""

    block_m: int
    block_n: int
    num_warps: int

    @property
    def lanes(self) -> int:
        return 32 * self.num_warps


# More activation rows: the tensor-core kernel amortises the dequantization better (sm90 SASS
# per weight, int4 g128, 4096x4096: GEMV 3.9 / 5.7 / 8.6 at M = 1 / 2 / 3-4 and 17.6 at M = 8
# when last measured there, the 16-row tensor-core tile ~10 for any M <= 16).
MAX_M = 4
ONE_BITS = 0x3F800000  # fp32 1.0
SIGN_FLIP = 1 << 22  # the top mantissa bit, where a signed code's sign bit lands


def code_constants(bits: int, signed: bool) -> tuple[int, int, int, int]:
    """``field_mask, one_bits, field_mask_lo, one_bits_lo`` of :func:`_dequant_gemv_kernel`: the
    masks of a code at the top ``bits`` mantissa bits and of one ``bits`` lower (the even code of
    a pair), and the bits of 1.0 or-ed (signed codes: xor-ed, flipping the code's sign bit)
    into them."""
    field_mask = ((1 << bits) - 1) << (23 - bits)
    flip = SIGN_FLIP if signed else 0
    return field_mask, ONE_BITS | flip, field_mask >> bits, ONE_BITS | (flip >> bits)


def weight_constexprs(scheme: QuantScheme) -> dict:
    """The constexprs describing packed weights of ``scheme`` (shared by the matmul kernels)."""
    dt = scheme.dtype
    return dict(
        BITS=scheme.bits, SIGNED=dt.is_int and not scheme.unsigned, HAS_ZERO=scheme.has_zero,
        IS_FLOAT=dt.is_float, EXP_BITS=dt.exponent_bits, MANT_BITS=dt.mantissa_bits,
        EXP_BIAS=dt.exponent_bias,
    )


def chunk_codes(bits: int) -> int:
    """Codes per lane and weight row in one K-tile: a 128-bit load (3 and 6 bits: a 96-bit
    unit)."""
    return 96 // bits if bits in (3, 6) else 128 // bits


def word_codes(bits: int) -> int:
    """Codes per 32-bit word (3 and 6 bits: per 3-word unit): the finest scale step the kernel
    handles."""
    return 96 // bits if bits in (3, 6) else 32 // bits


def scale_per_word(group_size: int, K: int, bits: int) -> bool | None:
    """Whether scales change inside a lane's chunk (True), not (False), or inside a word (None:
    this kernel cannot serve the group size)."""
    if group_size >= K or group_size % chunk_codes(bits) == 0:
        return False
    if group_size % word_codes(bits) == 0:
        return True
    return None


def gemv_config(M: int, N: int, K: int, bits: int, target: Target,
                x_bytes: int = 2) -> GemvConfig:
    """Warps to cover K with few masked lanes (at most 4), then ``block_n`` lowered until the
    grid gives every SM 8 warps (``x_bytes``: the activations' element size)."""
    block_m = triton.next_power_of_2(M)
    chunks = triton.cdiv(K, chunk_codes(bits))
    warps = max(1, min(4, triton.next_power_of_2(triton.cdiv(chunks, 32))))
    # 8 rows share each activation load; 4 where 4 activation rows of wide chunks (int2/int3)
    # or fp32 activations would not fit in registers
    block_n = 4 if block_m >= 4 and (x_bytes == 4 or bits in (2, 3)) else 8
    if not target.gpu:  # interpreter: fewer, larger block operations
        return GemvConfig(block_m, min(32, triton.next_power_of_2(N)), warps)
    while block_n > 1 and triton.cdiv(N, block_n) * warps < 8 * target.sm_count:
        block_n //= 2
    return GemvConfig(block_m, block_n, warps)


def plan_dequant_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    target: Target,
    *,
    config: GemvConfig | None = None,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[Launch]] | None:
    """The output and launch of the GEMV for validated :func:`quant_linear_matmul` arguments,
    or None where this kernel does not apply (more than :data:`MAX_M` rows, rows not 4-byte
    aligned, ``x`` strided along K, groups that split a word)."""
    M, K = x.shape
    N, row_bytes = qweight.shape
    bits = scheme.bits
    group_size = scheme.group_cols(K)
    per_word = scale_per_word(group_size, K, bits)
    aligned = row_bytes % 4 == 0 and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0
    if M > MAX_M or not aligned or x.stride(1) != 1 or per_word is None:
        return None
    cfg = config or gemv_config(M, N, K, bits, target, x.element_size())
    xv = 16 // x.element_size()
    if per_word:
        xv = min(xv, word_codes(bits))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    stride_sn, stride_sg = (0 if n == 1 else st for n, st in zip(scales.shape, scales.stride()))
    stride_zn = 0 if qzeros is None or qzeros.shape[0] == 1 else qzeros.stride(0)
    words = qweight.view(torch.int32)  # (N, row_bytes / 4)
    args = (
        x, words, scales, qweight if qzeros is None else qzeros,
        scales if global_scale is None else global_scale, x if bias is None else bias,
        out.view(torch.int16) if out.dtype == torch.bfloat16 else out,
        M, N, K, row_bytes // 4, group_size, scheme.block_rows if scales.shape[0] > 1 else 1,
        *code_constants(bits, scheme.dtype.is_int and not scheme.unsigned),
        x.stride(0), words.stride(0), stride_sn, stride_sg, stride_zn, out.stride(0), out.stride(1),
    )
    constexprs = weight_constexprs(scheme) | dict(
        SCALE_PER_WORD=per_word, SCALE_FMT=SCALE_FMT_OF[scheme.scale_format], HAS_BIAS=bias is not None,
        OUT_BF16=out.dtype == torch.bfloat16, XV=xv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, T=cfg.lanes,
    )
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))
    info = dict(config=cfg, weights_per_iter=cfg.block_n * cfg.lanes * chunk_codes(bits),
                weight_bits=bits)
    return out, [Launch(_dequant_gemv_kernel, grid, args, constexprs, cfg.num_warps, 1, info)]

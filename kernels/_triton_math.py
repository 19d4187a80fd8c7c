"""Shared ``@triton.jit`` arithmetic: exact rounding, minifloat codes, bf16 bits.

Everything here is integer bit arithmetic or float operations whose results are exact, so it
gives the same bits on a GPU and in the Triton interpreter (where libdevice ``rint`` does not
exist, fp32 -> fp8 casts are wrong and fp32 -> bf16 casts truncate). The math mirrors
:mod:`quantkit.reference`:

* :func:`round_half_even` is ``torch.round`` for ``|y| <= 2**22``: adding
  ``1.5 * 2**23`` moves ``y`` into the binade whose spacing is 1, so the fp32 addition itself
  rounds half to even; subtracting the constant back is exact.
* :func:`minifloat_encode` is ``encode_minifloat(round_to_minifloat(clamp(y)))``: the binade
  exponent ``e`` is read from the fp32 bits (floored at the smallest normal exponent, which
  yields subnormals), ``n = round(|y| / 2**(e - MANT_BITS))`` and the code is
  ``((e + BIAS - 1) << MANT_BITS) + n``. That single formula covers normals (``n`` in
  ``[2**M, 2**(M+1))``), subnormals (``e + BIAS - 1 == 0``, ``n < 2**M``) and the carry into the
  next binade (``n == 2**(M+1)``). The sign bit is the sign bit of ``y`` (``-0.0`` and negative
  values that round to zero keep it, as torch's float8 casts do).
* :func:`minifloat_decode` is ``decode_minifloat``: ``(implicit * 2**M + mant) *
  2**(max(biased, 1) - BIAS - M)``, every step exact. Codes with the all-ones exponent decode
  as ordinary normals, as in the reference (they are never produced by the encoder).

* :func:`minifloat_specials` turns the NaN (and e5m2 inf) codes that :func:`minifloat_decode`
  decodes as ordinary normals into NaN/inf, as :func:`quantkit.reference.decode_minifloat` does.
* Scale formats (:mod:`quantkit.scales`; ``SCALE_FMT``: :data:`SCALE_FLOAT`, :data:`SCALE_E8M0`,
  :data:`SCALE_E4M3`): :func:`mx_scale_from_amax` / :func:`e4m3_scale_from_amax` compute a group's
  scale from its ``amax`` exactly as the reference does (the MX exponent read from the fp32
  exponent field; the e4m3 scale with the fp32 per-tensor ``g``, one ``div_rn``), and
  :func:`decode_scale` turns stored scales (float values, or e8m0 / e4m3 codes) into fp32.

The constexpr parameters ``EXP_BITS``/``MANT_BITS``/``BIAS``/``MAX_VALUE`` are the fields of
:class:`quantkit.dtypes.QuantDType` (e2m1: 2/1/1/6.0, e2m3: 2/3/1/7.5, e3m2: 3/2/3/28.0, e4m3fn:
4/3/7/448.0, e5m2: 5/2/15/57344.0).
"""

from __future__ import annotations

import triton
import triton.language as tl

# round_half_even is exact for |y| <= ROUND_LIMIT; clamp wider inputs first
ROUND_LIMIT = tl.constexpr(4194304.0)  # 2**22
# SCALE_FMT constexpr values (quantkit.scales): float scales, e8m0 codes, e4m3 codes (+ fp32 g)
SCALE_FLOAT = 0
SCALE_E8M0 = 1
SCALE_E4M3 = 2
SCALE_FMT_OF = {"float16": SCALE_FLOAT, "float32": SCALE_FLOAT, "e8m0": SCALE_E8M0, "e4m3": SCALE_E4M3}
# minifloat specials (QuantDType.specials) as a constexpr: none, e4m3fn NaN, e5m2 inf/NaN
SPECIALS_OF = {"none": 0, "nan": 1, "ieee": 2}


@triton.jit
def round_half_even(y):
    """``torch.round(y)`` (ties to even) for fp32 ``y`` with ``|y| <= 2**22``; any shape."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def pow2(e):
    """``2.0 ** e`` in fp32 for int32 ``e`` in ``[-126, 127]``, built from the exponent bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def minifloat_encode(
    y, EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr,
):
    """Bit pattern (int32, ``EXP_BITS + MANT_BITS + 1`` low bits) of fp32 ``y`` rounded to the grid.

    Saturates at ``MAX_VALUE`` (so ``inf`` maps to the largest finite code); ties to even.
    """
    sign = (y.to(tl.int32, bitcast=True) >> 31) & 1  # sign bit of y, also for -0.0
    a = tl.minimum(tl.abs(y), MAX_VALUE)  # saturate; MAX_VALUE lies on the grid
    biased32 = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF  # fp32 exponent field
    e = tl.maximum(biased32 - 127, 1 - BIAS)  # binade, floored at the smallest normal
    # a * 2**(MANT_BITS - e) < 2**(MANT_BITS + 1) is exact (a power-of-two scaling), so an FMA
    # contraction with the rounding addition cannot change the result
    n = round_half_even(a * pow2(MANT_BITS - e)).to(tl.int32)
    code = ((e + (BIAS - 1)) << MANT_BITS) + n
    return code | (sign << (EXP_BITS + MANT_BITS))


@triton.jit
def minifloat_decode(
    code, EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
):
    """fp32 value of minifloat bit patterns ``code`` (any integer dtype; low bits are used)."""
    c = code.to(tl.int32) & ((1 << (EXP_BITS + MANT_BITS + 1)) - 1)
    sign = (c >> (EXP_BITS + MANT_BITS)) & 1
    biased = (c >> MANT_BITS) & ((1 << EXP_BITS) - 1)
    mant = c & ((1 << MANT_BITS) - 1)
    n = tl.where(biased > 0, mant + (1 << MANT_BITS), mant)  # significand in units of 2**-M
    mag = n.to(tl.float32) * pow2(tl.maximum(biased, 1) - (BIAS + MANT_BITS))  # exact
    return tl.where(sign != 0, -mag, mag)


@triton.jit
def minifloat_specials(v, code, EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr,
                       SPECIALS: tl.constexpr):
    """``v`` (decoded by :func:`minifloat_decode`) with the non-number codes of ``code`` made NaN
    (``SPECIALS`` 1: e4m3fn's ``S.1111.111``; 2: e5m2's all-ones exponent, inf when the mantissa
    is 0)."""
    if SPECIALS == 0:
        return v
    c = code.to(tl.int32)
    MAG: tl.constexpr = (1 << (EXP_BITS + MANT_BITS)) - 1
    TOP: tl.constexpr = ((1 << EXP_BITS) - 1) << MANT_BITS
    if SPECIALS == 1:
        return tl.where((c & MAG) == MAG, float("nan"), v)
    special = (c & TOP) == TOP
    inf = tl.where(v < 0, float("-inf"), float("inf"))
    return tl.where(special, tl.where((c & (MAG ^ TOP)) == 0, inf, float("nan")), v)


@triton.jit
def e8m0_value(e):
    """fp32 ``2**e`` for int32 MX exponents ``e`` in ``[-127, 127]`` (``2**-127`` is a subnormal)."""
    bits = tl.where(e >= -126, (e + 127) << 23, 0x00400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mx_scale_from_amax(amax, EMAX: tl.constexpr):
    """The OCP MX (e8m0) scale of groups with maximum magnitude ``amax`` (fp32 >= 0, finite):
    ``2**clamp(floor(log2 amax) - EMAX, -127, 127)``; zero and fp32-subnormal ``amax`` (whose
    exponent is below -126, hence below -127 after subtracting ``EMAX >= 2``) give ``2**-127``."""
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.where(biased == 0, -127, biased - 127 - EMAX)
    e = tl.minimum(tl.maximum(e, -127), 127)
    return e8m0_value(e)


@triton.jit
def e4m3_scale_from_amax(amax, g, MAX_VALUE: tl.constexpr):
    """NVFP4's block scale ``value(fp8(g * (amax / MAX_VALUE))) / g`` (a zero fp8 scale is 0.125),
    fp32, for fp32 ``amax >= 0`` and the per-tensor fp32 ``g`` (same shapes or broadcast)."""
    raw = tl.div_rn(amax, tl.full(amax.shape, MAX_VALUE, tl.float32))
    t = tl.minimum(g * raw, 448.0)
    code = minifloat_encode(t, 4, 3, 7, 448.0)
    s8 = minifloat_decode(code, 4, 3, 7)
    s8 = tl.where(s8 == 0.0, 0.125, s8)
    return tl.div_rn(s8, g + tl.zeros_like(s8))


@triton.jit
def decode_scale(raw, g, SCALE_FMT: tl.constexpr):
    """fp32 scales of stored ``raw`` scales: float values (``SCALE_FMT == 0``), e8m0 codes
    (``2**(E - 127)``, 255: NaN) or e4m3 codes divided by the per-tensor ``g`` (fp32 scalar)."""
    if SCALE_FMT == 1:
        b = raw.to(tl.int32) & 0xFF
        v = e8m0_value(b - 127)
        return tl.where(b == 255, float("nan"), v)
    elif SCALE_FMT == 2:
        c = raw.to(tl.int32) & 0xFF
        v = minifloat_specials(minifloat_decode(c, 4, 3, 7), c, 4, 3, 1)
        return tl.div_rn(v, g + tl.zeros_like(v))
    else:
        return raw.to(tl.float32)


@triton.jit
def bf16_bits(v):
    """Bit pattern (int32, low 16 bits) of fp32 ``v`` rounded to bfloat16, ties to even.

    Integer arithmetic only: bf16 is the top half of fp32, so rounding is adding
    ``0x7FFF + lsb`` to the fp32 bits and shifting; it handles subnormals, overflow to inf and
    ties exactly, both on a GPU and in the interpreter (whose fp32 -> bf16 cast truncates and
    mangles subnormals). NaN becomes the canonical quiet NaN ``0x7FC0``. Store the result
    through an int16 view of the bf16 output.
    """
    bits = v.to(tl.int32, bitcast=True)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) & 0xFFFF
    return tl.where(v != v, 0x7FC0, rounded)


@triton.jit
def packed_code_at(row_ptrs, idx, mask, BITS: tl.constexpr, SIGNED: tl.constexpr):
    """Code number ``idx`` of packed rows starting at ``row_ptrs`` (same shapes), as int32
    (``mask``: where to load, None for everywhere).

    Code ``idx`` occupies bits ``[b, b + BITS)`` of its run's little-endian word with
    ``b = (idx % 8) * BITS``, i.e. at most two consecutive bytes of the row.
    """
    bit = (idx % 8) * BITS
    byte = (idx // 8) * BITS + bit // 8
    if mask is None:  # every code in range
        v = tl.load(row_ptrs + byte).to(tl.int32)
    else:
        v = tl.load(row_ptrs + byte, mask=mask, other=0).to(tl.int32)
    if BITS < 8:
        straddles = (bit % 8) + BITS > 8  # int3 codes 2 and 5 cross a byte boundary
        if mask is not None:
            straddles = straddles & mask
        hi = tl.load(row_ptrs + byte + 1, mask=straddles, other=0).to(tl.int32)
        v = ((v | (hi << 8)) >> (bit % 8)) & ((1 << BITS) - 1)
    if SIGNED:
        v = (v << (32 - BITS)) >> (32 - BITS)  # sign-extend the field
    return v

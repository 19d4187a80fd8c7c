"""Pure-torch reference primitives: scales and zeros, quantize, dequantize, minifloat rounding.

These functions define the math; every Triton kernel in ``quantkit.kernels`` is tested
against them (bit-exact: codes, scales and zeros). All arithmetic is float32 in a fixed
order so that a kernel can reproduce it exactly:

* integer, symmetric:  ``s = amax / (qmax + 0.5)`` (``symmetric_range=full``, every code available)
  or ``s = amax / qmax`` (``restricted``), ``s = 1`` where ``amax == 0``;
  ``q = clamp(round(x / s), qmin, qmax)``; unsigned without zero: ``s = max(x, 0) / qmax``.
* integer, zero point: ``lo = min(x, 0)``, ``hi = max(x, 0)``, ``s = (hi - lo) / (qmax - qmin)``
  (``1`` where 0; ``hi / (qmax - qmin) - lo / (qmax - qmin)`` where ``hi - lo`` overflows float32), ``z = clamp(round(qmin - lo / s), qmin, qmax)``,
  ``q = clamp(round(x / s) + z, qmin, qmax)``; ``x_hat = (q - z) * s``.
* float (fp8 e4m3fn/e5m2, fp6 e2m3/e3m2, fp4 e2m1): ``s = amax / max_value``,
  ``q = bits(round_to_grid(clamp(x / s, -max, max)))`` (round half to even, as torch's float8
  casts); ``x_hat = value(q) * s``.
* scale formats other than float16/float32 (:mod:`quantkit.scales`): ``s`` is the e8m0 power of
  two of the OCP MX spec or NVFP4's e4m3 scale over an fp32 per-tensor scale ``g``
  (:func:`global_scale`), computed from the group's ``amax`` by :func:`quantkit.scales.scale_from_amax`.
  The element codes are the float-grid codes above with that ``s``. NaN: e4m3fn elements code
  it as ``S.1111.111``, fp4/fp6 have no NaN code and store 0 (the group's scale is NaN then, so
  the group decodes to NaN); decoding honours the NaN (and e5m2 inf) codes.
* 2-D blocks (``block_rows = R``): one scale per ``R`` rows by ``groupsize`` columns.

``round`` is round-half-to-even (``torch.round``). Inputs are viewed as ``(rows, cols)``
with leading dimensions flattened (see :mod:`quantkit.scheme` for the scale shapes).
Codes are ``int8`` for signed integer grids and ``uint8`` otherwise (unsigned integers,
and the bit patterns of float grids: fp8 bytes, fp4 nibbles ``sign<<3 | exp<<1 | mant``).
"""

from __future__ import annotations

import torch

from quantkit import scales as scale_formats
from quantkit.dtypes import QuantDType
from quantkit.scheme import QuantScheme


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``(..., cols)`` as ``(rows, cols)``."""
    return x.reshape(-1, x.shape[-1])


def group_index(cols: int, scheme: QuantScheme, device: torch.device | None = None) -> torch.Tensor:
    """Group of every column, ``(cols,)`` int64: ``k // groupsize`` (0 for per row/tensor)."""
    return torch.arange(cols, device=device) // scheme.group_cols(cols)


def _reduce_groups(x: torch.Tensor, scheme: QuantScheme, op: str) -> torch.Tensor:
    """Reduce ``x (rows, cols)`` float32 over each quantization group -> scale shape."""
    rows, cols = x.shape
    if scheme.granularity == "per_tensor":
        return getattr(x, op)().reshape(1, 1)
    g = scheme.group_cols(cols)
    ngroups = scheme.num_groups(cols)
    r = scheme.block_rows
    nblocks = -(-rows // r)
    pad, pad_rows = ngroups * g - cols, nblocks * r - rows
    if pad or pad_rows:  # pad the short last group with a value that never wins the reduction
        fill = {"amin": float("inf"), "amax": float("-inf"), "sum": 0.0}[op]
        x = torch.nn.functional.pad(x, (0, pad, 0, pad_rows), value=fill)
    if r == 1:
        return getattr(x.reshape(rows, ngroups, g), op)(dim=-1)  # (rows, ngroups)
    blocks = x.reshape(nblocks, r, ngroups, g).transpose(1, 2).reshape(nblocks, ngroups, r * g)
    return getattr(blocks, op)(dim=-1)  # (ceil(rows / r), ngroups)


def group_sum(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Sum of every scale's group (or 2-D block) of ``x (..., cols)``, float32 of
    :meth:`QuantScheme.scale_shape`."""
    return _reduce_groups(as_rows(x).float(), scheme, "sum")


def group_amax(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``max |x|`` of every scale's group (or 2-D block) of ``x (..., cols)``, float32 of
    :meth:`QuantScheme.scale_shape`."""
    return _reduce_groups(as_rows(x).float().abs(), scheme, "amax")


def global_scale(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor | None:
    """The per-tensor fp32 scale ``(1, 1)`` of ``x`` under ``scheme`` (e4m3 scales), else None."""
    if not scheme.has_global_scale:
        return None
    return scale_formats.global_scale(scale_formats.finite_amax(x), scheme.dtype)


def compute_qparams(
    x: torch.Tensor, scheme: QuantScheme, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of ``x (..., cols)`` under ``scheme``.

    ``global_scale``: the per-tensor scale of e4m3 schemes (:func:`global_scale` of ``x`` when
    None; GPTQ passes the one of the whole original weight while it quantizes parts of it).

    Returns:
        ``scale`` float32 of :meth:`QuantScheme.scale_shape`, and ``zero`` int32 of the same
        shape when ``scheme.has_zero`` (else ``None``).
    """
    if scheme.has_global_scale and global_scale is None:
        global_scale = scale_formats.global_scale(scale_formats.finite_amax(x), scheme.dtype)
    x = as_rows(x).float()
    dt = scheme.dtype
    if scheme.has_zero:
        lo = torch.clamp(_reduce_groups(x, scheme, "amin"), max=0.0)
        hi = torch.clamp(_reduce_groups(x, scheme, "amax"), min=0.0)
        levels = torch.full_like(lo, float(scheme.qmax - scheme.qmin))  # a tensor: true division on every device
        scale = (hi - lo) / levels
        # hi - lo beyond the float32 range: the same scale computed without the overflow
        scale = torch.where(torch.isinf(scale), hi / levels - lo / levels, scale)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(float(scheme.qmin) - lo / scale)
        zero = torch.clamp(zero, scheme.qmin, scheme.qmax).to(torch.int32)
        return scale, zero
    if dt.is_int and scheme.unsigned:
        amax = torch.clamp(_reduce_groups(x, scheme, "amax"), min=0.0)
    else:
        amax = _reduce_groups(x.abs(), scheme, "amax")
    return scale_formats.scale_from_amax(amax, dt, scheme.absmax_code, scheme.scale_format, global_scale), None


def expand_to_cols(p: torch.Tensor, rows: int, cols: int, scheme: QuantScheme) -> torch.Tensor:
    """Broadcast a per-group parameter ``(ceil(rows / block_rows)|1, G|1)`` to ``(rows, cols)``."""
    if scheme.granularity == "per_group":
        p = p[:, group_index(cols, scheme, p.device)]
        if scheme.block_rows > 1 and p.shape[0] > 1:
            p = p.repeat_interleave(scheme.block_rows, dim=0)[:rows]
    return p.expand(rows, cols)


def round_to_minifloat(y: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """Round float32 ``y`` to the nearest value of the minifloat grid ``dt`` (ties to even).

    Values beyond ``dt.max_value`` saturate. The quantum of a binade ``[2^e, 2^(e+1))`` is
    ``2^(e - mantissa_bits)`` (with ``e`` floored at the smallest normal exponent, which
    gives subnormals), so ``round(|y| / quantum) * quantum`` is exact in float32. This is the
    same algorithm the Triton kernels use; for fp8 it equals torch's own casts bit for bit.
    """
    a = y.abs()
    _, exp = torch.frexp(a)  # a = m * 2^exp, m in [0.5, 1)  ->  floor(log2 a) = exp - 1
    e = torch.clamp(exp - 1, min=dt.min_normal_exponent)
    quantum = torch.ldexp(torch.ones_like(a), e - dt.mantissa_bits)
    r = torch.clamp(torch.round(a / quantum) * quantum, max=dt.max_value)
    return torch.where(torch.signbit(y), -r, r)


def encode_minifloat(r: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """Bit pattern (uint8) of values ``r`` that lie on the grid of ``dt``."""
    a = r.abs()
    _, exp = torch.frexp(a)
    e = exp - 1
    normal = a >= 2.0**dt.min_normal_exponent  # frexp(0) has exp 0: not a normal
    sub_quantum = 2.0 ** (dt.min_normal_exponent - dt.mantissa_bits)
    m_normal = (torch.ldexp(a, -e) - 1.0) * (1 << dt.mantissa_bits)
    biased = (e + dt.exponent_bias).clamp(min=0)
    code_normal = (biased << dt.mantissa_bits) + m_normal.to(torch.int32)
    code_sub = (a / sub_quantum).to(torch.int32)
    code = torch.where(normal, code_normal, code_sub)
    sign = torch.signbit(r).to(torch.int32) << (dt.bits - 1)
    return (code | sign).to(torch.uint8)


def decode_minifloat(codes: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """Float32 values of uint8 bit patterns of ``dt``, NaN (and e5m2 inf) codes included."""
    c = codes.to(torch.int32)
    sign = (c >> (dt.bits - 1)) & 1
    biased = (c >> dt.mantissa_bits) & ((1 << dt.exponent_bits) - 1)
    mant_bits = c & ((1 << dt.mantissa_bits) - 1)
    frac = mant_bits.float() / (1 << dt.mantissa_bits)
    e = torch.clamp(biased, min=1) - dt.exponent_bias
    mag = torch.ldexp(torch.where(biased > 0, 1.0 + frac, frac), e)
    top = biased == (1 << dt.exponent_bits) - 1
    if dt.specials == "nan":  # e4m3fn: only S.1111.111 is NaN
        mag = torch.where(top & (mant_bits == (1 << dt.mantissa_bits) - 1), float("nan"), mag)
    elif dt.specials == "ieee":  # e5m2: inf with mantissa 0, NaN otherwise
        mag = torch.where(top, torch.where(mant_bits == 0, float("inf"), float("nan")), mag)
    return torch.where(sign.bool(), -mag, mag)


def _float_codes(y: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    if dt.specials == "none":  # no NaN code: store 0 (its group's scale is NaN, see above)
        y = torch.where(torch.isnan(y), torch.zeros_like(y), y)
    y = torch.clamp(y, -dt.max_value, dt.max_value)
    if dt.torch_dtype is not None:  # torch's own cast is the reference where it exists
        return y.to(dt.torch_dtype).view(torch.uint8)
    return encode_minifloat(round_to_minifloat(y, dt), dt)


def round_to_int_grid(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)`` of ``x`` on an integer grid, both float32, with ``scale`` and float
    ``zero`` already broadcastable to ``x``: the arithmetic of :func:`quantize` and
    :func:`dequantize` (the same float32 operations) for callers that hold expanded parameters."""
    q = torch.round(x / scale)
    if zero is not None:
        q = torch.clamp(q + zero, scheme.qmin, scheme.qmax)
        return q, (q - zero) * scale
    q = torch.clamp(q, scheme.qmin, scheme.qmax)
    return q, q * scale


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Codes of ``x (..., cols)`` with given ``scale``/``zero``; returns ``(rows, cols)``."""
    x = as_rows(x).float()
    rows, cols = x.shape
    y = x / expand_to_cols(scale, rows, cols, scheme)
    if scheme.dtype.is_float:
        return _float_codes(y, scheme.dtype)
    q = torch.round(y)
    if zero is not None:
        q = q + expand_to_cols(zero, rows, cols, scheme).float()
    q = torch.clamp(q, scheme.qmin, scheme.qmax)
    return q.to(torch.int8 if scheme.qmin < 0 else torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of ``codes (rows, cols)``: ``(q - z) * s`` or ``value(q) * s``, in ``out_dtype``."""
    rows, cols = codes.shape
    if scheme.dtype.is_float:
        q = decode_minifloat(codes, scheme.dtype)
    else:
        q = codes.float()
        if zero is not None:
            q = q - expand_to_cols(zero, rows, cols, scheme).float()
    return (q * expand_to_cols(scale, rows, cols, scheme)).to(out_dtype)


def quantize_tensor(
    x: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scale, zero)`` of ``x`` with scale/zero (and the per-tensor scale of e4m3
    schemes) computed from ``x`` itself."""
    scale, zero = compute_qparams(x, scheme)
    return quantize(x, scale, zero, scheme), scale, zero


def fake_quantize(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the shape and dtype of ``x``."""
    codes, scale, zero = quantize_tensor(x, scheme)
    return dequantize(codes, scale, zero, scheme, out_dtype=x.dtype).reshape(x.shape)

"""Scale formats: which numbers a group's scale may be, how it is computed from the group's
range and how it is stored.

Every scheme dequantizes as ``x_hat = value(q) * s`` (integer grids: ``(q - z) * s``) with one
float32 ``s`` per group; the scale format (``QuantScheme.scale_format``) decides ``s``. For a
group with ``amax = max |x|`` on a grid whose largest value is ``max`` (``absmax_code``):

========  ===========================================  =================  =====================
format    scale                                        stored             decoded
========  ===========================================  =================  =====================
float16   ``amax / max`` (1 where 0); rounded to       float16            ``.float()``
          float16 when stored (``QuantLinear``)
float32   ``amax / max`` (1 where 0)                   float32            itself
e8m0      ``2**e``, ``e = clamp(floor(log2 amax) -     uint8 ``e + 127``  ``2**(E - 127)``,
          emax, -127, 127)`` (OCP MX v1.0, 6.3)                           ``E = 255``: NaN
e4m3      ``fp8(g * (amax / max)) / g`` with one       uint8 (e4m3fn      ``value(E) / g``
          fp32 ``g = 448 * max / amax_tensor``         bits) + fp32 g
          per tensor (NVFP4)
========  ===========================================  =================  =====================

**e8m0** follows the OCP Microscaling spec v1.0 (sec. 6.3) as its reference code
(microsoft/microxcaling ``_quantize_mx``) computes it: ``emax`` is the exponent of the element
format's largest normal (:attr:`QuantDType.emax`: e2m1 2, e2m3 2, e3m2 4, e4m3 8);
``floor(log2 amax)`` is read exactly from the float32 exponent (``frexp``), an all-zero group
uses ``amax = 2**-126`` as microxcaling does (so its scale is ``2**-127``, code 0); exponents
below -127 clamp to -127 and a group holding NaN or +-inf gets the NaN scale (255), so the whole
group decodes as NaN. The elements are then ``x / 2**e`` rounded to nearest-even on the element
grid with saturation to its largest normal (values between ``max`` and ``2**(emax + 1)`` clip:
the spec's choice; compressed-tensors and vLLM instead round ``amax`` to the nearest power of
two first, NVIDIA's MXFP8 training recipe rounds the scale up).

**e4m3** is NVIDIA's NVFP4 two-level scale as compressed-tensors computes it (``generate_gparam``
and ``calculate_qparams``): ``g = (1 / amax_tensor) * (448 * max)`` in float32 (``amax_tensor``
at least the smallest normal float32; a non-finite ``g`` becomes 1), the block scale
``fp8_e4m3(clamp(g * (amax / max), -448, 448))`` rounded to nearest-even, a zero fp8 scale
replaced by 0.125 (compressed-tensors' eps: such a block holds only values far below the
tensor's maximum, all coded 0), and the scale used is ``value / g`` rounded once to float32
(compressed-tensors' ``scale / global_scale``). A group holding NaN gets the NaN fp8 scale.
``g`` is computed from the finite values of the whole tensor: for a weight once, before any
algorithm changes it (GPTQ keeps it fixed while it updates columns); for a dynamically
quantized activation from each input it quantizes.
"""

from __future__ import annotations

import torch

from quantkit.dtypes import QuantDType, get_dtype

E8M0_BIAS = 127
E8M0_NAN = 255
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
FP32_MIN_NORMAL = 2.0**-126  # microxcaling's stand-in amax of an all-zero group
E4M3 = get_dtype("fp8")  # the e4m3fn layout of NVFP4's block scales
E4M3_ZERO_SCALE = 0.125  # compressed-tensors' eps for an fp8 scale that rounded to 0


def mx_exponent(amax: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """OCP MX shared exponent ``clamp(floor(log2 amax) - emax, -127, 127)`` as float32 (NaN where
    ``amax`` is not finite); ``amax`` float32 of any shape, ``>= 0``."""
    amax = amax.float()
    a = torch.where(amax == 0, torch.full_like(amax, FP32_MIN_NORMAL), amax)
    _, exp = torch.frexp(a)  # a = m * 2**exp with m in [0.5, 1): floor(log2 a) = exp - 1
    e = (exp - 1 - dt.emax).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).float()
    return torch.where(torch.isfinite(amax), e, torch.full_like(e, float("nan")))


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** e`` as float32, built from the bits (exact), for integral ``e`` in ``[-149, 127]``
    (float32 or int); NaN where ``e`` is NaN."""
    ef = e.float()
    ei = torch.nan_to_num(ef, nan=0.0).to(torch.int32)
    bits = torch.where(ei >= -126, (ei + 127) << 23, 1 << (ei + 149).clamp(0, 22))  # subnormals
    p = bits.view(torch.float32)
    return torch.where(torch.isnan(ef), torch.full_like(p, float("nan")), p)


def mx_scale(amax: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """The e8m0 scale ``2**e`` (float32, ``2**-127`` is a float32 subnormal, exact) of groups with
    maximum magnitude ``amax``; NaN for non-finite ``amax``."""
    return pow2(mx_exponent(amax, dt))


def global_scale(amax_tensor: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """NVFP4's per-tensor fp32 scale ``g = (1 / amax) * (448 * max)`` ``(1, 1)`` float32, where
    ``amax_tensor`` is the largest finite magnitude of the tensor (a scalar tensor)."""
    a = amax_tensor.float().reshape(1, 1).clamp(min=torch.finfo(torch.float32).tiny)
    g = torch.reciprocal(a) * (E4M3.max_value * dt.max_value)  # compressed-tensors' 2688.0 / a
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


def finite_amax(x: torch.Tensor) -> torch.Tensor:
    """Largest finite ``|x|`` (0 for an all-NaN/inf tensor), a float32 scalar tensor."""
    a = x.float().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax()


def e4m3_codes(amax: torch.Tensor, g: torch.Tensor, dt: QuantDType) -> torch.Tensor:
    """The e4m3fn bit patterns (uint8) of NVFP4 block scales of groups with maximum ``amax``."""
    raw = amax.float() / torch.full_like(amax, dt.max_value, dtype=torch.float32)  # true division
    t = (g.float() * raw).clamp(-E4M3.max_value, E4M3.max_value)
    s8 = t.to(torch.float8_e4m3fn).float()  # round to nearest even (NaN stays NaN)
    s8 = torch.where(s8 == 0, torch.full_like(s8, E4M3_ZERO_SCALE), s8)
    return s8.to(torch.float8_e4m3fn).view(torch.uint8)


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of e4m3fn bit patterns (``0x7F``/``0xFF`` are NaN)."""
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).float()


def scale_from_amax(amax: torch.Tensor, dt: QuantDType, absmax_code: float, scale_format: str,
                    g: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 scale of groups with maximum magnitude ``amax`` under ``scale_format`` (see the
    module table; float16 scales are the float32 ``amax / absmax_code`` here, rounded when
    stored). ``g``: the per-tensor scale, required for e4m3."""
    amax = amax.float()
    if scale_format == "e8m0":
        return mx_scale(amax, dt)
    if scale_format == "e4m3":
        if g is None:
            raise ValueError("e4m3 scales need the per-tensor fp32 scale g (scales.global_scale)")
        return decode_e4m3(e4m3_codes(amax, g, dt)) / g.float()
    # not a python float: CUDA would multiply by its reciprocal
    scale = amax / torch.full_like(amax, absmax_code)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def encode_scales(scale: torch.Tensor, scale_format: str, g: torch.Tensor | None = None,
                  float16_min: float = 2.0**-14) -> torch.Tensor:
    """What ``QuantLinear`` stores for float32 ``scale`` values (see the module table).

    float16 scales are clamped to ``[float16_min, 65504]`` and rounded (algorithms pass scales
    that are already so rounded); e8m0 and e4m3 scales must lie on their grid (a ValueError
    names the first one that does not: a scale computed with another global scale, say).
    """
    scale = scale.float()
    if scale_format == "float32":
        return scale.clone()
    if scale_format == "float16":
        return scale.clamp(float16_min, torch.finfo(torch.float16).max).to(torch.float16)
    if scale_format == "e8m0":
        _, exp = torch.frexp(scale)  # powers of two: scale = 0.5 * 2**exp
        code = (exp - 1 + E8M0_BIAS).clamp(0, E8M0_NAN - 1)
        code = torch.where(torch.isnan(scale), torch.full_like(code, E8M0_NAN), code).to(torch.uint8)
    elif scale_format == "e4m3":
        if g is None:
            raise ValueError("e4m3 scales need the per-tensor fp32 scale g")
        # scale = RN(s8 / g) is within an ulp of s8 / g: times g it rounds back to s8 exactly
        code = (scale * g.float()).clamp(-E4M3.max_value, E4M3.max_value).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        raise ValueError(f"unknown scale format {scale_format!r}")
    back = decode_scales(code, scale_format, g)
    bad = ~((back == scale) | (torch.isnan(back) & torch.isnan(scale)))
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(f"scale {scale.flatten()[i].item()!r} is not a value of the {scale_format} scale "
                         f"format{' with this per-tensor scale' if scale_format == 'e4m3' else ''}")
    return code


def decode_scales(stored: torch.Tensor, scale_format: str, g: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scales of what :func:`encode_scales` stores."""
    if scale_format in ("float16", "float32"):
        return stored.float()
    if scale_format == "e8m0":
        c = stored.to(torch.int32)
        s = pow2(c - E8M0_BIAS)
        return torch.where(c == E8M0_NAN, torch.full_like(s, float("nan")), s)
    if scale_format == "e4m3":
        if g is None:
            raise ValueError("e4m3 scales need the per-tensor fp32 scale g")
        return decode_e4m3(stored) / g.float()
    raise ValueError(f"unknown scale format {scale_format!r}")

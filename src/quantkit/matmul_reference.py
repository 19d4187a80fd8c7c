"""Pure-torch references of the fused low-bit matmuls (the math the Triton kernels implement).

Every function here is the definition its kernel in ``quantkit.kernels`` is tested against,
and the CPU path of the matching dispatch function in :mod:`quantkit.ops`:

=============================  ==========================================================
reference                      math
=============================  ==========================================================
quant_linear_matmul_reference  ``y = x @ W.T + bias`` with ``W = dequant(qweight, scales,
                               qzeros)`` rounded to ``x.dtype`` (W-only: W4A16, W3A16, ...)
int8_matmul_reference          ``y = (xq @ wq.T) * sx * sw.T + bias``, int32 accumulator
fp8_matmul_reference           same with float8_e4m3fn codes, float32 accumulator of
                               per-128-K-tile partial sums
smooth_quantize_reference      ``quantize_tensor(x / smooth, scheme)`` (per-token scales)
=============================  ==========================================================

Accumulation is float32 (int32 for int8 codes); the result is rounded once to the output
dtype. The only roundings besides that one are those a kernel cannot avoid: the dequantized
weight of the W-only matmul is rounded to ``x.dtype`` because the tensor cores multiply in
that dtype (as ``QuantLinear`` does on CPU: ``F.linear(x, W.to(x.dtype))``).
"""

from __future__ import annotations

import torch

from quantkit import reference
from quantkit.packing import unpack_codes
from quantkit.scales import decode_scales
from quantkit.scheme import QuantScheme

# K-span of one fp8 partial sum before it joins the float32 accumulator. Hopper's fp8 tensor
# cores keep a reduced-precision running sum (about 14 bits, DeepSeek-V3 report sec. 3.3.2);
# like DeepSeek-V3 and DeepGEMM the kernels promote it to float32 every 128 products along K
# (four wgmma k32 steps), so the reduced precision never spans more than one K-tile.
FP8_PROMOTE_K = 128


def unpack_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    scheme: QuantScheme,
    in_features: int,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ``(out, in)``, scales ``(out|1, G|1)`` float32 and zeros (int32 or None) of
    :class:`quantkit.quant_linear.QuantLinear` storage.

    ``qweight (out, ceil(in / 8) * bits)`` uint8 and ``qzeros (out|1, ceil(G / 8) * bits)`` uint8
    are packed by :mod:`quantkit.packing`; codes are signed for signed integer grids. ``scales``
    are in the scheme's scale format (decoded by :func:`quantkit.scales.decode_scales`, with the
    per-tensor ``global_scale`` of e4m3 formats).
    """
    signed = scheme.dtype.is_int and not scheme.unsigned
    codes = unpack_codes(qweight, scheme.bits, in_features, signed)  # (out, in)
    zero = None
    if scheme.has_zero:
        if qzeros is None:
            raise ValueError(f"qzeros is required: {scheme.describe()} has a zero point")
        groups = scheme.scale_shape(codes.shape[0], in_features)[1]  # all groups, unbroadcast
        zero = unpack_codes(qzeros, scheme.bits, groups, signed).to(torch.int32)
    return codes, decode_scales(scales, scheme.scale_format, global_scale), zero


def quant_linear_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    in_features: int,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W-only dequant GEMM: ``y = x @ dequant(W).T + bias`` in ``x.dtype``.

    Args:
        x: ``(M, K)`` float16 / bfloat16 / float32 activations, ``K == in_features``.
        qweight: ``(N, ceil(K / 8) * bits)`` uint8 packed codes of ``W (N, K)``.
        scales: ``scheme.scale_shape(N, K)`` (size-1 dims broadcast) in the scheme's scale format:
            float16/bfloat16/float32 values, or uint8 e8m0 / e4m3 codes.
        qzeros: ``(N|1, ceil(G / 8) * bits)`` uint8 packed zero points when ``scheme.has_zero``.
        bias: ``(N,)`` or None.
        global_scale: ``(1, 1)`` float32, the per-tensor scale of e4m3 scale formats.

    Returns:
        ``(M, N)`` of ``x.dtype``: ``(x.float() @ W.to(x.dtype).float().T + bias.float())``
        rounded once to ``x.dtype``.
    """
    codes, scale, zero = unpack_weight(qweight, scales, qzeros, scheme, in_features, global_scale)
    w = reference.dequantize(codes, scale, zero, scheme, out_dtype=x.dtype)  # (N, K)
    y = x.float() @ w.float().T  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int_matmul_accumulate(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact ``xq (M, K) @ wq (N, K).T`` of int8 codes as ``(M, N)`` int32."""
    # float64 is exact here (|sum| <= 2**14 * K < 2**53) and, unlike integer matmuls, exists
    # on every device and shape (torch._int_mm needs CUDA and multiples of 8)
    return (xq.double() @ wq.double().T).to(torch.int32)


def scaled_epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``((acc.float() * sx) * sw.T + bias)`` rounded to ``out_dtype``, fp32 in this order.

    ``x_scale`` is ``(M, 1)`` or ``(1, 1)``, ``w_scale`` ``(N, 1)`` or ``(1, 1)``, ``bias (N,)``.
    """
    y = acc.float() * x_scale.float()  # (M, N)
    y = y * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_matmul_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """W8A8: ``y = (xq @ wq.T) * sx * sw.T + bias``.

    Args:
        xq: ``(M, K)`` int8 activation codes; ``x_scale`` ``(M, 1)`` per token or ``(1, 1)``.
        wq: ``(N, K)`` int8 weight codes; ``w_scale`` ``(N, 1)`` per channel or ``(1, 1)``.
        bias: ``(N,)`` or None.
        out_dtype: float16 / bfloat16 / float32, or int32 for the raw accumulator (no scales,
            no bias).

    Returns:
        ``(M, N)`` of ``out_dtype``.
    """
    acc = int_matmul_accumulate(xq, wq)  # (M, N) int32
    if out_dtype == torch.int32:
        return acc
    return scaled_epilogue(acc, x_scale, w_scale, bias, out_dtype)


def fp8_matmul_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """fp8 e4m3fn GEMM: ``y = (value(xq) @ value(wq).T) * sx * sw.T + bias``.

    The K sum is formed as the kernels form it: one partial sum per :data:`FP8_PROMOTE_K`-wide
    K-tile, rounded once to float32 and added to a float32 accumulator in ascending K order::

        acc = 0;  for each K-tile t: acc = acc + float32(sum_{k in t} x[m, k] * w[n, k])

    The tile sums are exact here (float64: products of two e4m3 values are multiples of 2**-18
    below 2**18, so 128 of them need at most 43 bits).

    Args:
        xq: ``(M, K)`` torch.float8_e4m3fn codes (or their uint8 bit patterns).
        wq: ``(N, K)`` the same for the weight. Scales and bias as
            :func:`int8_matmul_reference`.
        out_dtype: float16 / bfloat16 / float32.

    Returns:
        ``(M, N)`` of ``out_dtype``. Kernels round the tile sums differently (the interpreter
        sums a tile in float32; Hopper tensor cores keep a reduced-precision partial sum):
        compare with a tolerance, exactly only where every tile sum fits float32.
    """
    xv = as_float8(xq).double()  # (M, K), exact
    wv = as_float8(wq).double()  # (N, K)
    acc = torch.zeros(xv.shape[0], wv.shape[0], dtype=torch.float32, device=xv.device)
    for k0 in range(0, xv.shape[1], FP8_PROMOTE_K):
        k1 = k0 + FP8_PROMOTE_K
        acc = acc + (xv[:, k0:k1] @ wv[:, k0:k1].T).float()  # (M, N)
    return scaled_epilogue(acc, x_scale, w_scale, bias, out_dtype)


def as_float8(t: torch.Tensor) -> torch.Tensor:
    """View uint8 bit patterns as ``torch.float8_e4m3fn``; fp8 tensors pass through."""
    return t.view(torch.float8_e4m3fn) if t.dtype == torch.uint8 else t


def smooth_quantize_reference(
    x: torch.Tensor, smooth: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SmoothQuant scaling then dynamic per-token quantization.

    ``x (M, K)`` (any float dtype) is divided by ``smooth (K,)`` in float32 (one correctly
    rounded division, no rounding back to ``x.dtype``), then quantized with one scale per row:
    ``reference.quantize_tensor(x.float() / smooth.float(), scheme)``.

    Returns:
        ``codes (M, K)`` (int8 for signed integer grids, else uint8), ``scale (M, 1)`` float32,
        ``zero (M, 1)`` int32 when ``scheme.has_zero`` else None.
    """
    check_per_row(scheme)
    return reference.quantize_tensor(x.float() / smooth.float().reshape(1, -1), scheme)


def check_per_row(scheme: QuantScheme) -> None:
    """Dynamic activation quantization here has one scale per row (per_token / per_channel)."""
    if scheme.granularity not in ("per_token", "per_channel"):
        raise ValueError(
            f"scheme must have one scale per row (per_token), got {scheme.describe()}"
        )

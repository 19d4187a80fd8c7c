"""Quantization ops: validate once, then run the Triton kernel or the torch reference.

``backend="auto"`` runs the Triton kernel for CUDA tensors and the torch reference
(:mod:`quantkit.reference`, :mod:`quantkit.packing`) for CPU tensors. ``backend="triton"``
forces the kernel (on CPU this needs ``TRITON_INTERPRET=1``: that is how the tests run
kernels without a GPU); ``backend="torch"`` forces the reference. Both give the same codes,
scales and zeros bit for bit.

Inputs are ``(..., cols)`` and are quantized as ``(rows, cols)`` with leading dims flattened.

The fused low-bit matmuls (:func:`quant_linear_matmul`, :func:`int8_matmul`,
:func:`fp8_matmul`, :func:`smooth_quantize_per_token`) dispatch the same way; their torch
references (:mod:`quantkit.matmul_reference`) agree with the kernels bit for bit where the
math is exact (int32 accumulators, codes, scales) and up to fp32 summation order otherwise.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from quantkit import matmul_reference, packing, reference
from quantkit.scheme import QuantScheme

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
QParams = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def use_triton(t: torch.Tensor, backend: Backend) -> bool:
    """Whether ``backend`` selects the Triton kernel for tensor ``t``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before "
                "quantkit.kernels is imported"
            )
        return True
    return t.is_cuda


def check_input(x: torch.Tensor, name: str = "x", check_finite: bool = True) -> None:
    """Reject non-float, empty or non-finite tensors with an error naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with at least 1 dim, got shape {tuple(x.shape)}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; they cannot be quantized")


def quantize(
    x: torch.Tensor, scheme: QuantScheme, backend: Backend = "auto", check_finite: bool = True
) -> QParams:
    """Compute scale/zero from ``x`` and quantize it: ``(codes (rows, cols), scale, zero)``."""
    check_input(x, "x", check_finite)
    scheme.scale_shape(*reference.as_rows(x).shape)  # validates groupsize against cols
    if use_triton(x, backend):
        from quantkit.kernels.quantize import quantize as triton_quantize

        return triton_quantize(reference.as_rows(x), scheme)
    return reference.quantize_tensor(x, scheme)


def quantize_with_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Quantize ``x`` with given (e.g. statically calibrated) ``scale``/``zero``."""
    check_input(x, "x", check_finite=False)
    if use_triton(x, backend):
        from quantkit.kernels.quantize import quantize_with_qparams as triton_qwq

        return triton_qwq(reference.as_rows(x), scale, zero, scheme)
    return reference.quantize(x, scale, zero, scheme)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    out_dtype: torch.dtype = torch.float32,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Values of ``codes (rows, cols)`` in ``out_dtype``."""
    if use_triton(codes, backend):
        from quantkit.kernels.dequantize import dequantize as triton_dequantize

        return triton_dequantize(codes, scale, zero, scheme, out_dtype)
    return reference.dequantize(codes, scale, zero, scheme, out_dtype)


def fake_quantize(
    x: torch.Tensor, scheme: QuantScheme, backend: Backend = "auto", check_finite: bool = True
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in the shape and dtype of ``x``."""
    codes, scale, zero = quantize(x, scheme, backend, check_finite)
    return dequantize(codes, scale, zero, scheme, x.dtype, backend).reshape(x.shape)


def pack_codes(codes: torch.Tensor, bits: int, backend: Backend = "auto") -> torch.Tensor:
    """Pack ``codes (rows, cols)`` into ``(rows, ceil(cols/8)*bits)`` uint8."""
    if use_triton(codes, backend):
        from quantkit.kernels.pack import pack_codes as triton_pack

        return triton_pack(codes, bits)
    return packing.pack_codes(codes, bits)


def unpack_codes(
    packed: torch.Tensor, bits: int, cols: int, signed: bool, backend: Backend = "auto"
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    if use_triton(packed, backend):
        from quantkit.kernels.pack import unpack_codes as triton_unpack

        return triton_unpack(packed, bits, cols, signed)
    return packing.unpack_codes(packed, bits, cols, signed)


def quant_linear_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: QuantScheme,
    backend: Backend = "auto",
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W-only low-bit linear: ``x (..., K) @ dequant(qweight, scales, qzeros).T + bias``.

    ``qweight``/``scales``/``qzeros``/``bias``/``global_scale`` are
    :class:`quantkit.quant_linear.QuantLinear` buffers (``K = x.shape[-1]``; ``scales`` in the
    scheme's scale format, ``global_scale`` for e4m3 scales); returns ``(..., N)`` in ``x.dtype``.
    """
    check_input(x, "x", check_finite=False)
    x2 = reference.as_rows(x)  # (M, K)
    if use_triton(x, backend):
        from quantkit.kernels.matmul import quant_linear_matmul as triton_matmul

        y = triton_matmul(x2, qweight, scales, qzeros, bias, scheme, global_scale=global_scale)
    else:
        y = matmul_reference.quant_linear_matmul_reference(
            x2, qweight, scales, qzeros, bias, scheme, x.shape[-1], global_scale
        )
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    backend: Backend = "auto",
) -> torch.Tensor:
    """W8A8: ``(xq (M, K) @ wq (N, K).T) * x_scale * w_scale.T + bias`` -> ``(M, N)``.

    Scales: ``x_scale (M, 1)|(1, 1)``, ``w_scale (N, 1)|(1, 1)``; ``out_dtype=torch.int32``
    returns the exact int32 accumulator.
    """
    if use_triton(xq, backend):
        from quantkit.kernels.int8_matmul import int8_matmul as triton_int8_matmul

        return triton_int8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype)
    return matmul_reference.int8_matmul_reference(xq, x_scale, wq, w_scale, bias, out_dtype)


def fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    backend: Backend = "auto",
) -> torch.Tensor:
    """fp8 e4m3fn GEMM: codes as ``torch.float8_e4m3fn`` or uint8 bit patterns; scales and
    shapes as :func:`int8_matmul`; fp32 accumulation."""
    if use_triton(xq, backend):
        from quantkit.kernels.fp8_matmul import fp8_matmul as triton_fp8_matmul

        return triton_fp8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype)
    return matmul_reference.fp8_matmul_reference(xq, x_scale, wq, w_scale, bias, out_dtype)


def smooth_quantize_per_token(
    x: torch.Tensor, smooth: torch.Tensor, scheme: QuantScheme, backend: Backend = "auto"
) -> QParams:
    """``quantize(x / smooth)`` with one scale per token: ``x (..., K)``, ``smooth (K,)`` ->
    ``(codes (rows, K), scale (rows, 1) float32, zero (rows, 1) int32 | None)``."""
    check_input(x, "x", check_finite=False)
    if scheme.scale_format not in ("float16", "float32"):
        raise ValueError(f"smooth_quantize_per_token computes float scales; {scheme.describe()} has "
                         f"{scheme.scale_format} scales (use ops.quantize on x / smooth)")
    x2 = reference.as_rows(x)  # (rows, K)
    if use_triton(x, backend):
        from quantkit.kernels.smooth_quant import smooth_quantize_per_token as triton_smooth

        return triton_smooth(x2, smooth, scheme)
    return matmul_reference.smooth_quantize_reference(x2, smooth, scheme)

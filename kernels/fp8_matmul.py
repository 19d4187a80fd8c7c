"""fp8 (e4m3fn) GEMM with per-token / per-channel (or per-tensor) scales.

Math (the reference is :func:`quantkit.matmul_reference.fp8_matmul_reference`)::

    acc[m, n] = sum_k value(xq[m, k]) * value(wq[n, k])     fp32 accumulation (tl.dot on fp8)
    y[m, n]   = ((acc * sx[m]) * sw[n]) + bias[n]            fp32 in this order, rounded once

Shapes and dtypes::

    xq       (M, K)          torch.float8_e4m3fn codes, or their uint8 bit patterns (the
                             storage of quantkit's ``fp8`` scheme: reinterpreted, not copied)
    x_scale  (M, 1) | (1, 1) float32: per token or per tensor
    wq       (N, K)          the same for the weight
    w_scale  (N, 1) | (1, 1) float32: per channel or per tensor
    bias     (N,)            any float dtype, optional
    out      (M, N)          float16 / bfloat16 / float32

Each product of two e4m3 values is exact in fp32; the sum is fp32 in tile order (compare with
a tolerance). Hopper runs the dot on fp8 tensor cores (wgmma); Ampere has no fp8 dot (Triton
rejects fp8e4nv there). The kernel is :func:`quantkit.kernels.int8_matmul._scaled_mm_kernel`
with an fp32 accumulator; tiles as :func:`quantkit.kernels.int8_matmul.scaled_mm_config`.
"""

from __future__ import annotations

import torch

from quantkit.kernels.int8_matmul import OUT_DTYPES, scaled_mm
from quantkit.kernels.matmul import MatmulConfig


def fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``y = (value(xq) @ value(wq).T) * x_scale * w_scale.T + bias`` with fp32 accumulation.

    Args:
        xq: ``(M, K)`` float8_e4m3fn (or uint8 bit patterns) on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        x_scale: ``(M, 1)`` or ``(1, 1)`` float32.
        wq: ``(N, K)`` float8_e4m3fn or uint8; ``w_scale``: ``(N, 1)`` or ``(1, 1)`` float32.
        bias: ``(N,)`` float tensor or None.
        out_dtype: float16 / bfloat16 / float32.
        config: tiles instead of the default (``block_m >= 16``).

    Returns:
        ``(M, N)`` of ``out_dtype``.
    """
    return scaled_mm(
        _as_e4m3(xq, "xq"), x_scale, _as_e4m3(wq, "wq"), w_scale, bias, out_dtype,
        code_dtype=torch.float8_e4m3fn, out_dtypes=OUT_DTYPES, config=config,
    )


def _as_e4m3(t: object, name: str) -> object:
    """uint8 bit patterns viewed as float8_e4m3fn; anything else is left to validation."""
    if isinstance(t, torch.Tensor) and t.dtype == torch.uint8:
        return t.view(torch.float8_e4m3fn)
    return t

"""fp8 (e4m3fn) GEMM with per-token / per-channel (or per-tensor) scales.

Math (the reference is :func:`quantkit.matmul_reference.fp8_matmul_reference`)::

    part[m, n, t] = sum_{k in K-tile t} value(xq[m, k]) * value(wq[n, k])   t = k // 128
    acc[m, n]     = (((0 + part[.., 0]) + part[.., 1]) + ...)               fp32, ascending t
    y[m, n]       = ((acc * sx[m]) * sw[n]) + bias[n]                        fp32 in this order

Shapes and dtypes::

    xq       (M, K)          torch.float8_e4m3fn codes, or their uint8 bit patterns (the
                             storage of quantkit's ``fp8`` scheme: reinterpreted, not copied)
    x_scale  (M, 1) | (1, 1) float32: per token or per tensor
    wq       (N, K)          the same for the weight
    w_scale  (N, 1) | (1, 1) float32: per channel or per tensor
    bias     (N,)            any float dtype, optional
    out      (M, N)          float16 / bfloat16 / float32

The kernel is :func:`quantkit.kernels.int8_matmul._scaled_mm_kernel` with an fp32 accumulator.

**Operands.** On the GPU the codes reach the kernel as ``float8_e4m3fn`` (pointer type
``fp8e4nv``): tiles go from global to shared memory (cp.async) and straight into the wgmma,
with no conversion or register round trip. Only the Triton interpreter gets the uint8 bit
patterns, bitcast in registers (it cannot load fp8 with a zero fill for masked lanes).

**Accumulation precision.** Hopper's fp8 wgmma accumulates in a reduced-precision adder
(DeepSeek-V3 measured about 14 kept bits on H800), and Triton 3.9 lets it run over the whole K
loop unless told otherwise (``max_num_imprecise_acc = 2**30``). Like DeepSeek-V3/DeepGEMM and
CUTLASS's default fp8 kernels (promotion interval 4 MMAs), the kernel promotes every
:data:`quantkit.matmul_reference.FP8_PROMOTE_K` = 128 products along K: each 128-deep K-tile
starts a fresh tensor-core partial sum (four wgmma k32 steps) that is then added to the fp32
accumulator with an FADD (``tl.dot(..., max_num_imprecise_acc=128)``). The reduced precision
thus never spans more than one tile; the cost is one FADD per output element per tile and a
wgmma wait before it (sm90 SASS of the 128x128 tile: 4 QGMMA + 64 FADD per thread per tile).

**Identical numerics for every M.** A row's result never depends on how many rows are
multiplied with it: :func:`quantkit.kernels.int8_matmul.fp8_mm_config` uses for every ``M``
the same instruction (wgmma ``e4m3 x e4m3 -> f32``, k32; ``BLOCK_M >= 64`` because Triton
runs smaller fp8 tiles as fp16 mma.sync on upcast operands), the same 128-deep K-tiles in
ascending order with the same promotion, and no split-K (a split would add the tiles in
another order). Only ``BLOCK_M``/``BLOCK_N`` follow the shape, which changes which output
elements a program owns, not how one is summed. The price: decode-sized ``M`` on narrow
layers cannot split K to fill the GPU; ``BLOCK_N`` shrinks (to 16) instead.
:func:`quantkit.kernels.int8_matmul.check_scaled_mm_config` rejects explicit configs that
would break this (``block_m < 64``, ``block_k`` not a multiple of 128, ``split_k > 1``).

Exactness: the interpreter sums each tile in fp32 (not exactly rounded) and the GPU in its
reduced-precision partial sum, so compare with a tolerance; where every tile sum fits fp32
(e.g. integer-valued codes) kernel and reference agree bit for bit. Ampere has no fp8 dot
(Triton rejects fp8e4nv there).
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
        config: tiles instead of the default (``block_m >= 64``, ``block_k`` a multiple of
            128, ``split_k == 1``: see the module docstring).

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

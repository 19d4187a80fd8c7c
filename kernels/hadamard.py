"""Fast Walsh-Hadamard transform of batched rows, optionally fused with per-token quantization.

Math (bit-exact with :func:`quantkit.hadamard.hadamard_transform_reference` and, fused, with
:func:`quantkit.hadamard.hadamard_quantize_reference`)::

    y = mix_chunks(x, A_K)            torch, float32: A_K^T X per row (X = the row as (K, P));
                                      the row itself when K = 1
    for h in 1, 2, 4, ..., P / 2:     butterflies inside every length-P chunk of y, fp32:
        (y[i], y[i + h]) <- (y[i] + y[i + h], y[i] - y[i + h])    for i & h == 0
    y = y * fp32(1 / sqrt(K * P))
    out = y in x.dtype                (hadamard_transform)
    codes, scale, zero = per-row quantization of y (fp32, never rounded in between), with the
                                      arithmetic of quantkit.kernels.quantize (hadamard_quantize)

Every stage is the same fp32 additions in the same order as the reference, so outputs, codes
and scales match it exactly. The chunk mix is a small matmul done by torch for both paths (it
is what makes widths such as 1536 = 12 x 128 or 11008 = 172 x 64 work); the kernel only sees
power-of-two chunks ``P <= 16384``.

Shapes and dtypes::

    x      (rows, K * P)   float16 / bfloat16 / float32, last dim contiguous (the mixed rows
                           are float32)
    out    (rows, K * P)   x.dtype
    codes  (rows, K * P)   int8 (signed int grids) or uint8, fused path only
    scale  (rows, 1)       float32;  zero (rows, 1) int32 when the scheme has a zero point

Tiling. A program owns ``BLOCK_M`` rows x ``BLOCK_C`` chunks, held as a ``(BLOCK_M * BLOCK_C,
P)`` fp32 tile; each butterfly stage views it as ``(R, P / 2h, 2, h)``, moves the pair axis
last (``permute``), ``split``s it into ``a, b`` and ``join``s ``(a + b, a - b)`` back: the
whole transform stays in registers (``log2 P`` stages, no memory traffic between them).
About 4K elements per program on a GPU (16K for a whole row when quantizing), chunk blocks on
a second grid axis for long rows. The fused kernel needs a whole row per program (``K * P <=
16384`` on a GPU, padded ``K`` counted); longer rows are transformed, then quantized by
:mod:`quantkit.kernels.quantize`. Memory bound: ``rows * n * (in + out bytes)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.hadamard import MAX_CHUNK, is_power_of_two, mix_chunks, norm_scale
from quantkit.kernels._launch import Launch, Target, run_all
from quantkit.kernels.quantize import (
    check_matrix,
    check_scheme,
    codes_dtype,
    plan_quantize,
    quantize_values,
    scale_zero_from_minmax,
    scheme_constexprs,
)
from quantkit.scheme import QuantScheme

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GPU_TILE = 4096  # elements of one program (transform only)
_GPU_MAX_ROW = 16384  # longest (padded) row quantized from registers by one program
_INTERPRET_TILE = 1 << 16
_INTERPRET_MAX_ROW = 1 << 16


@triton.jit
def _fwht(y, ROWS: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform of every row of ``y (ROWS, P)`` (fp32)."""
    for s in tl.static_range(LOG_P):  # stage h = 2**s
        pairs = tl.reshape(y, (ROWS, P >> (s + 1), 2, 1 << s))  # (ROWS, pairs, 2, h)
        pairs = tl.permute(pairs, (0, 1, 3, 2))  # (ROWS, pairs, h, 2)
        a, b = tl.split(pairs)  # (ROWS, pairs, h) each
        pairs = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))  # (ROWS, pairs, 2, h)
        y = tl.reshape(pairs, (ROWS, P))
    return y


@triton.jit
def _hadamard_kernel(
    # pointers
    x_ptr, out_ptr, codes_ptr, scale_ptr, zero_ptr,
    # sizes
    rows, chunks,
    # strides
    stride_xm, stride_om, stride_cm,
    # the normalization 1 / sqrt(K * P), fp32
    norm,
    # quantization
    IS_FLOAT: tl.constexpr, HAS_ZERO: tl.constexpr, UNSIGNED: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr,
    EXP_BITS: tl.constexpr, MANT_BITS: tl.constexpr, BIAS: tl.constexpr,
    MAX_VALUE: tl.constexpr, ABSMAX_CODE: tl.constexpr,
    # meta
    QUANTIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    P: tl.constexpr, LOG_P: tl.constexpr,
):
    """Transform ``BLOCK_M`` rows x ``BLOCK_C`` chunks (grid axis 1 walks the chunk blocks);
    ``QUANTIZE``: the program holds whole rows (``BLOCK_C >= chunks``) and writes codes and a
    scale per row instead of the transformed values."""
    R: tl.constexpr = BLOCK_M * BLOCK_C
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = tl.arange(0, R)  # (R,) tile row = (row, chunk)
    offs_p = tl.arange(0, P)  # (P,)
    row = pid_m * BLOCK_M + offs_r // BLOCK_C  # (R,)
    chunk = pid_c * BLOCK_C + offs_r % BLOCK_C  # (R,)
    ok = (row < rows) & (chunk < chunks)  # (R,)
    row64 = row.to(tl.int64)  # row * stride can exceed 2**31
    cols = chunk[:, None] * P + offs_p[None, :]  # (R, P)
    # padding reads 0: its transform is 0, which never changes min(y, 0) / max(y, 0)
    x = tl.load(x_ptr + row64[:, None] * stride_xm + cols, mask=ok[:, None], other=0.0).to(tl.float32)
    y = _fwht(x, R, P, LOG_P) * norm  # (R, P) fp32

    if QUANTIZE:
        y2 = tl.reshape(y, (BLOCK_M, BLOCK_C * P))  # (BLOCK_M, row) in memory order
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        m_ok = offs_m < rows
        lo = tl.minimum(tl.min(y2, axis=1), 0.0)  # (BLOCK_M,)
        hi = tl.maximum(tl.max(y2, axis=1), 0.0)
        scale, zero = scale_zero_from_minmax(lo, hi, HAS_ZERO, UNSIGNED, QMIN, QMAX, ABSMAX_CODE)
        tl.store(scale_ptr + offs_m, scale, mask=m_ok)
        if HAS_ZERO:
            tl.store(zero_ptr + offs_m, zero, mask=m_ok)
        code = quantize_values(
            y2,
            tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_C * P)),
            tl.broadcast_to(zero[:, None], (BLOCK_M, BLOCK_C * P)),
            IS_FLOAT, HAS_ZERO, QMIN, QMAX, EXP_BITS, MANT_BITS, BIAS, MAX_VALUE,
        )  # (BLOCK_M, BLOCK_C * P) int32
        offs_n = tl.arange(0, BLOCK_C * P)
        mask = m_ok[:, None] & (offs_n < chunks * P)[None, :]
        c_ptrs = codes_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, code.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        o_ptrs = out_ptr + row64[:, None] * stride_om + cols
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=ok[:, None])


# ----------------------------------------------------------------------------------------------
# planners (tiles and grids for a Target, no validation) and the public launchers
# ----------------------------------------------------------------------------------------------


def _tiles(rows: int, chunks: int, chunk: int, target: Target, whole_rows: bool) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_C, num_warps)``: about a tile of elements per program."""
    tile = (_GPU_MAX_ROW if whole_rows else _GPU_TILE) if target.gpu else _INTERPRET_TILE
    padded = triton.next_power_of_2(chunks)
    block_c = padded if whole_rows else max(1, min(padded, tile // chunk))
    block_m = max(1, min(tile // (block_c * chunk), triton.next_power_of_2(rows)))
    warps = min(16, max(4, block_m * block_c * chunk // 1024)) if target.gpu else 4
    return block_m, block_c, warps


def fuses_quantization(n: int, chunks: int, target: Target) -> bool:
    """Whether one program can hold a whole (padded) row to quantize it after the transform."""
    limit = _GPU_MAX_ROW if target.gpu else _INTERPRET_MAX_ROW
    return triton.next_power_of_2(chunks) * (n // chunks) <= limit


def plan_hadamard(
    x: torch.Tensor, chunks: int, out_dtype: torch.dtype, target: Target,
    scheme: QuantScheme | None = None,
) -> tuple[tuple[torch.Tensor, ...], list[Launch]]:
    """Outputs and launches for ``x (rows, chunks * P)`` (already chunk-mixed, last dim
    contiguous; may be on ``meta``): ``(out,)`` without ``scheme``, else ``(codes, scale,
    zero)`` (the fused kernel, or the transform into a float32 buffer then the quantize kernel
    when a row is too long for one program)."""
    rows, n = x.shape
    chunk = n // chunks
    dev = x.device
    consts = dict(QMIN=0.0, QMAX=0.0, IS_FLOAT=False, HAS_ZERO=False, UNSIGNED=False, EXP_BITS=0,
                  MANT_BITS=0, BIAS=0, MAX_VALUE=0.0, ABSMAX_CODE=0.0)
    fused = scheme is not None and fuses_quantization(n, chunks, target)
    if scheme is not None and not fused:
        (y,), launches = plan_hadamard(x, chunks, torch.float32, target)
        codes, scale, zero, quantize = plan_quantize(y, scheme, target)
        return (codes, scale, zero), launches + quantize
    if fused:
        consts = scheme_constexprs(scheme)
        codes = torch.empty(rows, n, dtype=codes_dtype(scheme), device=dev)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=dev)
        zero = torch.empty(rows, 1, dtype=torch.int32, device=dev) if scheme.has_zero else None
        out, outputs = codes, (codes, scale, zero)
    else:
        out = torch.empty(rows, n, dtype=out_dtype, device=dev)
        scale, zero, outputs = out, None, (out,)
    block_m, block_c, warps = _tiles(rows, chunks, chunk, target, fused)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(chunks, block_c))
    args = (
        x, out, out, scale, scale if zero is None else zero,  # unused pointers alias real ones
        rows, chunks,
        x.stride(0), out.stride(0), out.stride(0),
        norm_scale(n),
    )
    constexprs = dict(consts, QUANTIZE=fused, BLOCK_M=block_m, BLOCK_C=block_c, P=chunk,
                      LOG_P=chunk.bit_length() - 1)
    return outputs, [Launch(_hadamard_kernel, grid, args, constexprs, num_warps=warps)]


def _prepare(x: torch.Tensor, had_k: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Validate, then the rows the kernel reads (chunk-mixed in float32 where ``K > 1``)."""
    x = check_matrix(x, "x", X_DTYPES)
    n = x.shape[1]
    k = 1 if had_k is None else had_k.shape[0]
    if had_k is not None and (had_k.dim() != 2 or had_k.shape[1] != k or had_k.device != x.device):
        raise ValueError(f"had_k must be a square (K, K) matrix on {x.device}, got "
                         f"{tuple(had_k.shape)} on {had_k.device}")
    if n % k or not is_power_of_two(n // k) or n // k > MAX_CHUNK:
        raise ValueError(f"width {n} must be K x P with K={k} (had_k) and P a power of two <= {MAX_CHUNK}")
    x = mix_chunks(x, had_k) if k > 1 else x
    return (x if x.stride(1) == 1 else x.contiguous()), k


def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor | None) -> torch.Tensor:
    """``x (rows, n) @ H_n`` in ``x.dtype`` (see the module doc); ``had_k (K, K)`` +-1 is the
    chunk-mix matrix (None: ``n`` is a power of two). CUDA tensors, or CPU under
    ``TRITON_INTERPRET=1``."""
    out_dtype = x.dtype if isinstance(x, torch.Tensor) else None
    y, chunks = _prepare(x, had_k)
    (out,), launches = plan_hadamard(y, chunks, out_dtype, Target.of(y.device))
    run_all(launches, y.device)
    return out


def hadamard_quantize(
    x: torch.Tensor, had_k: torch.Tensor | None, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``quantize_tensor(x @ H_n, scheme)`` with one scale per row, the transform and the
    quantization in one kernel where a row fits a program: ``(codes (rows, n), scale (rows, 1)
    float32, zero (rows, 1) int32 | None)``."""
    scheme = check_scheme(scheme)
    if scheme.granularity not in ("per_token", "per_channel"):
        raise ValueError(f"the fused Hadamard quantization has one scale per row; got {scheme.describe()}")
    y, chunks = _prepare(x, had_k)
    (codes, scale, zero), launches = plan_hadamard(y, chunks, torch.float32, Target.of(y.device), scheme)
    run_all(launches, y.device)
    return codes, scale, zero

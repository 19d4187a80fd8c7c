"""SmoothQuant's alpha chosen per linear group on the calibration data (``algo.alpha=auto``).

One ``alpha`` for a whole model is a compromise: the outlier channels differ between the
attention input, the MLP input and ``down_proj``'s input, and between the first and the last
blocks. The published auto-tuning (Intel Neural Compressor's layer-wise ``alpha='auto'``, the
SmoothQuant authors' per-model sweeps) picks alpha where the *quantized* layer reproduces the
full-precision output best. Here, per group of linears that share one smoothing vector (q/k/v
after ``input_layernorm``, gate/up after ``post_attention_layernorm``, ``down_proj`` after
``up_proj``, ...), every ``alpha`` of the grid is tried:

    s      = smooth_scales(max|X|, max|W|, alpha)                      (in,)
    loss   = sum_k || X W_k^T + b_k - O( A_k(X / s) Q_k(W_k * s)^T + b_k ) ||^2

with ``Q_k`` the round-to-nearest weight quantizer of linear ``k`` (its own scheme, storage-
rounded scales: exactly what :class:`~quantkit.quant_linear.QuantLinear` will hold), ``A_k``
its activation quantizer (dynamic per token, or static per tensor with the scale of the
*smoothed* calibration range, as the run will calibrate it), ``O`` the output quantizer of
``quant_out`` (identity otherwise). ``X`` is an evenly strided subsample of the calibration
tokens (``algo.max_tokens`` rows, :class:`~quantkit.algorithms.awq.AWQObserver`); ``max|X|``
and the static range come from every token. The smallest loss wins; ties keep the earlier
grid value. The losses are summed over the group's linears, as Neural Compressor combines the
losses of the layers behind one norm ("shared criterion").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from quantkit import reference
from quantkit.algorithms.awq import fake_quantize_weight
from quantkit.layers import LayerScheme
from quantkit.scheme import QuantScheme

# The grid Neural Compressor searches by default (alpha_min 0, alpha_max 1, alpha_step 0.1).
DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


def _fake_quantize_input(x: torch.Tensor, scheme: QuantScheme | None, lo: torch.Tensor | None,
                         hi: torch.Tensor | None) -> torch.Tensor:
    """``x (tokens, in)`` through the activation quantizer of a QuantLinear with ``scheme``:
    per-token scales from ``x`` itself, or (static, per_tensor) one scale from the calibrated
    range ``lo, hi (in,)`` of the inputs the linear reads."""
    if scheme is None:
        return x
    if scheme.granularity != "per_tensor":
        return reference.fake_quantize(x, scheme)
    extremes = torch.stack([lo.min(), hi.max()]).reshape(1, 2)
    scale, zero = reference.compute_qparams(extremes, scheme)  # (1, 1)
    return reference.dequantize(reference.quantize(x, scale, zero, scheme), scale, zero, scheme)


def alpha_losses(
    x: torch.Tensor,
    w: torch.Tensor,
    row_splits: Sequence[int],
    schemes: Sequence[LayerScheme],
    scales: Callable[[float], torch.Tensor],
    grid: Sequence[float],
    bias: torch.Tensor | None = None,
    act_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """The group's summed squared output error (see the module doc) for every ``alpha`` of ``grid``.

    Args:
        x: ``(tokens, in)`` calibration inputs of the group (a subsample).
        w: ``(sum_out, in)`` the group's weights, concatenated along rows (``row_splits`` rows
            per linear, ``schemes`` one per linear).
        scales: ``alpha -> s (in,)``, the smoothing vector of the group for that alpha
            (:func:`~quantkit.algorithms.smoothquant.smooth_scales` of the full ranges).
        bias: ``(sum_out,)`` the concatenated biases (None: no bias).
        act_range: ``(lo, hi)`` per-channel range ``(in,)`` over every calibration token, needed
            where a scheme has static (per_tensor) activation scales.
    """
    x, w = x.float(), w.float()
    splits = list(row_splits)
    ref = x @ w.T  # (tokens, sum_out)
    if bias is not None:
        ref = ref + bias.float()
    losses = []
    for alpha in grid:
        s = scales(alpha).float().to(x.device)  # (in,)
        xs = x / s  # (tokens, in)
        ws = w * s  # (sum_out, in)
        wq = torch.cat([ws_k if scheme.w is None else fake_quantize_weight(ws_k, scheme.w)
                        for ws_k, scheme in zip(ws.split(splits), schemes)])  # (sum_out, in)
        lo, hi = (act_range[0] / s, act_range[1] / s) if act_range is not None else (None, None)
        inputs: dict[QuantScheme | None, torch.Tensor] = {}  # one quantized input per distinct grid
        loss, start = 0.0, 0
        for rows, scheme in zip(splits, schemes):
            part = slice(start, start + rows)
            start += rows
            if scheme.a not in inputs:
                if scheme.a_static and act_range is None:
                    raise ValueError("static activation scales need act_range")
                inputs[scheme.a] = _fake_quantize_input(xs, scheme.a, lo, hi)
            y = inputs[scheme.a] @ wq[part].T  # (tokens, rows)
            if bias is not None:
                y = y + bias[part].float()
            if scheme.o is not None:
                y = reference.fake_quantize(y, scheme.o)
            loss += float(((y - ref[:, part]) ** 2).sum(dtype=torch.float64))
        losses.append(loss if math.isfinite(loss) else math.inf)
    return losses


def best_alpha(grid: Sequence[float], losses: Sequence[float]) -> float:
    """The ``alpha`` of the smallest loss; ties keep the earlier grid value."""
    best = min(range(len(grid)), key=lambda i: (losses[i], i))
    return float(grid[best])

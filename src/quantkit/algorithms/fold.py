"""Folding a per-input-channel scale into the module that produces a linear group's input.

AWQ and SmoothQuant make the linears of a group read ``x / s`` and multiply their weight
columns by ``s``: the full-precision function is unchanged, and there is no run-time divide
because the ``1 / s`` goes into the producer of ``x`` (a :class:`FoldTarget`):

- a norm computing ``normalize(x) * (offset + weight) + bias``: ``weight <- (offset + weight)
  / s - offset``, ``bias <- bias / s`` (``offset`` is 0 for LayerNorm/RMSNorm, 1 for Gemma's);
- a linear: its output rows (and bias), or only the rows of its last ``parts``-th when the
  group reads a per-channel function of that chunk (fused ``[gate; up]`` -> ``down_proj``
  reads ``act(gate) * up``, and ``act(gate) * (up / s) = (act(gate) * up) / s``).

Modules that also read ``x`` but stay in full precision (``readers``, a MoE router) get their
input columns multiplied by ``s``, so they compute what they computed before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.quant_linear import QuantLinear


@dataclass(frozen=True)
class FoldTarget:
    """The producer of a group's input (``module``) and the other full-precision ``readers``."""

    module: nn.Module
    norm_offset: float = 0.0  # a norm's output is normalize(x) * (norm_offset + weight)
    parts: int = 1  # a linear producer: the group reads (a function of) its last 1/parts of rows
    readers: tuple[nn.Module, ...] = ()


def fold_blocker(target: FoldTarget | None, linears: Sequence[nn.Module]) -> str | None:
    """Why a scale cannot be folded into ``target`` for these linears (None: it can)."""
    widths = {lin.in_features for lin in linears}
    if len(widths) != 1:
        return f"the group's linears read inputs of different widths {sorted(widths)}"
    (width,) = widths
    if target is None:
        return "no foldable producer of its input (prev=None)"
    prev = target.module
    if isinstance(prev, QuantLinear):
        return "its producer is already quantized (layer_sequential)"
    for reader in target.readers:
        weight = getattr(reader, "weight", None)
        if isinstance(reader, QuantLinear) or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
                or weight.shape[1] != width:
            return f"a full-precision reader ({type(reader).__name__}) of the input cannot absorb the scale"
    if isinstance(prev, nn.Linear):
        if prev.out_features != target.parts * width:
            chunk = "" if target.parts == 1 else f" = {target.parts} x {prev.out_features / target.parts:g}"
            return (f"producer width {prev.out_features}{chunk} does not match input width {width} "
                    "(grouped-query attention)")
        return None
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        return f"cannot fold a per-channel scale into {type(prev).__name__}"
    return None


@torch.no_grad()
def fold_scales(target: FoldTarget, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Divide the group's input by ``s (in,)`` at its producer and multiply the linears' (and
    readers') input columns by ``s``, in place: the full-precision function is unchanged."""
    reason = fold_blocker(target, linears)
    if reason is not None:
        raise ValueError(f"cannot fold scales: {reason}")
    s = s.float()
    prev = target.module
    width = s.shape[0]
    if isinstance(prev, nn.Linear):
        rows = slice(prev.out_features - width, prev.out_features)  # the last chunk
        prev.weight[rows] = prev.weight[rows].float() / s.to(prev.weight.device)[:, None]
        if prev.bias is not None:
            prev.bias[rows] = prev.bias[rows].float() / s.to(prev.bias.device)
    else:
        offset = target.norm_offset
        prev.weight.copy_((prev.weight.float() + offset) / s.to(prev.weight.device) - offset)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(bias.float() / s.to(bias.device))
    for module in (*linears, *target.readers):
        module.weight.copy_(module.weight.float() * s.to(module.weight.device))

"""Folding a per-input-channel scale into the module that produces a linear group's input.

AWQ and SmoothQuant make the linears of a group read ``x / s`` and multiply their weight
columns by ``s``: the full-precision function is unchanged, and there is no run-time divide
because the ``1 / s`` goes into the producer of ``x`` (a :class:`FoldTarget`):

- a norm computing ``normalize(x) * (offset + weight) + bias``: ``weight <- (offset + weight)
  / s - offset``, ``bias <- bias / s`` (``offset`` is 0 for LayerNorm/RMSNorm, 1 for Gemma's);
- a linear: its output rows (and bias), or only the rows of its last ``parts``-th when the
  group reads a per-channel function of that chunk (fused ``[gate; up]`` -> ``down_proj``
  reads ``act(gate) * up``, and ``act(gate) * (up / s) = (act(gate) * up) / s``);
- under grouped-query attention ``o_proj`` reads every value head once per query head that
  shares it (``num_key_value_groups`` copies), so ``v_proj`` has fewer output rows than
  ``o_proj`` has input columns. Attention mixes values per channel with weights that do not
  depend on them, so a scale on ``v_proj``'s rows still reaches ``o_proj``'s input exactly,
  once per copy: the fold needs ``s`` equal over the copies (:meth:`FoldTarget.share` makes it
  so) and divides ``v_proj``'s rows by one of them.

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
    # grouped-query attention: (query heads per KV head, head_dim); input channel
    # (h * head_dim + d) reads producer row ((h // repeat) * head_dim + d)
    heads: tuple[int, int] | None = None

    def share(self, v: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
        """``v (in,)`` made equal over the input channels that read one producer channel (the
        copies of a value head), reduced by ``amax`` or ``mean``; ``v`` itself without
        ``heads``. Scales computed from shared statistics can be folded."""
        if self.heads is None:
            return v
        repeat, dim = self.heads
        copies = v.reshape(-1, repeat, dim)  # (kv_heads, repeat, head_dim)
        if reduce == "amax":
            pooled = copies.amax(1, keepdim=True)
        elif reduce == "mean":
            pooled = copies.mean(1, keepdim=True)
        else:
            raise ValueError(f"reduce={reduce!r}: use amax or mean")
        return pooled.expand_as(copies).reshape(v.shape)

    def narrow(self, s: torch.Tensor) -> torch.Tensor:
        """The producer's share of ``s (in,)``: one value per producer channel (``s`` itself
        without ``heads``); an error where ``s`` differs between copies of a channel."""
        if self.heads is None:
            return s
        repeat, dim = self.heads
        copies = s.reshape(-1, repeat, dim)
        if not torch.equal(copies, copies[:, :1].expand_as(copies)):
            raise ValueError("cannot fold scales: they differ between the query heads that read one value head "
                             "(grouped-query attention); make them equal with FoldTarget.share")
        return copies[:, 0].reshape(-1)


def share(target: FoldTarget | None, v: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
    """:meth:`FoldTarget.share` where there is a target (``v`` itself where there is none)."""
    return v if target is None else target.share(v, reduce)


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
        if target.heads is not None:
            repeat, dim = target.heads
            if target.parts == 1 and prev.out_features * repeat == width and prev.out_features % dim == 0:
                return None
            return (f"producer width {prev.out_features} does not give input width {width} as {repeat} copies "
                    f"of each {dim}-wide head")
        if prev.out_features != target.parts * width:
            chunk = "" if target.parts == 1 else f" = {target.parts} x {prev.out_features / target.parts:g}"
            hint = "; algo.gqa_fold=true shares one scale per value channel" if target.parts == 1 else ""
            return (f"producer width {prev.out_features}{chunk} does not match input width {width} "
                    f"(grouped-query attention{hint})")
        return None
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        return f"cannot fold a per-channel scale into {type(prev).__name__}"
    return None


@torch.no_grad()
def fold_scales(target: FoldTarget, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Divide the group's input by ``s (in,)`` at its producer and multiply the linears' (and
    readers') input columns by ``s``, in place: the full-precision function is unchanged.
    Under grouped-query attention ``s`` must be equal over the copies of each value channel."""
    reason = fold_blocker(target, linears)
    if reason is not None:
        raise ValueError(f"cannot fold scales: {reason}")
    s = s.float()
    prev = target.module
    if isinstance(prev, nn.Linear):
        s_out = target.narrow(s)  # (producer channels,)
        width = s_out.shape[0]
        rows = slice(prev.out_features - width, prev.out_features)  # the last chunk
        prev.weight[rows] = prev.weight[rows].float() / s_out.to(prev.weight.device)[:, None]
        if prev.bias is not None:
            prev.bias[rows] = prev.bias[rows].float() / s_out.to(prev.bias.device)
    else:
        offset = target.norm_offset
        prev.weight.copy_((prev.weight.float() + offset) / s.to(prev.weight.device) - offset)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(bias.float() / s.to(bias.device))
    for module in (*linears, *target.readers):
        module.weight.copy_(module.weight.float() * s.to(module.weight.device))

"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then W8A8.

A few input channels of LLM activations are orders of magnitude larger than the rest, so a
per-tensor or per-token activation scale wastes most of the grid on them. For each linear
group (the linears that read one input) SmoothQuant divides input channel ``j`` by

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

and multiplies weight column ``j`` by ``s_j``: the product is unchanged in full precision, and
``alpha`` sets how much of the outlier range moves into the weights (0: none, 1: all).
``max|X_j|`` is the absmax over every calibration token (:class:`ChannelRangeObserver`),
``max|W_j|`` over the group's weights concatenated along rows. The ``1/s`` is folded into the
module producing the input (norm weight and bias, or the rows of the previous linear, exactly
as AWQ folds its scales: :func:`quantkit.algorithms.fold.fold_scales`), so nothing divides at
run time. Groups without an exact fold (no ``prev``, a GQA ``v_proj`` narrower than
``o_proj``'s input, a ``prev`` already quantized under ``layer_sequential``) keep ``s = 1``;
the log says which and why. Channels that never fire (``max|X_j| = 0``) or whose weights are
all zero keep ``s_j = 1``.

Then the weights are quantized round-to-nearest on ``w_dtype`` and the activations on
``a_dtype``: dynamically per token, or per tensor with a static scale (and zero point, for
asymmetric grids) calibrated on the *smoothed* inputs (the observed per-channel ranges are
divided by ``s``, which is exact). ``quant_out`` also fake-quantizes every layer output per
token on the ``a_dtype`` grid (the paper's "O" in its W8A8 recipes, e.g. for int8 BMMs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.algorithms.base import ChannelRangeObserver, Observer, activation_scheme, check_weight_activation_keys
from quantkit.algorithms.fold import FoldTarget, fold_blocker, fold_scales
from quantkit.algorithms.registry import register
from quantkit.algorithms.rtn import RTN
from quantkit.config import DTypeConfig, check
from quantkit.layers import LayerScheme
from quantkit.scheme import QuantScheme

log = logging.getLogger(__name__)

# Floor of s (as in the reference implementation): a tiny weight column cannot blow up 1/s.
_MIN_SMOOTH = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant settings (``conf/algo/smoothquant.yaml``).

    ``w_groupsize`` is the seed's spelling of ``groupsize``: when set it replaces ``groupsize``
    (after validation ``groupsize`` always holds the effective value), as in ``AWQConfig``.
    """

    name: str = "smoothquant"
    alpha: float = 0.5
    groupsize: int = -1
    w_groupsize: int | None = None
    w_qtype: str = "per_channel"
    a_qtype: str = "per_token"
    quant_out: bool = False
    block_sequential: bool = False
    layer_sequential: bool = False

    def __post_init__(self) -> None:
        check_alpha("algo.alpha", self.alpha)
        check_weight_activation_keys(self)


def check_alpha(key: str, alpha: float) -> None:
    check(0.0 <= alpha <= 1.0, f"{key}={alpha} is not valid; use a number in [0, 1] "
          "(0: no migration, 1: the whole activation range moves into the weights)")


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s (in,)`` float32 ``= act_absmax ** alpha / w_absmax ** (1 - alpha)``, floored at
    ``1e-5``; 1 where either maximum is 0 (a dead channel or dead weight column: nothing to
    balance, and 0 ** alpha would divide by zero in the fold)."""
    x = act_absmax.float()  # (in,)
    w = w_absmax.float().to(x.device)  # (in,)
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_MIN_SMOOTH)
    return torch.where((x > 0) & (w > 0), s, torch.ones_like(s))


def search_and_fold(
    prev: FoldTarget | None,
    linears: dict[str, nn.Linear],
    scales: Callable[[torch.Tensor, list[int]], torch.Tensor],
    tag: str,
) -> torch.Tensor | None:
    """Compute per-input-channel scales for a group and fold them into ``prev``.

    ``scales(w, row_splits)`` gets the group's weights ``(sum_out, in)`` concatenated along
    rows and the rows per linear, and returns ``s (in,)``. Returns the folded ``s``, or None
    where nothing was folded (no exact fold exists, logged with the reason; or ``s == 1``).
    The caller rescales its observers: the linears now read ``x / s``.
    """
    names = list(linears)
    reason = fold_blocker(prev, list(linears.values()))
    if reason is not None:
        log.info("%s: %s keep s=1: %s", tag, names, reason)
        return None
    w = torch.cat([linears[n].weight.detach().float() for n in names])  # (sum_out, in)
    s = scales(w, [linears[n].out_features for n in names])  # (in,)
    if bool((s == 1).all()):
        return None
    fold_scales(prev, list(linears.values()), s)
    return s


@register("smoothquant", SmoothQuantConfig)
class SmoothQuant(RTN):
    """Smoothing in :meth:`prepare_group`; weights and activations then as in RTN (whose
    ``groupsize``/``w_qtype``/``a_qtype`` handling this config shares)."""

    def __init__(self, config: SmoothQuantConfig, w_dtype: DTypeConfig, a_dtype: DTypeConfig) -> None:
        super().__init__(config, w_dtype, a_dtype)
        check(self.w_scheme is not None,
              "algo=smoothquant quantizes weights and activations; w_dtype=float16 is not supported")
        check(self.a_scheme is not None,
              f"algo=smoothquant needs a quantized a_dtype (a_dtype={a_dtype.name} leaves activations "
              "unquantized, so there is nothing to smooth for); use e.g. w_dtype=int8 a_dtype=int8 (W8A8), "
              "or algo=awq/gptq/rtn for weight-only quantization")

    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        w, a, _ = super().build_schemes(config, w_dtype, a_dtype)
        return w, a, activation_scheme(a_dtype, "per_token") if config.quant_out else None

    def calibrates(self, scheme: LayerScheme) -> bool:
        return True

    def folds(self, scheme: LayerScheme) -> bool:
        return True

    def make_observer(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> Observer | None:
        # the smoothing statistics do not depend on the scheme; static scales take each linear's
        return ChannelRangeObserver((scheme or self.run_scheme).a)

    def prepare_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> None:
        """One smoothing vector for the group, from the activation and weight ranges alone (the
        same whatever each linear's scheme)."""
        if not linears:
            return
        obs = observers[next(iter(linears))]  # one observer per group: the linears share the input
        alpha = self.config.alpha
        s = search_and_fold(prev, linears, lambda w, _: smooth_scales(obs.absmax, w.abs().amax(0), alpha),
                            "smoothquant")
        if s is not None:
            obs.rescale(s)

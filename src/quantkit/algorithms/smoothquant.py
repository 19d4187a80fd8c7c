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
``o_proj``'s input without ``gqa_fold``, a ``prev`` already quantized under
``layer_sequential``) keep ``s = 1``; the log says which and why. With ``gqa_fold`` the
``o_proj`` input channels that copy one value channel share one ``s`` (from the maxima over
the copies). Channels that never fire (``max|X_j| = 0``) or whose weights are
all zero keep ``s_j = 1``.

Then the weights are quantized round-to-nearest on ``w_dtype`` and the activations on
``a_dtype``: dynamically per token, or per tensor with a static scale (and zero point, for
asymmetric grids) calibrated on the *smoothed* inputs (the observed per-channel ranges are
divided by ``s``, which is exact). ``quant_out`` also fake-quantizes every layer output per
token on the ``a_dtype`` grid (the paper's "O" in its W8A8 recipes, e.g. for int8 BMMs).

``alpha=auto`` picks alpha per group from ``alpha_grid`` by the quantized group's output error
on the calibration tokens (:mod:`quantkit.algorithms.smoothquant_search`). The alpha of every
group (and with ``auto`` the loss of every grid value) is recorded in ``results.json`` under
``smoothquant`` (:meth:`SmoothQuant.record`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.algorithms.awq import AWQObserver
from quantkit.algorithms.base import ChannelRangeObserver, Observer, activation_scheme, check_weight_activation_keys
from quantkit.algorithms.fold import FoldTarget, fold_blocker, fold_scales, share
from quantkit.algorithms.registry import register
from quantkit.algorithms.rtn import RTN
from quantkit.algorithms.smoothquant_search import DEFAULT_ALPHA_GRID, alpha_losses, best_alpha
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
    ``alpha`` is a number in [0, 1] or ``"auto"`` (searched per group on ``alpha_grid`` with
    ``max_tokens`` calibration rows); the two search keys are errors when set with a number.
    """

    name: str = "smoothquant"
    alpha: float | str = 0.5
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    max_tokens: int = 2048
    groupsize: int = -1
    w_groupsize: int | None = None
    w_qtype: str = "per_channel"
    a_qtype: str = "per_token"
    quant_out: bool = False
    block_sequential: bool = False
    layer_sequential: bool = False
    gqa_fold: bool = False

    def __post_init__(self) -> None:
        check_alpha("algo.alpha", self.alpha, auto=True)
        check(len(self.alpha_grid) >= 1, "algo.alpha_grid=[] is not valid; give at least one alpha in [0, 1]")
        for i, value in enumerate(self.alpha_grid):
            check_alpha(f"algo.alpha_grid[{i}]", value)
        check(len(set(self.alpha_grid)) == len(self.alpha_grid),
              f"algo.alpha_grid={list(self.alpha_grid)} repeats a value")
        check(self.max_tokens >= 1, f"algo.max_tokens={self.max_tokens} must be >= 1")
        if not self.auto:
            for key, default in (("alpha_grid", DEFAULT_ALPHA_GRID), ("max_tokens", 2048)):
                check(getattr(self, key) == default,
                      f"algo.{key} acts only with algo.alpha=auto (algo.alpha={self.alpha}); leave it at its "
                      "default or set algo.alpha=auto")
        check_weight_activation_keys(self)

    @property
    def auto(self) -> bool:
        """Whether alpha is searched per group (``alpha=auto``)."""
        return self.alpha == "auto"


def check_alpha(key: str, alpha: float | str, auto: bool = False) -> None:
    """``alpha`` is a number in [0, 1] (or, with ``auto``, the string ``auto``)."""
    if auto and alpha == "auto":
        return
    number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    check(number and 0.0 <= alpha <= 1.0,
          f"{key}={alpha!r} is not valid; use a number in [0, 1] (0: no migration, 1: the whole activation "
          "range moves into the weights)" + (" or auto (searched per layer group on algo.alpha_grid)" if auto else ""))


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
        self._block = ""  # full-name prefix of the block being quantized (start_block)
        self._groups: list[dict[str, Any]] = []  # one record per smoothed group, in pipeline order

    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        w, a, _ = super().build_schemes(config, w_dtype, a_dtype)
        return w, a, activation_scheme(a_dtype, "per_token") if config.quant_out else None

    def calibrates(self, scheme: LayerScheme) -> bool:
        return True

    def folds(self, scheme: LayerScheme) -> bool:
        return True

    def make_observer(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> Observer | None:
        # the smoothing statistics do not depend on the scheme; static scales take each linear's.
        # alpha=auto also keeps a subsample of the input rows to measure each alpha's error on.
        a = (scheme or self.run_scheme).a
        return AWQObserver(self.config.max_tokens, a) if self.config.auto else ChannelRangeObserver(a)

    def start_block(self, prefix: str) -> None:
        self._block = prefix

    def prepare_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> None:
        """One smoothing vector for the group: from the activation and weight ranges alone with
        a fixed alpha (the same whatever each linear's scheme); with ``alpha=auto`` at the alpha
        of ``alpha_grid`` whose quantized group (each linear on its own scheme) reproduces the
        full-precision outputs best."""
        if not linears:
            return
        names = list(linears)
        obs = observers[names[0]]  # one observer per group: the linears share the input
        reason = fold_blocker(prev, list(linears.values()))
        record: dict[str, Any] = {"linears": [self._block + n for n in names],
                                  "alpha": None if reason else self.config.alpha}
        if reason:
            record["reason"] = reason
        self._groups.append(record)

        def scales(w: torch.Tensor, splits: list[int]) -> torch.Tensor:
            # ranges shared over the query heads reading one value head (gqa_fold), else per channel
            x_absmax, w_absmax = share(prev, obs.absmax), share(prev, w.abs().amax(0))  # (in,)
            if not self.config.auto:
                return smooth_scales(x_absmax, w_absmax, self.config.alpha)
            grid = self.config.alpha_grid
            biases = [linears[n].bias for n in names]
            bias = None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(lin.out_features) if b is None else b.detach().float().cpu()
                 for b, lin in zip(biases, linears.values())])  # (sum_out,)
            losses = alpha_losses(obs.rows, w, splits, [self._scheme(schemes, n) for n in names],
                                  lambda a: smooth_scales(x_absmax, w_absmax, a), grid,
                                  None if bias is None else bias.to(w.device), (obs.lo, obs.hi))
            record["alpha"] = alpha = best_alpha(grid, losses)
            record["losses"] = losses
            log.debug("smoothquant: %s alpha=%s (losses %s)", record["linears"], alpha, losses)
            return smooth_scales(x_absmax, w_absmax, alpha)

        s = search_and_fold(prev, linears, scales, "smoothquant")
        if s is not None:
            obs.rescale(s)

    def record(self) -> dict[str, Any]:
        """``{"smoothquant": ...}`` for results.json: the run's ``alpha`` (and ``alpha_grid`` with
        auto), how many groups took each alpha (``alpha_counts``; ``none``: no exact fold, s = 1)
        and per group its linears' full names, its ``alpha`` (null: not smoothed, with the
        ``reason``) and with auto the ``losses`` over the grid."""
        counts = Counter("none" if g["alpha"] is None else f"{g['alpha']:g}" for g in self._groups)
        out: dict[str, Any] = {"alpha": self.config.alpha}
        if self.config.auto:
            out["alpha_grid"] = list(self.config.alpha_grid)
        out["alpha_counts"] = dict(sorted(counts.items()))
        out["groups"] = self._groups
        return {"smoothquant": out}

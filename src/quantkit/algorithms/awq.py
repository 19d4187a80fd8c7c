"""AWQ: Activation-aware Weight Quantization (Lin et al. 2023).

A few input channels carry much larger activations than the rest, and the weights that
multiply them matter most. AWQ protects them without mixed precision:

1. **Scale search** (:func:`search_scales`): per linear group (the linears that read one input),
   multiply input column ``j`` of the weights by ``s_j = mean|x_j| ** alpha`` (normalised) and
   divide the input by the same ``s_j``. The product is unchanged in full precision, but the
   salient columns now use more of the quantization grid. ``alpha`` is picked on a grid in
   ``[0, 1)`` by the group's output error on calibration tokens; ``alpha=0`` (``s=1``, plain
   round-to-nearest) is on the grid, so the search never does worse than RTN on that loss.
2. **Fold** (:func:`~quantkit.algorithms.fold.fold_scales`): the ``1/s`` on the input goes into
   the module producing it (the norm's weight and bias, or the rows of the previous linear),
   so there is no runtime divide. Where no exact fold exists (``prev`` is None, a GQA
   ``v_proj`` narrower than ``o_proj``'s input without ``gqa_fold``, or ``prev`` already
   quantized under ``layer_sequential``) the group keeps ``s=1`` and is still clipped. With
   ``gqa_fold`` the query heads reading one value head share one ``s`` (from their mean
   ``mean|x|``), divided once out of ``v_proj``'s rows.
3. **Clip search** (:func:`search_clip`, the reference "auto_clip"): per output row and weight
   group, shrink the quantization range by a factor in ``[1 - max_shrink, 1]`` and keep the one
   with the smallest output error of that group on the calibration tokens.

Both searches measure output error through the Gram matrix ``H = X^T X`` of a bounded, evenly
strided subsample of the calibration tokens: ``||X dW^T||^2 = sum(dW H * dW)``, which costs
``out * in^2`` per candidate instead of ``tokens * in * out``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit import reference
from quantkit.algorithms.base import (
    Algorithm, ChannelRangeObserver, Observer, activation_scheme, check_weight_activation_keys, default_granularity,
    weight_scheme,
)
from quantkit.algorithms.fold import FoldTarget, fold_blocker, fold_scales, share
from quantkit.algorithms.registry import register
from quantkit.config import ConfigError, DTypeConfig, check
from quantkit.layers import LayerScheme
from quantkit.quant_linear import QuantLinear, storage_scale, weight_qparams
from quantkit.scales import scale_from_amax
from quantkit.scheme import QuantScheme

log = logging.getLogger(__name__)

# Floor of mean|x|^alpha before normalising (as in the reference): a dead channel gets a tiny,
# not a zero, scale.
_MIN_ACT_SCALE = 1e-4


@dataclass(frozen=True)
class AWQConfig:
    """AWQ settings (``conf/algo/awq.yaml``).

    ``w_groupsize`` is the seed's spelling of ``groupsize``: when set it replaces ``groupsize``
    (after validation ``groupsize`` always holds the effective value).
    """

    name: str = "awq"
    groupsize: int = 128
    w_groupsize: int | None = None
    w_qtype: str = "per_group"
    a_qtype: str = "per_token"
    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True
    max_tokens: int = 4096
    block_sequential: bool = False
    layer_sequential: bool = False
    gqa_fold: bool = False

    def __post_init__(self) -> None:
        check_weight_activation_keys(self)
        check(self.n_grid >= 1, f"algo.n_grid={self.n_grid} must be >= 1")
        check(0.0 <= self.max_shrink < 1.0, f"algo.max_shrink={self.max_shrink} must be in [0, 1)")
        check(self.max_tokens >= 1, f"algo.max_tokens={self.max_tokens} must be >= 1")


class AWQObserver(ChannelRangeObserver):
    """Input statistics of one linear: per-channel mean |x| and range over every calibration
    token, plus at most ``max_tokens`` rows kept at an even stride for the searches.

    The stride doubles (and every other kept row is dropped) whenever the kept rows would
    exceed ``max_tokens``, so the subsample is evenly spread over all tokens seen without
    knowing their number in advance; it ends with between ``max_tokens / 2`` and ``max_tokens``
    rows. The per-channel range (``lo``, ``hi``) and the static activation ``qparams()``
    under ``scheme`` come from :class:`ChannelRangeObserver`.
    """

    def __init__(self, max_tokens: int, scheme: QuantScheme | None = None) -> None:
        super().__init__(scheme)
        self.max_tokens = max_tokens
        self.count = 0
        self.stride = 1
        self.abs_sum: torch.Tensor | None = None  # (in,) float64
        self._rows: list[torch.Tensor] = []  # chunks of (k, in) float32
        self._kept = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)  # rejects NaN/inf, keeps the range
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        abs_sum = x.abs().sum(0, dtype=torch.float64)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        first = (-self.count) % self.stride  # keep global token indices 0, stride, 2*stride, ...
        picked = x[first::self.stride].to(torch.float32, copy=True)  # copy: do not pin the batch
        self.count += x.shape[0]
        self._rows.append(picked)
        self._kept += picked.shape[0]
        while self._kept > self.max_tokens:
            rows = torch.cat(self._rows)[::2]  # kept indices are multiples of stride from 0
            self._rows, self._kept, self.stride = [rows], rows.shape[0], self.stride * 2

    @property
    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean |x| ``(in,)`` float32."""
        if self.abs_sum is None:
            raise RuntimeError("observer saw no calibration data")
        return (self.abs_sum / self.count).float()

    @property
    def rows(self) -> torch.Tensor:
        """The kept input rows ``(k, in)`` float32."""
        if not self._rows:
            raise RuntimeError("observer saw no calibration data")
        if len(self._rows) > 1:
            self._rows = [torch.cat(self._rows)]
        return self._rows[0]

    def rescale(self, s: torch.Tensor) -> None:
        """The linear now reads ``x / s`` (scales folded): update every statistic to match."""
        super().rescale(s)  # s > 0 keeps min below max
        s = s.to(self.lo.device, torch.float32)
        self.abs_sum = self.abs_sum / s.double()
        self._rows = [self.rows / s]


def _group_rows(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QuantScheme]:
    """``w (out, in)`` as one row per quantization group, ``(out * G, gs)`` zero-padded, and the
    per-row scheme that quantizes it exactly as ``scheme`` quantizes ``w`` (2-D blocks: the
    groups of each row; their scales are shared by the block's rows, see :func:`_row_scales`).

    Zero padding never moves a range (every grid's range includes 0), and per-row scales
    broadcast instead of being gathered per column: the same arithmetic, several times faster.
    """
    if scheme.granularity != "per_group":
        return w, scheme
    out, cols = w.shape
    gs = scheme.group_cols(cols)
    groups = math.ceil(cols / gs)
    wg = nn.functional.pad(w, (0, groups * gs - cols)).reshape(out * groups, gs)  # (out * G, gs)
    # same grid, one group per row
    return wg, dataclasses.replace(scheme, granularity="per_channel", groupsize=-1, block_rows=1)


def _row_scales(p: torch.Tensor, out: int, scheme: QuantScheme) -> torch.Tensor:
    """Scales (or zeros) of ``scheme.scale_shape`` as one per row of :func:`_group_rows`."""
    if scheme.granularity != "per_group":
        return p
    if scheme.block_rows > 1:
        p = p.repeat_interleave(scheme.block_rows, dim=0)[:out]  # (out, G)
    return p.reshape(-1, 1)  # (out * G, 1)


def _block_sums(err: torch.Tensor, out: int, scheme: QuantScheme) -> torch.Tensor:
    """Per-row-group errors ``(out * G, 1)`` summed per scale: ``scheme.scale_shape``."""
    if scheme.granularity == "per_tensor":
        return err.sum().reshape(1, 1)
    err = err.reshape(out, -1)  # (out, G)
    r = scheme.block_rows
    if r > 1:
        pad = -out % r
        err = nn.functional.pad(err, (0, 0, 0, pad)).reshape(-1, r, err.shape[1]).sum(1)  # (RB, G)
    return err


def fake_quantize_weight(
    w: torch.Tensor, scheme: QuantScheme, row_splits: Sequence[int] | None = None
) -> torch.Tensor:
    """``w (out, in)`` round-to-nearest on ``scheme`` with storage-rounded scales, float32
    (equal to what :meth:`QuantLinear.from_linear` stores).

    ``row_splits`` (rows of each linear in a concatenated group) matters for per_tensor
    schemes only, where each linear has its own scale.
    """
    w = w.float()
    if row_splits is not None and scheme.granularity == "per_tensor" and len(row_splits) > 1:
        return torch.cat([fake_quantize_weight(part, scheme) for part in w.split(list(row_splits))])
    scale, zero = weight_qparams(w, scheme)  # (e4m3: with the per-tensor scale of w)
    wg, rows = _group_rows(w, scheme)
    scale, zero = _row_scales(scale, w.shape[0], scheme), None if zero is None else _row_scales(zero, w.shape[0], scheme)
    wq = reference.dequantize(reference.quantize(wg, scale, zero, rows), scale, zero, rows)
    return wq.reshape(w.shape[0], -1)[:, : w.shape[1]]


def fake_quantize_group(
    w: torch.Tensor, schemes: QuantScheme | Sequence[QuantScheme], row_splits: Sequence[int] | None = None
) -> torch.Tensor:
    """:func:`fake_quantize_weight` of a group's concatenated weights ``w (sum_out, in)`` where
    each linear (``row_splits`` rows each) may have its own scheme (one scheme: all share it)."""
    if isinstance(schemes, QuantScheme) or len(set(schemes)) == 1:
        scheme = schemes if isinstance(schemes, QuantScheme) else schemes[0]
        return fake_quantize_weight(w, scheme, row_splits)
    if row_splits is None or len(row_splits) != len(schemes):
        raise ValueError(f"{len(schemes)} schemes need as many row_splits, got {row_splits}")
    parts = w.split(list(row_splits))
    return torch.cat([fake_quantize_weight(part, scheme) for part, scheme in zip(parts, schemes)])


def search_scales(
    w: torch.Tensor,
    x: torch.Tensor,
    x_mean: torch.Tensor,
    scheme: QuantScheme | Sequence[QuantScheme],
    n_grid: int = 20,
    row_splits: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-input-channel AWQ scales ``s (in,)`` float32 for a group of linears.

    Args:
        w: ``(sum_out, in)`` the weights of the group's linears, concatenated along rows.
        x: ``(tokens, in)`` calibration inputs of the group.
        x_mean: ``(in,)`` mean |x| per input channel (over all calibration tokens).
        scheme: the weight quantization scheme, or one per linear (per-layer schemes: the
            group's one ``s`` then minimises the summed error, each linear on its own grid).
        n_grid: ``alpha`` runs over ``0, 1/n_grid, ..., (n_grid - 1)/n_grid``.
        row_splits: rows per linear in ``w`` (per_tensor schemes and one scheme per linear need them).

    ``s = x_mean ** alpha / sqrt(max * min)`` minimising ``||x w^T - (x / s) Q(w * s)^T||^2``;
    ties keep the smaller ``alpha``, so ``alpha = 0`` (``s = 1``) wins unless beaten.
    """
    w, x = w.float(), x.float()
    gram = x.T @ x  # (in, in)
    x_mean = x_mean.float().to(w.device)
    best_loss, best = math.inf, torch.ones_like(x_mean)
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=_MIN_ACT_SCALE)  # (in,)
        s = s / (s.max() * s.min()).sqrt()
        dw = w - fake_quantize_group(w * s, scheme, row_splits) / s  # (sum_out, in)
        loss = float(((dw @ gram) * dw).sum())
        if loss < best_loss:
            best_loss, best = loss, s
            log.debug("alpha=%.2f loss=%.6g", alpha, loss)
    return best


def _group_gram(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Diagonal blocks of ``x^T x`` per weight group, ``(G, gs, gs)``; the short last group is
    zero-padded (per_channel and per_tensor: one block of the full width)."""
    tokens, cols = x.shape
    gs = scheme.group_cols(cols)
    groups = math.ceil(cols / gs)
    xp = nn.functional.pad(x.float(), (0, groups * gs - cols))  # (tokens, G * gs)
    xp = xp.reshape(tokens, groups, gs).permute(1, 2, 0)  # (G, gs, tokens)
    return xp @ xp.transpose(1, 2)  # (G, gs, gs)


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    scheme: QuantScheme,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped weight qparams ``(scale, zero)`` of ``w (out, in)`` for inputs ``x (tokens, in)``.

    Each (row, group) range is shrunk by ``f = 1 - k / n_grid`` for ``k = 0 ..
    round(max_shrink * n_grid)``; shrinking min and max alike leaves the zero point unchanged,
    so a candidate is ``scale * f`` (scale formats with their own rule, e8m0 and e4m3: the
    scale of the shrunk ``amax``, with the unshrunk tensor's per-tensor scale). The ``f`` with the
    smallest error ``||x_g dW_g^T||^2`` of that group wins (ties keep ``f = 1``: never worse than
    no clipping on this loss); per_tensor schemes pick one ``f`` for the whole tensor, 2-D blocks
    one per block (the sum over its rows). Returns the shapes of
    :meth:`QuantScheme.scale_shape`, the scale storage-rounded
    (:func:`~quantkit.quant_linear.storage_scale`), ready for ``QuantLinear.from_linear``.
    ``w`` is processed ``chunk_rows`` rows at a time.
    """
    w = w.detach().float()
    out, cols = w.shape
    wg, rows = _group_rows(w, scheme)  # (out * G, gs)
    groups, gs = wg.shape[0] // out, wg.shape[1]
    g = reference.global_scale(w, scheme)
    base, zero = reference.compute_qparams(w, scheme, g)  # scale_shape float32; zero int32 or None
    intrinsic = scheme.scale_format in ("e8m0", "e4m3")  # scales computed from amax by their rule
    amax = reference.group_amax(w, scheme) if intrinsic else None
    zero_rows = None if zero is None else _row_scales(zero, out, scheme)

    def candidate(f: float) -> torch.Tensor:
        if intrinsic:
            return scale_from_amax(amax * f, scheme.dtype, scheme.absmax_code, scheme.scale_format, g)
        return storage_scale(base * f, scheme)

    blocks = _group_gram(x.to(w.device), scheme)  # (G, gs, gs)
    best_err, best = None, candidate(1.0)
    for k in range(int(round(max_shrink * n_grid)) + 1):
        scale = candidate(1.0 - k / n_grid)
        scale_rows = _row_scales(scale, out, scheme)  # (out * G | out | 1, 1)
        errs = []
        for r in range(0, out, chunk_rows):
            gr = slice(r * groups, (r + chunk_rows) * groups)  # the grouped rows of these weight rows
            sc = scale_rows if scale_rows.shape[0] == 1 else scale_rows[gr]
            zc = None if zero_rows is None else zero_rows if zero_rows.shape[0] == 1 else zero_rows[gr]
            q = reference.dequantize(reference.quantize(wg[gr], sc, zc, rows), sc, zc, rows)  # (chunk * G, gs)
            dw = (wg[gr] - q).reshape(-1, groups, gs).transpose(0, 1)  # (G, chunk, gs)
            errs.append((torch.bmm(dw, blocks) * dw).sum(-1).T)  # (chunk, G): dw_g H_g dw_g^T
        err = _block_sums(torch.cat(errs).reshape(-1, 1), out, scheme)  # scale_shape
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best, zero


@register("awq", AWQConfig)
class AWQ(Algorithm):
    """Scale search and fold in :meth:`prepare_group`, clip search and packing in
    :meth:`quantize_group`; activations (if ``a_dtype`` is quantized) as in RTN."""

    def __init__(self, config: AWQConfig, w_dtype: DTypeConfig, a_dtype: DTypeConfig) -> None:
        super().__init__(config, w_dtype, a_dtype)
        self.w_scheme, self.a_scheme, self.o_scheme = self.build_schemes(config, w_dtype, a_dtype)
        if self.w_scheme is None and self.a_scheme is not None:
            raise ConfigError("algo=awq quantizes weights: w_dtype=float16 with a quantized a_dtype is not supported")

    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        return (weight_scheme(w_dtype, config.w_qtype, config.groupsize, default_granularity(config)),
                activation_scheme(a_dtype, config.a_qtype), None)

    def calibrates(self, scheme: LayerScheme) -> bool:
        return scheme.w is not None

    def folds(self, scheme: LayerScheme) -> bool:
        return scheme.w is not None

    def make_observer(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> Observer | None:
        scheme = scheme or self.run_scheme
        return AWQObserver(self.config.max_tokens, scheme.a if scheme.a_static else None)

    def prepare_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> None:
        """Search and fold the group's scales: one ``s`` for the input the linears share, which
        with per-layer schemes minimises their summed output error, each on its own grid."""
        if not linears:
            return
        names = list(linears)
        reason = fold_blocker(prev, list(linears.values()))
        if reason is not None:
            log.info("awq: %s keep s=1 (no scale search): %s; clipping still applies", names, reason)
            return
        obs = observers[names[0]]  # the group's linears all see the same input: one observer
        w = torch.cat([linears[n].weight.detach().float() for n in names])  # (sum_out, in)
        splits = [linears[n].out_features for n in names]
        grids = [self._scheme(schemes, n).w for n in names]
        # gqa_fold: the query heads reading one value head share its scale (mean over the copies)
        s = search_scales(w, obs.rows, share(prev, obs.mean_abs, "mean"), grids, self.config.n_grid, splits)
        if bool((s == 1).all()):
            return
        fold_scales(prev, list(linears.values()), s)
        for observer in {id(o): o for o in (observers[n] for n in names)}.values():
            observer.rescale(s)

    def quantize_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> dict[str, nn.Module]:
        out = {}
        for name, lin in linears.items():
            scheme = self._scheme(schemes, name)
            if scheme.w is None:
                out[name] = lin
                continue
            obs = observers[name]
            w = lin.weight.detach().float()
            if self.config.clip:
                qparams = search_clip(w, obs.rows, scheme.w, self.config.n_grid, self.config.max_shrink)
            else:
                qparams = weight_qparams(w, scheme.w)
            act_scale, act_zero = obs.qparams(scheme.a) if scheme.a_static else (None, None)
            out[name] = QuantLinear.from_linear(lin, scheme.w, scheme.a, act_scale=act_scale,
                                                act_zero=act_zero, qparams=qparams)
        return out

    def quantize_outside_block(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> nn.Module:
        scheme = scheme or self.run_scheme
        if scheme.a_static:
            return super().quantize_outside_block(name, linear, scheme)
        log.info("awq: %s is outside the decoder blocks: round-to-nearest, no scale or clip search", name)
        return self._to_quant_linear(linear, None, scheme)

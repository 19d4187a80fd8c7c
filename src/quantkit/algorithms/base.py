"""What every algorithm shares: scheme construction, observers and the pipeline interface.

The calibration pipeline (:mod:`quantkit.pipeline`) walks decoder blocks and, for each group
of linears that share an input (e.g. q/k/v), attaches the algorithm's observers to those
linears, runs the calibration activations through the block, then asks the algorithm to turn
the group into :class:`~quantkit.quant_linear.QuantLinear` modules.

Each linear has its own :class:`~quantkit.layers.LayerScheme` (the run's, or a ``layers``
rule's): the pipeline resolves them once (:meth:`Algorithm.layer_scheme` builds each) and hands
the group's schemes to every hook (``schemes``, keyed like ``linears``; None: the run's scheme
for all, as in a direct call).
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quantkit.algorithms.fold import FoldTarget
from quantkit.config import ConfigError, DTypeConfig, check, check_choice, check_groupsize
from quantkit.dtypes import get_dtype
from quantkit.layers import LayerScheme
from quantkit.quant_linear import OBSERVERS, MSERange, QuantLinear
from quantkit.scheme import QuantScheme, check_format, check_grid, has_symmetric_range

log = logging.getLogger(__name__)

W_QTYPES = ("per_tensor", "per_channel", "per_group")
# per_tensor activations are calibrated once (static); per_token scales are computed per call.
A_QTYPES = ("per_tensor", "per_token")
# symmetric_range when the dtype leaves it null. Weights: the full grid of GPTQ and
# compressed-tensors (one more level: int4 RTN g64 on SmolLM2 is much better with it).
# Activations: the restricted grid that SmoothQuant's reference and vLLM's dynamic int8
# activation quantization compute, so a static or exported activation scale means the same.
WEIGHT_SYMMETRIC_RANGE = "full"
ACTIVATION_SYMMETRIC_RANGE = "restricted"


def grid_fields(dtype: DTypeConfig, role: str, keys: dict[str, str] | None = None) -> dict[str, Any]:
    """``has_zero``/``unsigned``/``symmetric_range`` of the scheme for ``dtype`` in ``role`` (``w``
    or ``a``), after the one grid rule (:func:`quantkit.scheme.check_grid`) every algorithm
    follows; errors name the keys (``keys`` overrides, e.g. ZeroQuant's ``algo.w_has_zero``)."""
    prefix = f"{role}_dtype."
    names = {"dtype": f"{role}_dtype", **{k: prefix + k for k in ("has_zero", "unsigned", "symmetric_range")},
             **(keys or {})}
    try:
        check_grid(dtype.name, dtype.has_zero, dtype.unsigned, dtype.symmetric_range, names)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    default = WEIGHT_SYMMETRIC_RANGE if role == "w" else ACTIVATION_SYMMETRIC_RANGE
    symmetric = has_symmetric_range(dtype.name, dtype.has_zero, dtype.unsigned)
    return {"has_zero": dtype.has_zero, "unsigned": dtype.unsigned,
            "symmetric_range": (dtype.symmetric_range or default) if symmetric else "full"}


def dtype_format(dtype: DTypeConfig, role: str) -> tuple[str, tuple[int, int] | None]:
    """The scale format and block ``(rows, cols)`` of ``dtype`` in ``role`` (``w`` or ``a``),
    the dtype's own where it leaves them null; errors name ``w_dtype.scale_format`` etc."""
    names = {"dtype": f"{role}_dtype", "scale_format": f"{role}_dtype.scale_format", "block": f"{role}_dtype.block"}
    try:
        return check_format(dtype.name, dtype.scale_format, dtype.block, names)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def default_granularity(config: Any) -> bool:
    """Whether ``config`` leaves ``groupsize`` (and ``w_qtype``, ``w_groupsize``) at its class
    defaults: then a dtype with its own block (mxfp4, nvfp4, ...) decides the groups."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return all(getattr(config, k) == defaults[k] for k in ("groupsize", "w_qtype", "w_groupsize") if k in defaults)


def weight_scheme(w_dtype: DTypeConfig, w_qtype: str, groupsize: int, default: bool = False) -> QuantScheme | None:
    """The weight scheme, or None for ``w_dtype=float16``; errors name the config keys.

    A dtype with a block (``w_dtype.block``, or its own: mxfp4 1x32, nvfp4 1x16, fp8_block
    128x128) quantizes in those blocks: ``algo.groupsize``/``algo.w_qtype`` must then be left at
    the algorithm's defaults (``default=True``) or name the same groups.
    """
    check_choice("algo.w_qtype", w_qtype, W_QTYPES)
    check(w_dtype.clip_ratio == 1.0,
          f"w_dtype.clip_ratio={w_dtype.clip_ratio}: a fixed clip ratio applies to activations only "
          "(a_dtype.clip_ratio); leave it at 1.0 (AWQ searches weight clipping itself: algo.max_shrink)")
    grid = grid_fields(w_dtype, "w")
    scale_format, block = dtype_format(w_dtype, "w")
    if w_dtype.is_identity:
        return None
    check(
        w_qtype == "per_group" or groupsize == -1,
        f"algo.groupsize={groupsize} has no meaning with algo.w_qtype={w_qtype}; "
        "use w_qtype=per_group or groupsize=-1",
    )
    if block is not None:
        rows, cols = block
        same = w_qtype == "per_group" and groupsize == cols and rows == 1
        given = f"algo.groupsize={groupsize}" + (f" with algo.w_qtype={w_qtype}" if w_qtype != "per_group" else "")
        check(default or same,
              f"w_dtype={w_dtype.name} quantizes in blocks of {rows}x{cols} (w_dtype.block), so {given} cannot "
              f"apply: leave the group size at its default, or change the block (w_dtype.block=N or [rows, N])")
        if not same:
            log.info("w_dtype=%s: blocks of %dx%d (w_dtype.block) instead of algo.groupsize=%d", w_dtype.name,
                     rows, cols, groupsize)
    try:
        if block is None:
            return QuantScheme(w_dtype.name, w_qtype, groupsize if w_qtype == "per_group" else -1, **grid,
                               scale_format=scale_format)
        return QuantScheme(w_dtype.name, "per_group", cols, **grid, scale_format=scale_format, block_rows=rows)
    except ValueError as exc:
        raise ConfigError(f"w_dtype/algo: {exc}") from None


def check_weight_activation_keys(config: Any) -> None:
    """Validate ``config.groupsize``/``w_qtype``/``a_qtype``, and apply the seed's
    ``w_groupsize`` alias: when set (not None) it replaces ``groupsize`` on the frozen
    ``config``, so that ``groupsize`` always holds the effective value afterwards."""
    if config.w_groupsize is not None:
        check_groupsize("algo.w_groupsize", config.w_groupsize)
        object.__setattr__(config, "groupsize", config.w_groupsize)
    check_groupsize("algo.groupsize", config.groupsize)
    check_choice("algo.w_qtype", config.w_qtype, W_QTYPES)
    check_choice("algo.a_qtype", config.a_qtype, A_QTYPES)


MSE_DEFAULTS = {"mse_grid": MSERange.n_grid, "mse_max_shrink": MSERange.max_shrink, "mse_norm": MSERange.norm}


def check_observer_keys(config: Any) -> None:
    """Validate ``config.observer`` (minmax, mse) and its ``mse_*`` keys, which act only with mse."""
    check_choice("algo.observer", config.observer, OBSERVERS)
    changed = [f"algo.{k}={getattr(config, k)}" for k, v in MSE_DEFAULTS.items() if getattr(config, k) != v]
    check(config.observer == "mse" or not changed,
          f"{', '.join(changed)} acts only with algo.observer=mse (algo.observer={config.observer})")
    check(isinstance(config.mse_grid, int) and not isinstance(config.mse_grid, bool) and config.mse_grid >= 1,
          f"algo.mse_grid={config.mse_grid!r} must be an int >= 1 (steps of the range search)")
    check(0.0 <= config.mse_max_shrink < 1.0, f"algo.mse_max_shrink={config.mse_max_shrink} must be in [0, 1)")
    check(config.mse_norm > 0.0, f"algo.mse_norm={config.mse_norm} must be > 0 (the error's exponent)")


def mse_range(config: Any) -> MSERange | None:
    """The weight range search of ``config`` (``algo.observer=mse``), or None for min/max (and for
    the algorithms without the key, e.g. SmoothQuant and ZeroQuant, which build on RTN)."""
    if getattr(config, "observer", "minmax") != "mse":
        return None
    return MSERange(config.mse_grid, config.mse_max_shrink, config.mse_norm)


def activation_scheme(a_dtype: DTypeConfig, a_qtype: str) -> QuantScheme | None:
    """The activation scheme, or None for ``a_dtype=float16`` (weight-only).

    A dtype with a block quantizes each token in groups of the block's columns, with scales
    computed per call (``algo.a_qtype=per_token``; a block of several rows is refused: a token's
    scales never depend on other tokens).
    """
    check_choice("algo.a_qtype", a_qtype, A_QTYPES)
    grid = grid_fields(a_dtype, "a")
    scale_format, block = dtype_format(a_dtype, "a")
    if a_dtype.is_identity:
        check(a_dtype.clip_ratio == 1.0, f"a_dtype.clip_ratio={a_dtype.clip_ratio} has nothing to act on: "
                                         "a_dtype=float16 is not quantized")
        return None
    if block is not None:
        check(block[0] == 1, f"a_dtype.block={list(block)}: activations are quantized in groups of one token by "
                             f"N columns; use a_dtype.block=[1, {block[1]}] (or {block[1]})")
        check(a_qtype == "per_token",
              f"algo.a_qtype={a_qtype} (static scales) with a_dtype={a_dtype.name}, whose block scales are "
              "computed per token at run time: use algo.a_qtype=per_token")
    check(a_dtype.clip_ratio == 1.0 or (not grid["has_zero"] and scale_format in ("float16", "float32")),
          f"a_dtype.clip_ratio={a_dtype.clip_ratio} shrinks a scale computed as amax / (the grid's largest "
          f"code): it needs a grid without a zero point (a_dtype.has_zero=false) with float16/float32 scales, "
          f"not a_dtype={a_dtype.name} with has_zero={grid['has_zero']}, scale_format={scale_format}; "
          "or leave clip_ratio at 1.0")
    clip = {"clip_ratio": a_dtype.clip_ratio}
    try:
        if block is None:
            return QuantScheme(a_dtype.name, a_qtype, -1, **grid, scale_format=scale_format, **clip)
        return QuantScheme(a_dtype.name, "per_group", block[1], **grid, scale_format=scale_format, **clip)
    except ValueError as exc:
        raise ConfigError(f"a_dtype/algo: {exc}") from None


class Observer(ABC):
    """Collects statistics of one linear's inputs ``x (tokens, in_features)`` during calibration."""

    @abstractmethod
    def update(self, x: torch.Tensor) -> None: ...


class ActRangeObserver(Observer):
    """Running range of the inputs, for a static activation scale under ``scheme``."""

    def __init__(self, scheme: QuantScheme | None) -> None:
        self.scheme = scheme  # None: only the range is wanted, no static scale
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration activations contain NaN or inf; cannot calibrate them")
        lo, hi = self._extremes(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` of one batch, float32 scalars."""
        return x.min().float(), x.max().float()

    def scale(self) -> torch.Tensor:
        """Static per-tensor scale ``(1, 1)`` float32 (same rule as dynamic quantization)."""
        return self.qparams()[0]

    def qparams(self, scheme: QuantScheme | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Static per-tensor ``(scale (1, 1) float32, zero (1, 1) int32 | None)`` on ``scheme``
        (default: the observer's; the range is the same for every linear reading this input)."""
        from quantkit.reference import compute_qparams

        if self.lo is None:
            raise RuntimeError("observer saw no calibration data")
        extremes = torch.stack([self.lo.min(), self.hi.max()]).reshape(1, 2)
        return compute_qparams(extremes, scheme or self.scheme)


class ChannelRangeObserver(ActRangeObserver):
    """Per-input-channel range ``lo, hi (in,)`` of the inputs: SmoothQuant's ``max|X_j|``, and
    a static per-tensor activation scale that stays exact when the inputs are later divided
    by a positive per-channel smoothing vector (:meth:`rescale`). ``scheme`` may be None when
    only the statistics are wanted."""

    def _extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(min, max)`` ``(in,)`` float32 of one batch ``x (..., in)``."""
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        return x.amin(0).float(), x.amax(0).float()

    @property
    def absmax(self) -> torch.Tensor:
        """``max |x_j|`` per input channel ``(in,)`` float32."""
        if self.lo is None:
            raise RuntimeError("observer saw no calibration data")
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def rescale(self, s: torch.Tensor) -> None:
        """The linears now read ``x / s`` (``s > 0``, folded upstream): divide the ranges."""
        s = s.to(self.lo.device, torch.float32)
        self.lo, self.hi = self.lo / s, self.hi / s


def with_groupsize(config: Any, groupsize: int) -> Any:
    """``config`` with ``groupsize`` (``-1``: per channel) replacing its own: the seed's alias
    ``w_groupsize`` cleared and ``w_qtype`` set to match, where the config has them."""
    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {"groupsize": groupsize}
    if "w_groupsize" in names:
        changes["w_groupsize"] = None
    if "w_qtype" in names:
        changes["w_qtype"] = "per_group" if groupsize > 0 else "per_channel"
    return dataclasses.replace(config, **changes)


def with_default_granularity(config: Any) -> Any:
    """``config`` with ``groupsize`` (and ``w_qtype``, ``w_groupsize``) at its class defaults."""
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: fields[k] for k in ("groupsize", "w_qtype", "w_groupsize")
                                          if k in fields})


def has_own_block(dtype: DTypeConfig) -> bool:
    """Whether ``dtype`` quantizes in blocks of its own (``block`` set, or mxfp4, nvfp4, ...)."""
    return dtype.block is not None or get_dtype(dtype.name).block is not None


class Algorithm(ABC):
    """Base class: weight/activation schemes and the hooks the pipeline calls.

    Subclasses implement :meth:`build_schemes` (the weight, activation and output schemes for
    a config and dtypes), which gives the run's schemes and every ``layers`` rule's
    (:meth:`layer_scheme`), and the hooks, which read each linear's scheme from ``schemes``.
    """

    name = "base"

    def __init__(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig) -> None:
        self.config = config
        self.w_dtype, self.a_dtype = w_dtype, a_dtype
        self.w_scheme: QuantScheme | None = None
        self.a_scheme: QuantScheme | None = None
        self.o_scheme: QuantScheme | None = None  # layer outputs (SmoothQuant's quant_out)

    @property
    def gqa_fold(self) -> bool:
        """``algo.gqa_fold``: under grouped-query attention, fold one scale per value channel
        (shared by the query heads reading it) for ``o_proj`` into ``v_proj``; off: ``o_proj``
        keeps ``s = 1``."""
        return bool(getattr(self.config, "gqa_fold", False))

    @abstractmethod
    def build_schemes(self, config: Any, w_dtype: DTypeConfig, a_dtype: DTypeConfig
                      ) -> tuple[QuantScheme | None, QuantScheme | None, QuantScheme | None]:
        """``(weights, activations, outputs)`` schemes for ``config`` and the dtypes (None: not
        quantized); errors name the config keys. Subclasses set the run's from it."""

    def layer_scheme(self, w_dtype: DTypeConfig | None = None, a_dtype: DTypeConfig | None = None,
                     groupsize: int | None = None) -> LayerScheme:
        """The scheme of a linear whose rule sets these (None: the run's value): what the run's
        schemes would be had it been started with them. No arguments: the run's scheme."""
        if w_dtype is None and a_dtype is None and groupsize is None:
            return self.run_scheme
        config = self.config if groupsize is None else with_groupsize(self.config, groupsize)
        if groupsize is None and w_dtype is not None and has_own_block(w_dtype):
            config = with_default_granularity(config)  # the rule's block format decides its groups
        return LayerScheme(*self.build_schemes(config, w_dtype or self.w_dtype, a_dtype or self.a_dtype))

    @property
    def run_scheme(self) -> LayerScheme:
        return LayerScheme(self.w_scheme, self.a_scheme, self.o_scheme)

    def _scheme(self, schemes: Mapping[str, LayerScheme] | None, name: str) -> LayerScheme:
        return self.run_scheme if schemes is None else schemes[name]

    @property
    def a_static(self) -> bool:
        return self.run_scheme.a_static

    @property
    def quantizes(self) -> bool:
        """False when both dtypes are float16: the run is the unquantized baseline."""
        return self.w_scheme is not None or self.a_scheme is not None

    def calibrates(self, scheme: LayerScheme) -> bool:
        """Whether a linear with ``scheme`` needs calibration inputs (default: static
        activation scales do)."""
        return scheme.a_static

    def folds(self, scheme: LayerScheme) -> bool:
        """Whether :meth:`prepare_group` may fold scales into the producer of a group with a
        linear of ``scheme`` (the pipeline then probes every fold first)."""
        return False

    @property
    def needs_calibration(self) -> bool:
        """Whether the run's scheme needs calibration activations at all (per-layer schemes:
        :meth:`quantkit.layers.SchemeTable.needs_calibration`)."""
        return self.calibrates(self.run_scheme)

    @property
    def folds_scales(self) -> bool:
        """Whether :meth:`prepare_group` may fold scales into a group's producer under the run's
        scheme (per-layer schemes: :meth:`quantkit.layers.SchemeTable.folds_scales`)."""
        return self.folds(self.run_scheme)

    @property
    def block_sequential(self) -> bool:
        return bool(getattr(self.config, "block_sequential", False))

    @property
    def layer_sequential(self) -> bool:
        return bool(getattr(self.config, "layer_sequential", False))

    @property
    def float_target(self) -> float:
        """> 0: the observers also take the full-precision model's inputs of their linears
        (``stash_float`` before each ``update``), which the pipeline then computes alongside."""
        return float(getattr(self.config, "float_target", 0.0))

    #: True when an observer's statistics depend on the input only: the linears of a group read
    #: the same input, so one observer (fed once per batch) serves them all.
    shares_group_observer: bool = True

    def make_observer(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> Observer | None:
        """Observer for one linear of the group being calibrated (None: nothing to collect)."""
        scheme = scheme or self.run_scheme
        return ActRangeObserver(scheme.a) if scheme.a_static else None

    def make_group_observers(self, linears: dict[str, nn.Linear],
                             schemes: Mapping[str, LayerScheme] | None = None) -> dict[str, Observer]:
        """Observers of one group by linear name; with :attr:`shares_group_observer` every name
        maps to the same object (the pipeline feeds an object once per batch however many
        names map to it), made for a linear whose scheme needs one, one with static activation
        scales first (its statistics are those of the shared input; each linear takes its own
        static scales from them, on its own grid)."""
        if self.shares_group_observer and linears:
            # a linear with static activation scales first: the shared observer must keep the range
            for name in sorted(linears, key=lambda n: not self._scheme(schemes, n).a_static):
                observer = self.make_observer(name, linears[name], self._scheme(schemes, name))
                if observer is not None:
                    return dict.fromkeys(linears, observer)
            return {}
        return {n: o for n, lin in linears.items()
                if (o := self.make_observer(n, lin, self._scheme(schemes, n))) is not None}

    def start_block(self, prefix: str) -> None:
        """The pipeline is about to calibrate the block whose linears' full names start with
        ``prefix`` (``model.layers.3.``): where an algorithm records per-group choices, this names
        them. Default: nothing."""

    def record(self) -> dict[str, Any]:
        """Entries for results.json of what the algorithm chose while quantizing (e.g.
        SmoothQuant's alpha per group); keys must not collide with the runner's. Default: none."""
        return {}

    def prepare_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> None:
        """Transform a group before any group of the same phase is quantized (e.g. fold
        per-channel scales into ``prev``). The pipeline calls it for every group of a phase
        first, so ``prev`` is still a full-precision module (see
        :class:`~quantkit.algorithms.fold.FoldTarget`; None where the table names no producer).
        Default: nothing."""

    @abstractmethod
    def quantize_group(
        self, linears: dict[str, nn.Linear], observers: dict[str, Observer], prev: FoldTarget | None,
        schemes: Mapping[str, LayerScheme] | None = None,
    ) -> dict[str, nn.Module]:
        """Replacement modules for the linears of one group (``prev`` feeds them, if foldable)."""

    def quantize_outside_block(self, name: str, linear: nn.Linear, scheme: LayerScheme | None = None) -> nn.Module:
        """Replacement for a linear outside the decoder blocks (e.g. a non-skipped lm_head)."""
        raise ConfigError(
            f"algo={self.name} quantizes decoder blocks only; add {name!r} to skip_layers"
        )

    def _to_quant_linear(self, linear: nn.Linear, observer: Observer | None, scheme: LayerScheme | None = None,
                         **kwargs: Any) -> nn.Module:
        """QuantLinear with ``scheme`` (default: the run's; the linear itself if nothing quantizes)."""
        scheme = scheme or self.run_scheme
        if scheme.w is None:
            return linear
        static = scheme.a_static and isinstance(observer, ActRangeObserver)
        act_scale, act_zero = observer.qparams(scheme.a) if static else (None, None)
        return QuantLinear.from_linear(linear, scheme.w, scheme.a, act_scale=act_scale,
                                       act_zero=act_zero, o_scheme=scheme.o, **kwargs)

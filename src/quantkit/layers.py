"""Per-layer schemes: the ``layers`` rules (and the ``sensitivity`` probe) resolved into one
scheme per linear, the table everything downstream reads.

A rule (``quantkit.config.LayerRule``) selects linears by full module name with ``match`` (as
``skip_layers`` does: the name, a name suffix, or a regex matching the whole name) and
overrides parts of the run's scheme: ``w_dtype``, ``a_dtype``, ``groupsize``, or ``skip``.
Resolution, done once by the pipeline's planning step (:func:`quantkit.pipeline.plan_schemes`)
and, on the ``meta`` skeleton, before any weight loads (:mod:`quantkit.inputs`):

* ``skip_layers`` come first: a linear they name stays in full precision whatever the rules say
  (so ``{match: ".*", ...}`` never quantizes ``lm_head``; to give it a scheme, drop it from
  ``skip_layers`` and add a rule for it);
* every other linear takes the scheme of the **first** rule that matches it, else the run's;
* a rule's dtypes and group size go through the algorithm exactly as the run's do
  (:meth:`quantkit.algorithms.base.Algorithm.layer_scheme`: its ``w_qtype``/``a_qtype``, ZeroQuant's
  grid keys, SmoothQuant's output scheme), so a rule reads as "this layer as if the run had
  been started with these values";
* a rule that matches no linear, only ``skip_layers`` linears, or only linears an earlier rule
  already took, is an error naming the rule (it would change nothing: first match wins).

The ``sensitivity`` node becomes one more rule in front of ``layers``: the linears of one type
(``q``: ``*.q`` or ``*.q_proj``) and/or one block range get its overrides
(:func:`run_rules`).

The table (:class:`SchemeTable`) maps every linear the pipeline handles to a
:class:`LayerScheme` (``w is None``: kept in full precision) and the rule it came from; the
algorithms get each linear's scheme from it, QuantLinear stores it, ``results.json`` records
it (``layer_schemes``), save/reload and export carry it per module.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quantkit.arch import matches_any
from quantkit.config import ConfigError, LayerRule, SensitivityConfig

RUN = "run"  # source of a linear that no rule matched
SKIP_LAYERS = "skip_layers"
SENSITIVITY = "sensitivity"

DTypeLookup = Callable[[str, str, str], dict[str, Any]]


@dataclass(frozen=True)
class LayerScheme:
    """The scheme of one linear: weights (None: kept in full precision), activations (None:
    weight-only), output (SmoothQuant's ``quant_out``), and where it came from (``run``,
    ``skip_layers`` or a rule's label: ``layers[0]``, ``sensitivity``)."""

    w: Any = None  # QuantScheme | None
    a: Any = None
    o: Any = None
    source: str = RUN

    @property
    def quantized(self) -> bool:
        return self.w is not None

    @property
    def a_static(self) -> bool:
        """Activations with one calibrated (static) scale per tensor."""
        return self.a is not None and self.a.granularity == "per_tensor"

    def same_grid(self, other: LayerScheme) -> bool:
        return (self.w, self.a, self.o) == (other.w, other.a, other.o)

    def describe(self) -> str:
        """``int4 g128 asym unsigned``, ``int8 channel / act int8 token restricted``, ``float16``."""
        if self.w is None:
            return "float16"
        text = self.w.describe()
        if self.a is not None:
            text += f" / act {self.a.describe()}{' static' if self.a_static else ''}"
        if self.o is not None:
            text += f" / out {self.o.describe()}"
        return text


@dataclass(frozen=True)
class SchemeTable:
    """Every linear the pipeline handles (module order) -> its :class:`LayerScheme`, and its
    input width."""

    layers: dict[str, LayerScheme]
    widths: dict[str, int] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerScheme:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def quantized(self) -> dict[str, LayerScheme]:
        return {n: s for n, s in self.layers.items() if s.quantized}

    @property
    def quantizes(self) -> bool:
        return any(s.quantized for s in self.layers.values())

    @property
    def mixed(self) -> bool:
        """Whether a rule set any linear's scheme."""
        return any(s.source not in (RUN, SKIP_LAYERS) for s in self.layers.values())

    def needs_calibration(self, algorithm: Any) -> bool:
        """Whether any quantized linear needs calibration inputs under ``algorithm``."""
        return any(algorithm.calibrates(s) for s in self.quantized().values())

    def folds_scales(self, algorithm: Any) -> bool:
        return any(algorithm.folds(s) for s in self.quantized().values())

    def kept_float(self) -> list[str]:
        """Linears a rule keeps in full precision: part of the mixed scheme (they count at 16
        bits in ``bits_per_weight``), unlike ``skip_layers``, which are outside it."""
        return [n for n, s in self.layers.items() if not s.quantized and s.source != SKIP_LAYERS]

    def counts(self) -> dict[str, int]:
        """Linears per scheme (``skip_layers`` left out), most common first."""
        found = Counter(s.describe() for s in self.layers.values() if s.source != SKIP_LAYERS)
        return dict(found.most_common())

    def to_json(self) -> dict[str, dict[str, str]]:
        """``{name: {"scheme": "int8 g128", "source": "layers[0]"}}`` for ``results.json``."""
        return {n: {"scheme": s.describe(), "source": s.source} for n, s in self.layers.items()}


def expand_dtype_names(config: dict[str, Any], lookup: DTypeLookup) -> dict[str, Any]:
    """``config`` (a resolved plain dict) with every rule's dtype made a complete mapping.

    In ``layers[i]`` and ``sensitivity``: ``w_dtype: int8`` becomes ``lookup("w_dtype", "int8",
    key)`` (what ``w_dtype=int8`` composes to on the command line, grid defaults of the role
    included); a mapping with a ``name`` is that lookup with the mapping's keys over it; a
    mapping without one is the run's own dtype with the mapping's keys over it. ``key`` names
    the value for error messages (``layers[0].w_dtype``).
    """
    out = copy.deepcopy(config)
    rules = [(f"layers[{i}]", r) for i, r in enumerate(out.get("layers") or [])]
    rules.append((SENSITIVITY, out.get(SENSITIVITY)))
    for path, rule in rules:
        if not isinstance(rule, dict):
            continue  # the typed config reports the wrong type
        for role in ("w_dtype", "a_dtype"):
            value = rule.get(role)
            if isinstance(value, str):
                rule[role] = lookup(role, value, f"{path}.{role}")
            elif isinstance(value, dict):
                name = value.get("name")
                base = lookup(role, name, f"{path}.{role}.name") if isinstance(name, str) else dict(out.get(role) or {})
                rule[role] = {**base, **value}
    return out


def hydra_dtype(role: str, name: str, key: str) -> dict[str, Any]:
    """The ``conf/<role>/<name>.yaml`` node, composed by the initialized Hydra (inside
    ``@hydra.main`` or ``initialize_config_dir``); an unknown name lists the options."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    options = GlobalHydra.instance().config_loader().get_group_options(role)
    if name not in options:
        raise ConfigError(f"{key}={name!r} is not valid; choose one of: {', '.join(options)}")
    return OmegaConf.to_container(compose(config_name=f"{role}/{name}")[role], resolve=True)


def sensitivity_rule(probe: SensitivityConfig, blocks_path: str, num_blocks: int) -> LayerRule | None:
    """The rule of an active ``sensitivity`` probe (None when inactive): a regex over full names
    for its layer ``type`` (last name part ``type`` or ``type_proj``) and/or its ``blocks``."""
    if not probe.active:
        return None
    where = r".*"
    if probe.block_range is not None:
        first, last = probe.block_range
        if last >= num_blocks:
            raise ConfigError(f"sensitivity.blocks={probe.blocks} reaches past the model's last block: it has "
                              f"{num_blocks} blocks (0-{num_blocks - 1})")
        indices = "|".join(str(i) for i in range(first, last + 1))
        where = rf"{re.escape(blocks_path)}\.(?:{indices})\..*"
    if probe.type is not None:
        where = (where[:-2] if where.endswith(".*") else where) + rf"(?:.*\.)?{re.escape(probe.type)}(?:_proj)?"
    overrides = {f.name: getattr(probe, f.name) for f in dataclasses.fields(LayerRule) if f.name != "match"}
    return LayerRule(match=where, **overrides)


def run_rules(layers: Sequence[LayerRule], probe: SensitivityConfig, blocks_path: str,
              num_blocks: int) -> list[tuple[str, LayerRule]]:
    """The run's rules in order, labelled: the sensitivity probe first (when active), then
    ``layers[0]``, ``layers[1]``, ..."""
    rules = [(f"layers[{i}]", rule) for i, rule in enumerate(layers)]
    first = sensitivity_rule(probe, blocks_path, num_blocks)
    return ([(SENSITIVITY, first)] if first is not None else []) + rules


def _describe_rule(label: str, rule: LayerRule) -> str:
    return f"{label} (match {rule.match!r})"


def rule_scheme(label: str, rule: LayerRule, algorithm: Any) -> LayerScheme:
    """The scheme a rule gives its linears under ``algorithm``; errors name the rule."""
    if rule.skip:
        return LayerScheme(None, source=label)
    try:
        scheme = algorithm.layer_scheme(rule.w_dtype, rule.a_dtype, rule.groupsize)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    if scheme.w is None and scheme.a is not None:
        raise ConfigError(
            f"{label}: w_dtype=float16 with a quantized a_dtype ({scheme.a.describe()}) is activation-only "
            "quantization, which is not supported: set skip=true to keep the layer in full precision, or a "
            "quantized w_dtype")
    return dataclasses.replace(scheme, source=label)


def resolve(linears: Mapping[str, int], rules: Sequence[tuple[str, LayerRule]], algorithm: Any,
            skip_layers: Iterable[str] = ()) -> SchemeTable:
    """The table for ``linears`` (full name -> input width, module order) under labelled
    ``rules`` (see the module doc for the order of precedence and the errors)."""
    skip = tuple(skip_layers)
    base = algorithm.layer_scheme()
    schemes = {label: rule_scheme(label, rule, algorithm) for label, rule in rules}
    hits: dict[str, list[str]] = {label: [] for label, _ in rules}
    wins: dict[str, list[str]] = {label: [] for label, _ in rules}
    skipped_hits: dict[str, list[str]] = {label: [] for label, _ in rules}
    table: dict[str, LayerScheme] = {}
    for name, width in linears.items():
        matched = [label for label, rule in rules if matches_any(name, (rule.match,))]
        if matches_any(name, skip):
            for label in matched:
                skipped_hits[label].append(name)
            table[name] = LayerScheme(None, source=SKIP_LAYERS)
            continue
        for label in matched:
            hits[label].append(name)
        if not matched:
            table[name] = base
            continue
        wins[matched[0]].append(name)
        scheme = schemes[matched[0]]
        w = scheme.w
        if w is not None and w.granularity == "per_group" and w.groupsize > width:
            rule = dict(rules)[matched[0]]
            key = f"{matched[0]}.groupsize" if rule.groupsize is not None else "algo.groupsize"
            raise ConfigError(f"{key}={w.groupsize} is larger than the input width {width} of {name} "
                              f"({_describe_rule(matched[0], rule)} gives it {w.describe()})")
        table[name] = scheme
    for label, rule in rules:
        _check_rule_used(label, rule, hits[label], wins[label], skipped_hits[label], linears)
    return SchemeTable(table, dict(linears))


def _check_rule_used(label: str, rule: LayerRule, hits: list[str], wins: list[str], skipped: list[str],
                     linears: Mapping[str, int]) -> None:
    what = _describe_rule(label, rule)
    if not hits and not skipped:
        examples = ", ".join(_examples(linears))
        raise ConfigError(f"{what} matches no linear layer the pipeline quantizes (a name, a name suffix or a "
                          f"regex over full names such as {examples})")
    if not hits:
        raise ConfigError(f"{what} matches only linears that skip_layers keeps in full precision "
                          f"({', '.join(skipped[:3])}): remove them from skip_layers to give them a scheme")
    if not wins:
        raise ConfigError(f"{what} matches {', '.join(hits[:3])}{' ...' if len(hits) > 3 else ''}, but an earlier "
                          "rule takes every one of them (the first matching rule wins): reorder or remove it")


def _examples(linears: Mapping[str, int]) -> list[str]:
    """A few names to show: every distinct name with block indices folded (``model.layers.0.``)."""
    seen: dict[str, None] = {}
    for name in linears:
        seen.setdefault(re.sub(r"\.\d+\.", ".0.", name, count=1), None)
    return list(seen)[:9]

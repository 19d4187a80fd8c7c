"""Typed run configuration: the Hydra ``DictConfig`` becomes these dataclasses once, at the entry.

Every config class is a frozen dataclass validated in ``__post_init__``; :func:`build` turns a
plain dict into one, rejecting unknown keys (listing the valid ones) and wrong types with the
dotted path of the offending key. Algorithm configs live beside their algorithms and are
looked up by ``algo.name`` in :mod:`quantkit.algorithms.registry`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from quantkit.dtypes import dtype_names, get_dtype
from quantkit.subjects import select

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value, raised before any heavy work starts."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    check(value in choices, f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_groupsize(key: str, value: int) -> None:
    check(value == -1 or value >= 1, f"{key}={value} is not valid; use a positive group size or -1 (per channel)")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one value against a (simple) type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), f"{path} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_convert_item(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), f"{path} must be a mapping, got {value!r}")
        return build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        check(isinstance(value, bool), f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _convert_item(value: Any, tp: Any, path: str) -> Any:
    """A list item; a message that does not name the item (a ``__post_init__`` check of a
    dataclass item names only its own key) gets the item's path in front: ``layers[1]: ...``."""
    try:
        return _convert(value, tp, path)
    except ConfigError as exc:
        if path in str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from None


def build(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{path}." if path else ""
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + path if path else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    check(not missing, f"missing config key(s): {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)  # __post_init__ messages name their keys


@dataclass(frozen=True)
class DTypeConfig:
    """A weight or activation number format (``conf/dtype/*.yaml``).

    ``symmetric_range`` (full, restricted; None: full for weights, restricted for activations)
    acts on symmetric signed integer grids. ``scale_format`` (float16, float32, e8m0, e4m3; None:
    the dtype's own) and ``block`` (columns, ``[columns]`` or ``[rows, columns]``; None: the
    dtype's own, for plain grids the algorithm's group size) describe the scales.
    ``clip_ratio`` (in ``(0, 1]``, activations only) shrinks each dynamic or static activation
    scale to cover ``clip_ratio * amax`` (larger values saturate). Which
    combinations are valid is decided where the role is known, by
    :func:`quantkit.scheme.check_grid` and :func:`quantkit.scheme.check_format`
    (``quantkit.algorithms.base``).
    """

    name: str
    has_zero: bool = False
    unsigned: bool = False
    symmetric_range: str | None = None
    scale_format: str | None = None
    block: tuple[int, ...] | int | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_choice("dtype name", self.name, dtype_names())
        check(not isinstance(self.clip_ratio, bool) and isinstance(self.clip_ratio, (int, float))
              and 0.0 < self.clip_ratio <= 1.0,
              f"clip_ratio={self.clip_ratio!r} must be a number in (0, 1] (1: no clipping)")
        spec = get_dtype(self.name)
        check(
            not spec.is_float or not (self.has_zero or self.unsigned),
            f"{self.name} is a signed float grid: has_zero and unsigned must be false",
        )

    @property
    def is_identity(self) -> bool:
        return get_dtype(self.name).is_identity


CALIBRATE_DTYPES = ("model", "float32", "bfloat16", "float16")
LAYER_OVERRIDES = ("w_dtype", "a_dtype", "groupsize", "skip")
BLOCK_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
LAYER_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, kw_only=True)
class LayerOverrides:
    """What a per-layer rule changes in the run's scheme (null: keep the run's).

    ``w_dtype``/``a_dtype`` are complete dtype configs: ``scripts/run.py`` turns a dtype name
    (``w_dtype: int8``) into the mapping ``w_dtype=int8`` gives on the command line
    (``conf/w_dtype/int8.yaml``), and a mapping without ``name`` (``w_dtype: {has_zero:
    false}``) into the run's dtype with those keys changed (:func:`quantkit.layers.expand_dtype_names`).
    ``groupsize``: ``-1`` per channel, ``N`` groups of ``N`` input columns. ``skip``: the layer
    stays in full precision (and then nothing else may be set).
    """

    w_dtype: DTypeConfig | None = None
    a_dtype: DTypeConfig | None = None
    groupsize: int | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if self.groupsize is not None:
            check_groupsize("groupsize", self.groupsize)
        changed = [k for k in LAYER_OVERRIDES[:-1] if getattr(self, k) is not None]
        check(not (self.skip and changed),
              f"skip=true keeps the layer in full precision: {', '.join(changed)} has nothing to act on")
        check(self.skip or bool(changed), f"no override: set one of {', '.join(LAYER_OVERRIDES)}")


@dataclass(frozen=True, kw_only=True)
class LayerRule(LayerOverrides):
    """One entry of ``layers``: the linears whose full name ``match`` selects (as ``skip_layers``
    entries do: the name, a name suffix, or a regex matching the whole name) get these
    overrides on top of the run's scheme; the first rule that matches a linear wins."""

    match: str

    def __post_init__(self) -> None:
        check(bool(self.match), "match is empty: give a module name, a name suffix or a regex")
        try:
            re.compile(self.match)
        except re.error as exc:
            raise ConfigError(f"match={self.match!r} is not a valid regex: {exc}") from None
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class SensitivityConfig(LayerOverrides):
    """A one-rule sensitivity probe: the linears of one layer ``type`` (the last part of the
    name, with or without ``_proj``: q, k, v, o, gate, up, down; OPT's fc1, ...) and/or one
    ``blocks`` range (``"a-b"`` inclusive, or ``"a"``) get the overrides; everything else keeps
    the run's scheme (:func:`quantkit.layers.run_rules` turns it into the first rule).
    Inactive while ``type`` and ``blocks`` are both null (the sweep's reference run)."""

    type: str | None = None
    blocks: str | int | None = None  # "a-b" or "a" (Hydra reads a lone number as an int)

    def __post_init__(self) -> None:
        if isinstance(self.blocks, int):
            object.__setattr__(self, "blocks", str(self.blocks))
        if self.type is not None:
            check(bool(LAYER_TYPE_RE.match(self.type)),
                  f"sensitivity.type={self.type!r} is not a layer type: give the last part of a linear's "
                  "name (q, k, v, o, gate, up, down, or e.g. fc1)")
        if self.blocks is not None:
            found = BLOCK_RANGE_RE.match(str(self.blocks))
            check(found is not None and (found[2] is None or int(found[1]) <= int(found[2])),
                  f"sensitivity.blocks={self.blocks!r} is not a block range: use 'a-b' (first and last "
                  "block, a <= b) or one block 'a'")
        if self.active:
            try:
                super().__post_init__()
            except ConfigError as exc:
                raise ConfigError(f"sensitivity: {exc}") from None

    @property
    def active(self) -> bool:
        return self.type is not None or self.blocks is not None

    @property
    def block_range(self) -> tuple[int, int] | None:
        if self.blocks is None:
            return None
        found = BLOCK_RANGE_RE.match(str(self.blocks))
        return int(found[1]), int(found[2] or found[1])

    @property
    def label(self) -> str | None:
        """``down``, ``blocks 0-4``, ``down in blocks 0-4``; None when inactive."""
        where = f"blocks {self.blocks}" if self.blocks is not None else None
        if self.type is not None:
            return self.type + (f" in {where}" if where else "")
        return where


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to load: an embedded name, a local directory or a hub id."""

    name: str
    path: str
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU (CPUs lack fast fp16 matmuls)

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, ("auto", "float16", "bfloat16", "float32"))


@dataclass(frozen=True)
class DataConfig:
    """The evaluation text: a named corpus (optionally read from local files) or a file path."""

    name: str
    path: str | None = None
    split: str = "test"


TASK_BENCHMARKS = ("ceval", "cmmlu", "boss")  # quantkit's own multiple-choice protocol (quantkit.multiple_choice)
MAX_BENCHMARK_SHOTS = 5  # C-Eval and CMMLU have five worked dev examples per subject


@dataclass(frozen=True)
class BenchmarkConfig:
    """Where one of C-Eval / CMMLU / BOSS is read from, and which of its subjects are scored."""

    path: str | None = None  # a local copy; None: the Hugging Face hub (C-Eval, CMMLU)
    subjects: tuple[str, ...] = ()  # subject (BOSS: dataset) or category (BOSS: task) names; empty: all


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity protocol (non-overlapping windows of ``seq_length`` tokens) and downstream tasks."""

    seq_length: int = 512
    max_windows: int | None = None
    batch_size: int = 1
    baseline: bool = False
    tasks: tuple[str, ...] = ()  # lm-eval task/group names, and ceval / cmmlu / boss
    num_fewshot: int | None = None  # None: each lm-eval task's default, 0 for ceval/cmmlu/boss
    limit: int | None = None  # score only the first N documents of each task (subject, dataset)
    task_batch_size: int = 1
    task_paths: tuple[str, ...] = ()  # folders of custom lm-eval task YAMLs
    ceval: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    cmmlu: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    boss: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        check(self.seq_length >= 2, f"eval.seq_length={self.seq_length} must be >= 2")
        check(self.max_windows is None or self.max_windows >= 1, f"eval.max_windows={self.max_windows} must be >= 1 or null")
        check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        check(self.num_fewshot is None or self.num_fewshot >= 0,
              f"eval.num_fewshot={self.num_fewshot} must be >= 0 (or null: each task's default)")
        check(self.limit is None or self.limit >= 1,
              f"eval.limit={self.limit} must be >= 1 (documents per task) or null (all)")
        check(self.task_batch_size >= 1, f"eval.task_batch_size={self.task_batch_size} must be >= 1")
        for name in self.tasks:
            check(bool(name.strip()), f"eval.tasks={list(self.tasks)} holds an empty task name")
        dupes = sorted({n for n in self.tasks if self.tasks.count(n) > 1})
        check(not dupes, f"eval.tasks lists {', '.join(dupes)} more than once")
        benchmarks = [n for n in self.tasks if n in TASK_BENCHMARKS]
        check(not benchmarks or self.num_fewshot is None or self.num_fewshot <= MAX_BENCHMARK_SHOTS,
              f"eval.num_fewshot={self.num_fewshot} is more than {', '.join(benchmarks)} allow: choose 0..{MAX_BENCHMARK_SHOTS}")
        for name in TASK_BENCHMARKS:  # names checked even when unused: a typo is an error either way
            try:
                select(name, getattr(self, name).subjects, f"eval.{name}.subjects")
            except ValueError as err:
                raise ConfigError(str(err)) from None


SAVE_FORMATS = ("quantkit", "compressed-tensors")


@dataclass(frozen=True)
class SaveConfig:
    """Whether and how the quantized model is saved into ``<output_dir>/model``."""

    enabled: bool = False
    format: str = "quantkit"
    dtype: str = "float16"  # of the unquantized tensors

    def __post_init__(self) -> None:
        check_choice("save.format", self.format, SAVE_FORMATS)
        check_choice("save.dtype", self.dtype, ("float16", "bfloat16", "float32"))


ROTATIONS = ("none", "hadamard", "random")
ONLINE_ROLES = ("down_proj", "o_proj")  # inputs that can take an online Hadamard (quantkit.arch.RotationSpec)


@dataclass(frozen=True)
class RotationConfig:
    """An orthogonal rotation of the float model before any algorithm runs (``conf/rotation/``,
    :mod:`quantkit.rotation`): ``name`` rotates the residual stream (``hadamard``: a randomized
    Hadamard matrix, ``random``: a random orthogonal one, ``none``: not at all); ``heads``
    rotates the values of every attention head (and the output projection's input) likewise;
    ``online`` puts a Hadamard transform in front of the listed linears' inputs at run time.
    ``seed`` draws the random signs / matrices."""

    name: str = "none"
    seed: int = 0
    heads: bool = False
    online: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("rotation.name", self.name, ROTATIONS)
        for role in self.online:
            check(role in ONLINE_ROLES, f"rotation.online entry {role!r} is not valid; choose from: {', '.join(ONLINE_ROLES)}")
        dupes = sorted({r for r in self.online if self.online.count(r) > 1})
        check(not dupes, f"rotation.online lists {', '.join(dupes)} more than once")

    @property
    def active(self) -> bool:
        """Whether the model is transformed at all."""
        return self.name != "none" or self.heads or bool(self.online)


DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class RunConfig:
    """One run: the seed's common parameters plus model, algorithm, data and evaluation."""

    model: ModelConfig
    algo: Any  # an algorithm config dataclass, built through the registry
    w_dtype: DTypeConfig
    a_dtype: DTypeConfig
    data: DataConfig
    eval: EvalConfig
    save: SaveConfig = field(default_factory=SaveConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    model_type: str = "auto"
    num_calibrate: int = 128
    calibrate_seq_length: int = 512
    calibrate_name: str = "pydoc"
    calibrate_dtype: str = "model"
    calibrate_reuse: bool = False
    device: str = "auto"
    offload: str = "cpu"
    skip_layers: tuple[str, ...] = field(default_factory=lambda: ("lm_head",))
    layers: tuple[LayerRule, ...] = ()
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    seed: int = 0
    name: str = "default"
    output_dir: str = "."
    overwrite: bool = False  # rerun and replace complete results already in output_dir

    def __post_init__(self) -> None:
        check(self.num_calibrate >= 1, f"num_calibrate={self.num_calibrate} must be >= 1")
        check(self.calibrate_seq_length >= 1, f"calibrate_seq_length={self.calibrate_seq_length} must be >= 1")
        check_choice("calibrate_dtype", self.calibrate_dtype, CALIBRATE_DTYPES)
        for key in ("device", "offload"):
            value = getattr(self, key)
            check(bool(DEVICE_RE.match(value)), f"{key}={value!r} is not valid; use auto, cpu, cuda or cuda:N")
        for pattern in self.skip_layers:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"skip_layers entry {pattern!r} is not a valid regex: {exc}") from None


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a resolved plain dict (e.g. ``OmegaConf.to_container``)."""
    from quantkit.algorithms.registry import algorithm_config_class

    data = dict(data)
    algo = data.pop("algo", None)
    check(isinstance(algo, dict) and "name" in algo, "config key 'algo' must be a mapping with a 'name'")
    algo_cfg = build(algorithm_config_class(algo["name"]), algo, "algo")
    run = build(RunConfig, {**data, "algo": {}}, "")
    return dataclasses.replace(run, algo=algo_cfg)

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
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
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
    acts on symmetric signed integer grids. Which combinations are valid is decided where the
    role is known, by :func:`quantkit.scheme.check_grid` (``quantkit.algorithms.base``).
    """

    name: str
    has_zero: bool = False
    unsigned: bool = False
    symmetric_range: str | None = None

    def __post_init__(self) -> None:
        check_choice("dtype name", self.name, dtype_names())
        spec = get_dtype(self.name)
        check(
            not spec.is_float or not (self.has_zero or self.unsigned),
            f"{self.name} is a signed float grid: has_zero and unsigned must be false",
        )

    @property
    def is_identity(self) -> bool:
        return get_dtype(self.name).is_identity


CALIBRATE_DTYPES = ("model", "float32", "bfloat16", "float16")


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

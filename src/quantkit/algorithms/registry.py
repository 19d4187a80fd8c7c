"""Algorithms by name: each module registers its config dataclass and its class here."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = ("rtn", "gptq", "awq", "smoothquant", "zeroquant")  # modules under quantkit.algorithms that register themselves
_REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type):
    """Class decorator: register an algorithm class under ``name`` with its config class."""

    def wrap(algo_cls: type) -> type:
        _REGISTRY[name] = (config_cls, algo_cls)
        algo_cls.name = name
        return algo_cls

    return wrap


def _load() -> dict[str, tuple[type, type]]:
    for module in _MODULES:
        importlib.import_module(f"quantkit.algorithms.{module}")
    return _REGISTRY


def algorithm_names() -> list[str]:
    return sorted(_load())


def _entry(name: str) -> tuple[type, type]:
    registry = _load()
    if name not in registry:
        from quantkit.config import ConfigError

        raise ConfigError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


def algorithm_config_class(name: str) -> type:
    return _entry(name)[0]


def build_algorithm(config: Any, w_dtype: Any, a_dtype: Any) -> Any:
    """Instantiate the algorithm of ``config.name`` for the given weight/activation dtypes."""
    algorithm = _entry(config.name)[1](config, w_dtype, a_dtype)
    if algorithm.w_scheme is None and algorithm.a_scheme is not None:
        from quantkit.config import ConfigError

        raise ConfigError(
            "activation-only quantization (w_dtype=float16 with a quantized a_dtype) is not "
            "supported; quantize the weights too, or set a_dtype=float16"
        )
    return algorithm

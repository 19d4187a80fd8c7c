"""Work shared across the runs of a sweep, cached on disk: calibration tokens, baseline perplexity.

Entries live under ``<quantkit cache>/<kind>/<key>.{pt,json}`` where the key hashes everything
the value depends on. Writes are atomic, so parallel sweep jobs may race to fill an entry but
never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from quantkit.models import cache_dir
from quantkit.results import write_json_atomic


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _path(kind: str, parts: dict[str, Any], suffix: str) -> Path:
    return cache_dir() / kind / f"{cache_key(parts)}{suffix}"


def cached_tensor(kind: str, parts: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` once per distinct ``parts``; later calls load the saved tensor."""
    path = _path(kind, parts, ".pt")
    if path.is_file():
        return torch.load(path, weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(value, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return value


def cached_json(kind: str, parts: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Like :func:`cached_tensor` for a JSON-serialisable dict."""
    path = _path(kind, parts, ".json")
    if path.is_file():
        stored = json.loads(path.read_text())
        stored.pop("cache_key_parts", None)
        return stored
    value = compute()
    write_json_atomic(path, {**value, "cache_key_parts": parts})
    return value

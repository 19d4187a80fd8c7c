"""Work shared across a sweep is computed once per distinct key and reused."""

from __future__ import annotations

import torch

from quantkit.cache import cached_json, cached_tensor


def test_cached_tensor_computes_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6).reshape(2, 3)

    first = cached_tensor("calibration", {"model": "m", "seed": 0}, compute)
    again = cached_tensor("calibration", {"seed": 0, "model": "m"}, compute)  # key order does not matter
    other = cached_tensor("calibration", {"model": "m", "seed": 1}, compute)
    assert len(calls) == 2
    assert torch.equal(first, again) and torch.equal(first, other)
    assert not list(tmp_path.rglob("*.tmp"))


def test_cached_json_returns_the_same_dict_fresh_or_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"perplexity": 12.5, "windows": 3}

    fresh = cached_json("baseline", {"model": "m"}, compute)
    cached = cached_json("baseline", {"model": "m"}, compute)
    assert fresh == cached == {"perplexity": 12.5, "windows": 3} and len(calls) == 1


def test_failed_compute_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))

    def boom():
        raise RuntimeError("interrupted")

    try:
        cached_json("baseline", {"model": "m"}, boom)
    except RuntimeError:
        pass
    assert not list(tmp_path.rglob("*.json"))

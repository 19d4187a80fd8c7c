"""Measurements of a run, the atomic ``results.json`` writer, and what a run dir records.

A run dir holds at most one outcome of its latest attempt besides complete results:
``skipped.json`` (an invalid combination in a sweep) or ``failed.json`` (the run crashed).
Complete results are reused by a rerun only when their recorded config equals the new one.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.quant_linear import MSERange, QuantLinear

RESULTS_FILE = "results.json"
SKIPPED_FILE = "skipped.json"  # why a sweep skipped a combination
FAILED_FILE = "failed.json"  # why the latest attempt crashed
SCHEMA_VERSION = 1
# Config keys that do not change what a run computes: results recorded under other values of
# these are still the results of the same run.
REUSE_IGNORED_KEYS = ("output_dir", "overwrite", "name")


class StaleResultsError(RuntimeError):
    """A run dir holds complete results of a different config than the one asked for."""


def algorithm_label(name: str, pre: str | None = None) -> str:
    """The algorithm as reports show it: a composition names both steps (``awq+gptq``)."""
    return f"{pre}+{name}" if pre else name


def model_bytes(model: nn.Module, float_bits: int = 16) -> int:
    """Storage size of every distinct parameter/buffer, floating tensors counted at ``float_bits``.

    Counting floats at 16 bits makes the number independent of the compute dtype (CPU runs
    in float32) and equal to the size of a float16 checkpoint; tied tensors count once.
    """
    seen, total_bits = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total_bits += t.numel() * (float_bits if t.is_floating_point() else t.element_size() * 8)
    return total_bits // 8


def bits_per_weight(model: nn.Module, float_layers: Iterable[str] = (), float_bits: int = 16) -> float | None:
    """Mean stored bits per weight of the quantized linears (codes + scales + zeros), with the
    linears named in ``float_layers`` (those a per-layer rule keeps in full precision: part of a
    mixed scheme) counted at ``float_bits``. ``skip_layers`` are not counted."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    floats = [model.get_submodule(n) for n in float_layers]
    if not layers and not floats:
        return None
    bits = sum(m.weight_storage_bits() for m in layers) + sum(m.weight.numel() * float_bits for m in floats)
    return bits / (sum(m.in_features * m.out_features for m in layers) + sum(m.weight.numel() for m in floats))


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA allocation where used."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def versions() -> dict[str, str]:
    import importlib.metadata

    import transformers
    import triton

    import quantkit

    found = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__, "quantkit": quantkit.__version__,
    }
    try:  # read from the installed metadata: importing lm_eval takes seconds
        found["lm_eval"] = importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        pass
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that ``path`` is either absent or complete, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """The complete results of a run directory, or None if there are none."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("status") == "complete" else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and empty dicts are leaves."""
    if not (isinstance(tree, dict) and tree):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


_ABSENT = object()

# Keys the run config gained after results could have been recorded, with the value that
# computes what the code did before them: recorded results without the key and a config with
# that value are the same run (a sweep started before the key existed still resumes).
LATER_KEYS: dict[str, Any] = {
    "algo.observer": "minmax", "algo.mse_grid": MSERange.n_grid, "algo.mse_max_shrink": MSERange.max_shrink,
    "algo.mse_norm": MSERange.norm, "w_dtype.clip_ratio": 1.0, "a_dtype.clip_ratio": 1.0, "algo.gqa_fold": False,
    "algo.refit_scales": 0, "algo.float_target": 0.0,
    "algo.hessian_inputs": "raw",
}


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def config_differences(recorded: dict[str, Any], current: dict[str, Any],
                       ignored: tuple[str, ...] = REUSE_IGNORED_KEYS) -> list[str]:
    """``key: recorded -> current`` for every dotted key whose value differs (absent counts,
    except a :data:`LATER_KEYS` key absent there and at its earlier-behaviour value now)."""
    current = json.loads(json.dumps(current, default=str))  # as results.json records it
    old, new = _flatten(recorded), _flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in ignored:
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a is _ABSENT and key in LATER_KEYS and b == LATER_KEYS[key]:
            continue
        if a != b:
            out.append(f"{key}: {_show(a)} there, {_show(b)} now")
    return out


def reusable_results(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The complete results in ``run_dir`` if they were computed with ``config``, else None when
    there are none or ``config`` asks to ``overwrite`` them; results of another config are a
    :class:`StaleResultsError` naming the differing keys."""
    done = read_results(run_dir)
    if done is None or config.get("overwrite"):
        return None
    diffs = config_differences(done.get("config") or {}, config)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise StaleResultsError(
            f"{Path(run_dir) / RESULTS_FILE} holds the complete results of a different config ({shown}): "
            "run into another dir (hydra.run.dir=...) or set overwrite=true to replace them"
        )
    return done


def write_failed(run_dir: Path, error: BaseException, config: dict[str, Any] | None) -> None:
    """Record that the latest attempt of this run crashed, and with what (read by the report)."""
    message = f"{type(error).__name__}: {error}".strip()
    write_json_atomic(Path(run_dir) / FAILED_FILE, {"status": "failed", "error": message, "config": config})


def write_skipped(run_dir: Path, reason: str, config: dict[str, Any] | None) -> None:
    """Record why a sweep skipped this combination (read by the report)."""
    write_json_atomic(Path(run_dir) / SKIPPED_FILE, {"status": "skipped", "reason": reason, "config": config})

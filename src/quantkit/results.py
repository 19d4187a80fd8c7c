"""Measurements of a run and the atomic ``results.json`` writer."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.quant_linear import QuantLinear

RESULTS_FILE = "results.json"
SKIPPED_FILE = "skipped.json"  # why a sweep skipped a combination
SCHEMA_VERSION = 1


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


def bits_per_weight(model: nn.Module) -> float | None:
    """Mean stored bits per weight of the quantized linears (codes + scales + zeros)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    bits = sum(m.weight_storage_bits() for m in layers)
    return bits / sum(m.in_features * m.out_features for m in layers)


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA allocation where used."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def versions() -> dict[str, str]:
    import transformers
    import triton

    import quantkit

    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "triton": triton.__version__, "transformers": transformers.__version__, "quantkit": quantkit.__version__,
    }


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


def write_skipped(run_dir: Path, reason: str, config: dict[str, Any] | None) -> None:
    """Record why a sweep skipped this combination (read by the report)."""
    write_json_atomic(Path(run_dir) / SKIPPED_FILE, {"status": "skipped", "reason": reason, "config": config})

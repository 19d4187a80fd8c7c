"""One run, end to end, in this order:

1. validate the config: devices, the algorithm and its dtype schemes (the typed config was
   checked when it was built);
2. validate and read the inputs without weights (:mod:`quantkit.inputs`): the model's files,
   config, layout and tokenizer, ``skip_layers``, sequence lengths, group size, the evaluation
   text, the calibration tokens and the task data of ``eval.tasks``;
3. load the weights; 4. rotate (``rotation``, :mod:`quantkit.rotation`; also without quantization)
   and quantize; 5. evaluate; 6. write ``results.json`` atomically.

A bad override or input fails in steps 1-2, in seconds, and leaves no results behind.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from quantkit import models
from quantkit.algorithms.registry import build_algorithm
from quantkit.cache import cached_json
from quantkit.config import ConfigError, RunConfig, check
from quantkit.evaluation import evaluate
from quantkit.inputs import prepare_inputs
from quantkit.pipeline import quantize_model
from quantkit.rotation import label as rotation_label
from quantkit.rotation import rotate_model
from quantkit.results import (
    RESULTS_FILE, SCHEMA_VERSION, algorithm_label, bits_per_weight, device_name, model_bytes, peak_memory,
    versions, write_json_atomic,
)
from quantkit.serialization import save_for_run

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(value: str, key: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a ConfigError."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"{key}={value} but no CUDA GPU is available; use {key}=cpu or auto")
        index = device.index or 0
        count = torch.cuda.device_count()
        check(index < count, f"{key}={value} but only {count} CUDA device(s) exist")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def calibration_autocast(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of the calibration forwards for ``calibrate_dtype=name`` (None: none).

    ``model`` (the default) and the model's own dtype mean no autocast. bfloat16 on a CPU pays
    off only with native bfloat16 matmuls (AVX512-BF16/AMX); elsewhere it is slower, said once.
    """
    if name == "model" or _DTYPES[name] == dtype:
        return None
    if device.type == "cpu" and not (torch.backends.mkldnn.is_available()
                                     and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())):
        log.warning("calibrate_dtype=%s: this CPU has no native bfloat16/float16 matmuls; "
                    "calibration will be slower than with calibrate_dtype=model", name)
    return _DTYPES[name]


def run(cfg: RunConfig, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``cfg``; write and return the results (``resolved`` is the config as composed)."""
    t_start = time.perf_counter()
    # 1. the config
    device = resolve_device(cfg.device, "device")
    offload = resolve_device(cfg.offload, "offload")
    algorithm = build_algorithm(cfg.algo, cfg.w_dtype, cfg.a_dtype)
    check(not cfg.calibrate_reuse or algorithm.layer_sequential,
          f"calibrate_reuse=true reuses outputs between the calibration passes of algo.layer_sequential=true; "
          f"algo={cfg.algo.name} makes one pass per block (algo.layer_sequential=false): set calibrate_reuse=false")
    dtype = compute_dtype(cfg.model.dtype, device)
    autocast = calibration_autocast(cfg.calibrate_dtype, device, dtype)

    # 2. the inputs, without weights (and every linear's scheme, planned on the model's skeleton)
    inputs = prepare_inputs(cfg, algorithm)
    quantizes = inputs.schemes.quantizes
    if quantizes and inputs.samples is None and (algorithm.block_sequential or algorithm.layer_sequential):
        log.info("block_sequential/layer_sequential have no effect: algo=%s with these dtypes needs no calibration data", algorithm.name)

    # 3. the weights
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(inputs.path, dtype, offload, inputs.tokenizer)
    load_seconds = time.perf_counter() - t0

    def measure() -> dict[str, Any]:
        model.to(device)
        out = evaluate(model, tokenizer, inputs.eval_ids, cfg.eval, device, inputs.tasks, inputs.max_length)
        model.to(offload)
        return out

    baseline = None
    if cfg.eval.baseline:  # the same for every run of a sweep on this model and data: cached
        key = {"model": inputs.path, "dtype": str(dtype), "device": device.type, "data": dataclasses.asdict(cfg.data),
               "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "baseline"},
               "tasks": inputs.tasks.fingerprint() if inputs.tasks else None}
        baseline = cached_json("baseline", key, measure)
    size_before = model_bytes(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # 4. rotate the float model (before any algorithm), then quantize
    rotation = None
    if cfg.rotation.active:
        rotation = rotate_model(model, inputs.arch, cfg.rotation, inputs.hf_config, inputs.eval_ids).as_dict()
    t0 = time.perf_counter()
    report = quantize_model(model, inputs.arch, algorithm, inputs.samples, device, offload, cfg.skip_layers,
                            calibrate_dtype=autocast, reuse_outputs=cfg.calibrate_reuse, layers=cfg.layers,
                            sensitivity=cfg.sensitivity) if quantizes else None
    quant_seconds = time.perf_counter() - t0
    # 5. evaluate (and save)
    evaluation = measure()
    task_scores = evaluation.pop("tasks")
    saved = {}
    if cfg.save.enabled:
        saved = save_for_run(model, tokenizer, Path(cfg.output_dir) / "model", cfg.save.format, cfg.save.dtype, resolved)
        saved["saved_size_ratio"] = saved["saved_bytes"] / size_before  # vs the float16 checkpoint

    algo = algorithm_label(algorithm.name, getattr(cfg.algo, "pre", None))
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "algo": f"{rotation_label(cfg.rotation)}+{algo}" if rotation else algo,
        "rotation": rotation,
        "w_dtype": cfg.w_dtype.name,
        "a_dtype": cfg.a_dtype.name,
        # the groups the weights have (a block format's own block, not algo.groupsize)
        "groupsize": algorithm.w_scheme.groupsize if algorithm.w_scheme else getattr(cfg.algo, "groupsize", None),
        "w_scheme": algorithm.w_scheme.describe() if algorithm.w_scheme else None,
        "a_scheme": algorithm.a_scheme.describe() if algorithm.a_scheme else None,
        "model": cfg.model.name,
        "model_type": inputs.model_type,
        "perplexity": evaluation["perplexity"],
        "eval": evaluation,
        "baseline_perplexity": baseline["perplexity"] if baseline else None,
        "tasks": task_scores,
        "baseline_tasks": (baseline.get("tasks") or {}) if baseline else {},
        "bits_per_weight": bits_per_weight(model, report.schemes.kept_float() if report else ()),
        "model_bytes_before": size_before,
        "model_bytes_after": model_bytes(model),
        **saved,
        "quantized_layers": len(report.quantized) if report else 0,
        "skipped_layers": report.skipped if report else [],
        "mixed": bool(report and report.schemes.mixed),
        "sensitivity": cfg.sensitivity.label,
        "scheme_counts": report.schemes.counts() if report else {},
        "layer_schemes": report.schemes.to_json() if report else {},
        **(algorithm.record() if report else {}),  # the algorithm's own choices (SmoothQuant: alpha per group)
        "quantization_seconds": quant_seconds,
        "load_seconds": load_seconds,
        "total_seconds": time.perf_counter() - t_start,
        **peak_memory(device),
        "device": str(device),
        "device_name": device_name(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "calibrate_dtype": str(autocast or dtype).replace("torch.", ""),
        "versions": versions(),
        "config": resolved,
    }
    # 6. write
    write_json_atomic(Path(cfg.output_dir) / RESULTS_FILE, results)
    log.info(summary_line(results))
    return results


def summary_line(r: dict[str, Any]) -> str:
    """One line a person reads at the end of a run."""
    scheme = r["w_scheme"] or "float16"
    if r["a_scheme"]:
        scheme += f" / act {r['a_scheme']}"
    if r.get("mixed"):
        scheme = "mixed: " + ", ".join(f"{n} x {s}" for s, n in r["scheme_counts"].items())
    ppl = f"ppl {r['perplexity']:.3f}"
    if r["baseline_perplexity"]:
        delta = 100 * (r["perplexity"] / r["baseline_perplexity"] - 1)
        ppl += f" (float16 {r['baseline_perplexity']:.3f}, {delta:+.2f}%)"
    bits = f"{r['bits_per_weight']:.2f} bits/weight" if r["bits_per_weight"] else "unquantized"
    mb = 1024**2
    tasks = "".join(f" | {name} {_headline(scores)}" for name, scores in (r.get("tasks") or {}).items())
    return (
        f"{r['algo']} {scheme} on {r['model']}: {ppl}{tasks} | {bits} | "
        f"{r['model_bytes_before'] / mb:.1f} MiB -> {r['model_bytes_after'] / mb:.1f} MiB | "
        f"quantized in {r['quantization_seconds']:.1f} s"
    )


def _headline(scores: dict[str, Any]) -> str:
    """A task's first metric with its standard error, e.g. ``acc 0.412 +- 0.013``."""
    for metric, value in scores.items():
        if isinstance(value, float) and not metric.endswith("_stderr"):
            err = scores.get(f"{metric}_stderr")
            return f"{metric} {value:.3f}" + (f" +- {err:.3f}" if isinstance(err, float) else "")
    return ""


__all__ = ["run", "summary_line", "resolve_device", "ConfigError"]

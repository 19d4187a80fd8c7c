"""The entry point end to end on the tiny model: results.json, early errors, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit import models, runner
from quantkit.config import ConfigError, build_run_config
from tests.test_config import compose_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-llama", "eval.seq_length=64", "eval.max_windows=3", "num_calibrate=4", "calibrate_seq_length=32"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_run_writes_complete_results(tmp_path):
    proc = run_cli(*TINY, "algo.groupsize=32", "eval.baseline=true", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete" and results["algo"] == "rtn"
    assert results["w_scheme"] == "int4 g32 asym unsigned"
    for key in ("perplexity", "baseline_perplexity", "bits_per_weight", "model_bytes_before", "model_bytes_after",
                "quantization_seconds", "peak_rss_bytes", "versions", "device", "config"):
        assert results[key] is not None, key
    assert results["model_bytes_after"] < results["model_bytes_before"]
    assert 4.5 < results["bits_per_weight"] < 5.5
    assert results["config"]["algo"]["groupsize"] == 32
    assert set(results["versions"]) >= {"torch", "triton", "transformers"}
    assert "ppl" in proc.stdout + proc.stderr  # the one-line summary


def test_float16_run_is_the_unquantized_baseline(tmp_path):
    cfg = build_run_config(compose_dict(*TINY, "w_dtype=float16", f"output_dir={tmp_path}"))
    results = runner.run(cfg)
    assert results["bits_per_weight"] is None and results["quantized_layers"] == 0
    assert results["model_bytes_after"] == results["model_bytes_before"]


def test_bits_order_perplexity_on_tiny_model(tmp_path):
    ppl = {}
    for dtype in ("int8", "int2"):
        cfg = build_run_config(compose_dict(*TINY, f"w_dtype={dtype}", "algo.groupsize=-1", f"output_dir={tmp_path / dtype}"))
        ppl[dtype] = runner.run(cfg)["perplexity"]
    base = runner.run(build_run_config(compose_dict(*TINY, "w_dtype=float16", f"output_dir={tmp_path / 'fp'}")))["perplexity"]
    assert abs(ppl["int8"] - base) / base < 0.01
    assert ppl["int2"] > ppl["int8"]


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*_a, **_k):
        raise AssertionError("the model must not load for an invalid config")

    monkeypatch.setattr(models, "load_model", fail)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.groupsize=4096"], "algo.groupsize=4096 is larger than the model's smallest layer input (64)"),
        (["device=cuda"], "device=cuda but no CUDA GPU is available"),
        (["model_type=bloom"], "unsupported architecture model_type='bloom'"),
        (["w_dtype=float16", "a_dtype=int8"], "activation-only quantization"),
        (["algo=awq", "calibrate_reuse=true"], "calibrate_reuse=true reuses outputs between the calibration passes"),
        (["algo=gptq", "algo.layer_sequential=false", "calibrate_reuse=true"], "algo=gptq makes one pass per block"),
    ],
)
def test_invalid_runs_fail_before_the_model_loads(tmp_path, no_model_load, overrides, message):
    cfg = build_run_config(compose_dict(*TINY, *overrides, f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.run(cfg)
    assert not (tmp_path / "results.json").exists()


def test_cli_bad_override_is_a_clear_error(tmp_path):
    proc = run_cli(*TINY, "algo.groupsize=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "algo.groupsize=0 is not valid" in proc.stderr
    assert not (tmp_path / "results.json").exists()
    proc = run_cli("w_dtype=int5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "int4" in proc.stderr and "Could not find 'w_dtype/int5'" in proc.stderr


def test_cli_sweep_runs_every_combination(tmp_path):
    proc = run_cli("-m", *TINY, "algo.groupsize=16,32", "w_dtype=int3,int4", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert sorted((r["w_dtype"], r["groupsize"]) for r in results) == [
        ("int3", 16), ("int3", 32), ("int4", 16), ("int4", 32)
    ]


@pytest.mark.parametrize(
    ("name", "device", "dtype", "expected"),
    [
        ("model", "cpu", torch.float32, None),
        ("float32", "cpu", torch.float32, None),  # already the model's dtype: no autocast
        ("bfloat16", "cpu", torch.float32, torch.bfloat16),
        ("float16", "cuda", torch.bfloat16, torch.float16),
        ("model", "cuda", torch.float16, None),
    ],
)
def test_calibration_autocast(name, device, dtype, expected):
    assert runner.calibration_autocast(name, torch.device(device), dtype) == expected


def test_calibration_autocast_warns_on_cpus_without_native_bfloat16(monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level("WARNING", logger="quantkit.runner"):
        assert runner.calibration_autocast("bfloat16", torch.device("cpu"), torch.float32) == torch.bfloat16
    assert "no native bfloat16" in caplog.text


@pytest.mark.parametrize("reuse", [True, False])
def test_calibrate_keys_reach_the_pipeline(tmp_path, monkeypatch, reuse):
    seen = {}
    real = runner.quantize_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "quantize_model", spy)
    result = runner.run(build_run_config(compose_dict(
        *TINY, "algo=gptq", "algo.groupsize=32", f"calibrate_reuse={str(reuse).lower()}",
        "calibrate_dtype=bfloat16", f"output_dir={tmp_path}")))
    assert seen["reuse_outputs"] is reuse
    assert seen["calibrate_dtype"] == torch.bfloat16
    assert result["calibrate_dtype"] == "bfloat16"


@pytest.mark.slow
def test_rerun_reuses_only_the_results_of_the_same_config(tmp_path):
    args = [*TINY, f"hydra.run.dir={tmp_path}"]
    assert run_cli(*args, "algo.groupsize=32").returncode == 0
    path = tmp_path / "results.json"
    stamp, first = path.stat().st_mtime_ns, json.loads(path.read_text())

    same = run_cli(*args, "algo.groupsize=32")
    assert same.returncode == 0 and "complete results already in" in same.stdout + same.stderr
    assert path.stat().st_mtime_ns == stamp

    other = run_cli(*args, "algo.groupsize=16")  # not the run whose results are there
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "algo.groupsize: 32 there, 16 now" in other.stderr and "overwrite=true" in other.stderr
    assert path.stat().st_mtime_ns == stamp

    again = run_cli(*args, "algo.groupsize=16", "overwrite=true")
    assert again.returncode == 0, again.stderr[-3000:]
    replaced = json.loads(path.read_text())
    assert replaced["groupsize"] == 16 and replaced["w_scheme"] != first["w_scheme"]


def test_composition_is_labelled_with_both_steps(tmp_path):
    results = runner.run(build_run_config(compose_dict(
        *TINY, "algo=awq_gptq", "algo.groupsize=32", f"output_dir={tmp_path}")))
    assert results["algo"] == "awq+gptq"
    assert runner.summary_line(results).startswith("awq+gptq int4 g32")


FIXTURES = ROOT / "tests" / "fixtures"
TASKS = ["eval.tasks=[quantkit_tiny_mc,ceval]", f"eval.task_paths=[{FIXTURES / 'lm_eval_tasks'}]",
         f"eval.ceval.path={FIXTURES / 'ceval'}", "eval.ceval.subjects=[logic]"]


def test_tasks_score_the_quantized_model_in_memory_and_the_cached_baseline(tmp_path, monkeypatch):
    from quantkit import evaluation
    from quantkit.quant_linear import QuantLinear

    seen = []
    real = evaluation.evaluate_tasks

    def spy(model, *args, **kwargs):
        seen.append(any(isinstance(m, QuantLinear) for m in model.modules()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_tasks", spy)
    args = [*TINY, "algo=gptq", "algo.groupsize=32", "eval.baseline=true", *TASKS]
    results = runner.run(build_run_config(compose_dict(*args, f"output_dir={tmp_path / 'a'}")))
    assert seen == [False, True]  # the float16 baseline, then the quantized model (never saved and reloaded)
    for key in ("tasks", "baseline_tasks"):
        assert list(results[key]) == ["quantkit_tiny_mc", "ceval"]
        assert results[key]["quantkit_tiny_mc"]["n"] == 6 and 0 <= results[key]["quantkit_tiny_mc"]["acc"] <= 1
        assert results[key]["ceval"]["subjects"]["logic"]["n"] == 3 and "acc_stderr" in results[key]["ceval"]
    assert results["versions"]["lm_eval"].startswith("0.4")
    assert "quantkit_tiny_mc acc" in runner.summary_line(results)

    again = runner.run(build_run_config(compose_dict(*args, "w_dtype=int3", f"output_dir={tmp_path / 'b'}")))
    assert seen == [False, True, True]  # the baseline came from the cache
    assert again["baseline_tasks"] == results["baseline_tasks"]


def test_run_without_tasks_records_none(tmp_path):
    results = runner.run(build_run_config(compose_dict(*TINY, "w_dtype=float16", f"output_dir={tmp_path}")))
    assert results["tasks"] == {} and results["baseline_tasks"] == {}

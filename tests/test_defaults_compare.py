"""benchmarks/compare_llmcompressor.py: what each preset runs on each side, and the quantkit side
end to end on the tiny model (llm-compressor is not installed here: its side is not run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama", "--num-calibrate", "4", "--seq-length", "32", "--eval-seq-length", "64",
        "--max-windows", "3"]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_llmcompressor", ROOT / "benchmarks" / "compare_llmcompressor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_run_each_tool_with_its_own_defaults(compare):
    args = compare.parse_args(["--algo", "gptq", "--preset", "defaults", "--groupsize", "64", "--bits", "3"])
    (lc,) = compare.llmcompressor_candidates(args)
    assert lc["symmetric"] and lc["actorder"] == "library-default" and lc["bits"] == 3
    assert compare.quantkit_candidates(args) == [("gptq (defaults)", ["algo=gptq", "w_dtype=int3", "algo.groupsize=64"])]
    args = compare.parse_args(["--algo", "smoothquant", "--preset", "defaults"])
    (lc,) = compare.llmcompressor_candidates(args)
    assert lc["strength"] == 0.5 and lc["weights"] == "rtn"
    assert compare.quantkit_candidates(args)[0][1] == ["algo=smoothquant", "w_dtype=int8", "a_dtype=int8"]


def test_best_runs_every_candidate_of_each_tool(compare):
    args = compare.parse_args(["--algo", "awq", "--preset", "best"])
    assert [c["symmetric"] for c in compare.llmcompressor_candidates(args)] == [False, True]
    studied = sorted(p.stem for p in (ROOT / "conf" / "study").glob("awq*.yaml"))
    assert [name for name, _ in compare.quantkit_candidates(args)] == studied
    args = compare.parse_args(["--algo", "gptq", "--preset", "best"])
    assert len(compare.llmcompressor_candidates(args)) == 4
    args = compare.parse_args(["--algo", "smoothquant", "--preset", "best"])
    assert {c["strength"] for c in compare.llmcompressor_candidates(args)} == {0.5, 0.8}
    assert "algo.alpha=auto" in compare.quantkit_candidates(args)[2][1]


def test_protocol_reaches_the_quantkit_runs(compare):
    args = compare.parse_args(["--data", "austen", "--max-windows", "63", "--seed", "3"])
    keys = compare.protocol_overrides(args)
    assert {"data=austen", "eval.max_windows=63", "seed=3", "model=smollm2-135m", "num_calibrate=128"} <= set(keys)
    assert "model=hf" in compare.protocol_overrides(compare.parse_args(["--model", "/some/dir"]))


def test_custom_preset_is_llmcompressor_gptq_only(compare):
    with pytest.raises(SystemExit, match="--preset custom"):
        compare.main(["--algo", "awq"])


def test_quantkit_side_runs_on_the_tiny_model(compare, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    out = compare.main(["--algo", "awq", "--preset", "defaults", "--side", "quantkit", "--groupsize", "32", *TINY,
                        "--work-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "cmp.json")])
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved == out and "llmcompressor" not in saved
    (run,) = saved["quantkit"]
    assert run["name"] == "awq (defaults)" and run["perplexity"] > 1 and saved["best_quantkit"] == run["name"]
    results = json.loads((tmp_path / "runs" / "00" / "results.json").read_text())
    assert results["config"]["algo"]["name"] == "awq" and results["config"]["eval"]["max_windows"] == 3
    assert results["perplexity"] == run["perplexity"]

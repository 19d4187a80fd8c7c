"""What a run dir records: reuse only of results of the same config, failures, algorithm labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.results import (
    FAILED_FILE, RESULTS_FILE, StaleResultsError, algorithm_label, config_differences, read_results,
    reusable_results, write_failed, write_json_atomic,
)

CONFIG = {"algo": {"name": "rtn", "groupsize": 32}, "w_dtype": {"name": "int4", "has_zero": True},
          "skip_layers": ["lm_head"], "seed": 0, "output_dir": "/runs/a", "name": "default", "overwrite": False}


def _with(**changes: object) -> dict:
    config = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def _finished(run_dir: Path, config: dict, status: str = "complete") -> dict:
    results = {"status": status, "perplexity": 12.5, "config": config}
    write_json_atomic(run_dir / RESULTS_FILE, results)
    return results


def test_differences_name_every_changed_key_with_both_values():
    new = _with(algo__groupsize=64, seed=1)
    new["w_dtype"]["full_range"] = True  # a key the recorded config does not have
    assert config_differences(CONFIG, new) == [
        "algo.groupsize: 32 there, 64 now", "seed: 0 there, 1 now", "w_dtype.full_range: (absent) there, true now",
    ]


def test_a_key_added_later_matches_results_recorded_without_it_only_at_its_old_behaviour():
    """Results written before ``algo.observer`` / ``a_dtype.clip_ratio`` existed are the run that
    now says minmax / 1.0; any other value is a different run."""
    new = _with()
    new["algo"]["observer"], new["w_dtype"]["clip_ratio"] = "minmax", 1.0
    assert config_differences(CONFIG, new) == []
    new["algo"]["observer"], new["w_dtype"]["clip_ratio"] = "mse", 0.9
    assert config_differences(CONFIG, new) == [
        'algo.observer: (absent) there, "mse" now', 'w_dtype.clip_ratio: (absent) there, 0.9 now',
    ]


def test_keys_that_do_not_change_the_computation_are_ignored():
    assert config_differences(CONFIG, _with(output_dir="/elsewhere", name="grid", overwrite=True)) == []


def test_tuples_compare_as_the_lists_json_records():
    assert config_differences(CONFIG, {**CONFIG, "skip_layers": ("lm_head",)}) == []
    assert config_differences(CONFIG, {**CONFIG, "skip_layers": ("lm_head", "down_proj")}) != []


def test_results_of_the_same_config_are_reused(tmp_path):
    assert reusable_results(tmp_path, CONFIG) is None  # nothing there
    results = _finished(tmp_path, CONFIG)
    assert reusable_results(tmp_path, _with(output_dir=str(tmp_path))) == results


def test_results_of_another_config_are_an_error_naming_the_keys(tmp_path):
    _finished(tmp_path, CONFIG)
    with pytest.raises(StaleResultsError) as info:
        reusable_results(tmp_path, _with(algo__groupsize=64))
    message = str(info.value)
    assert str(tmp_path / RESULTS_FILE) in message and "algo.groupsize: 32 there, 64 now" in message
    assert "overwrite=true" in message and "\n" not in message


def test_overwrite_and_incomplete_results_are_not_reused(tmp_path):
    _finished(tmp_path, CONFIG)
    assert reusable_results(tmp_path, _with(algo__groupsize=64, overwrite=True)) is None
    _finished(tmp_path, CONFIG, status="running")
    assert read_results(tmp_path) is None and reusable_results(tmp_path, _with(algo__groupsize=64)) is None


def test_failure_record(tmp_path):
    write_failed(tmp_path, RuntimeError("Cholesky failed"), CONFIG)
    record = json.loads((tmp_path / FAILED_FILE).read_text())
    assert record == {"status": "failed", "error": "RuntimeError: Cholesky failed", "config": CONFIG}


@pytest.mark.parametrize(("name", "pre", "label"), [("gptq", None, "gptq"), ("gptq", "awq", "awq+gptq"),
                                                   ("gptq", "smoothquant", "smoothquant+gptq"), ("rtn", None, "rtn")])
def test_algorithm_label_names_the_composition(name, pre, label):
    assert algorithm_label(name, pre) == label

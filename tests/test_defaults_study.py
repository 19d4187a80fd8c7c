"""The defaults-study presets: they compose, expand into the intended jobs (without running
them), and every variant of conf/study/ builds a valid run with the settings it names."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from quantkit.algorithms.registry import build_algorithm
from quantkit.config import build_run_config
from tests.test_config import compose_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = sorted(p.stem for p in (CONF / "study").glob("*.yaml"))


def _jobs(experiment: str) -> tuple[dict, list[list[str]]]:
    """The preset's sweeper params and the job override lists Hydra's basic sweeper makes of them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return params, batch


def test_weight_only_preset_expands_into_every_variant_bits_group_and_corpus():
    params, jobs = _jobs("defaults_study")
    assert params["+study"].split(",") == [v for v in params["+study"].split(",") if v in VARIANTS]
    assert sorted(params["+study"].split(",")) == VARIANTS, "every variant file is swept, and only those"
    axes = {"w_dtype": ["int3", "int4"], "algo.groupsize": ["64", "128", "-1"], "data": ["pydoc", "austen"]}
    expected = {tuple(sorted([f"+study={v}", *(f"{k}={x}" for k, x in zip(axes, combo))]))
                for v in VARIANTS for combo in itertools.product(*axes.values())}
    assert len(jobs) == len(expected) == len(VARIANTS) * 12 == 240
    assert {tuple(sorted(job)) for job in jobs} == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_the_run_it_names(variant):
    cfg = build_run_config(compose_dict("+experiment=defaults_study", f"+study={variant}", "w_dtype=int3",
                                        "algo.groupsize=64", "data=austen"))
    assert cfg.name == "defaults_study" and cfg.eval.baseline and cfg.eval.max_windows == 63
    assert cfg.data.name == cfg.calibrate_name == "austen"  # calibrated and evaluated on each corpus
    algo = build_algorithm(cfg.algo, cfg.w_dtype, cfg.a_dtype)
    assert algo.name == variant.split("_")[0] and algo.w_scheme.groupsize == 64 and algo.a_scheme is None
    words = variant.split("_")[1:]
    assert algo.w_scheme.has_zero == ("sym" not in words)
    if "sym" in words:
        assert algo.w_scheme.symmetric_range == "full" and not algo.w_scheme.unsigned
    if algo.name == "gptq":
        assert cfg.algo.actorder == ("actorder" in words)
        assert cfg.algo.layer_sequential == ("parallel" not in words)
        assert cfg.algo.percdamp == (0.1 if "damp01" in words else 0.01)
    if algo.name in ("gptq", "rtn"):
        assert cfg.algo.observer == ("mse" if "mse" in words else "minmax")
    if algo.name == "awq":
        assert cfg.algo.clip == ("noclip" not in words)
        assert cfg.algo.n_grid == (10 if "grid10" in words else 20)
        assert cfg.algo.max_shrink == (0.25 if "shrink025" in words else 0.5)
        assert cfg.algo.block_sequential == ("sequential" in words)


def test_w8a8_preset_sweeps_smoothquant_alpha_on_both_corpora():
    params, jobs = _jobs("defaults_study_w8a8")
    assert params == {"algo.alpha": "0.5,0.8,auto", "data": "pydoc,austen"}
    assert len(jobs) == 6
    for job in jobs:
        cfg = build_run_config(compose_dict("+experiment=defaults_study_w8a8", *job))
        algo = build_algorithm(cfg.algo, cfg.w_dtype, cfg.a_dtype)
        assert algo.name == "smoothquant" and algo.w_scheme.dtype.name == algo.a_scheme.dtype.name == "int8"
        assert cfg.data.name == cfg.calibrate_name and cfg.eval.max_windows == 63
        assert str(cfg.algo.alpha) in {"0.5", "0.8", "auto"}

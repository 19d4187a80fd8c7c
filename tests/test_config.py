"""Hydra composition and the typed config: every group composes, bad values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from quantkit.algorithms.registry import algorithm_names
from quantkit.config import ConfigError, DTypeConfig, build_run_config
from quantkit.dtypes import dtype_names
from quantkit.layers import expand_dtype_names, hydra_dtype

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_dict(*overrides: str) -> dict:
    """The config as ``scripts/run.py`` resolves it (rule dtype names expanded)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["output_dir=out", *overrides])
        return expand_dtype_names(OmegaConf.to_container(cfg, resolve=True), hydra_dtype)


def test_default_config_builds():
    run = build_run_config(compose_dict())
    assert run.model.name == "smollm2-135m"
    assert run.algo.name == "rtn" and run.algo.groupsize == 128
    assert run.w_dtype == DTypeConfig("int4", has_zero=True, unsigned=True)
    assert run.a_dtype.is_identity
    assert run.skip_layers == ("lm_head",)
    assert run.calibrate_name == run.data.name == "pydoc"
    assert not run.save.enabled and run.save.format == "quantkit"
    assert run.overwrite is False  # complete results of another config are an error, not replaced


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "dtype").glob("*.yaml")))
def test_every_dtype_composes_for_weights_and_activations(name):
    run = build_run_config(compose_dict(f"w_dtype={name}", f"a_dtype={name}", "algo.groupsize=-1"))
    assert run.w_dtype.name == name and run.a_dtype.name == name


def test_dtype_files_cover_the_registry():
    assert {p.stem for p in (CONF / "dtype").glob("*.yaml")} == set(dtype_names())
    for group in ("w_dtype", "a_dtype"):
        assert {p.stem for p in (CONF / group).glob("*.yaml")} == set(dtype_names())


@pytest.mark.parametrize("algo", algorithm_names())
def test_every_algorithm_composes(algo):
    assert build_run_config(compose_dict(f"algo={algo}")).algo.name == algo


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "hf"))
def test_every_model_composes(model):
    assert build_run_config(compose_dict(f"model={model}")).model.path


@pytest.mark.parametrize("data", ["pydoc", "wikitext2", "c4", "ptb"])
def test_every_dataset_composes(data):
    run = build_run_config(compose_dict(f"data={data}"))
    assert run.data.name == data == run.calibrate_name


def test_local_text_dataset_and_hf_model_take_paths():
    run = build_run_config(compose_dict("data=text", "data.path=corpus.txt", "model=hf", "model.path=some/dir"))
    assert run.data.name == run.data.path == "corpus.txt"
    assert run.model.name == "some/dir"


def test_unset_paths_still_name_the_run_and_are_reported_missing():
    """Hydra names the run dir after model.name, so an unset model.path must not break it."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["output_dir=out", "model=hf", "data=text"])
    assert cfg.model.name == "hf" and cfg.data.name == "text"
    assert OmegaConf.missing_keys(cfg) == {"model.path", "data.path"}


def test_unknown_dtype_fails_at_compose_time_listing_options():
    with pytest.raises(MissingConfigException) as exc:
        compose_dict("w_dtype=int5")
    assert "int4" in str(exc.value) and "fp8" in str(exc.value)


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_dict("algo.grupsize=64")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.groupsize=0"], "algo.groupsize=0"),
        (["algo.groupsize=-2"], "algo.groupsize=-2"),
        (["num_calibrate=0"], "num_calibrate=0"),
        (["calibrate_seq_length=0"], "calibrate_seq_length=0"),
        (["device=tpu"], "device='tpu'"),
        (["eval.seq_length=1"], "eval.seq_length=1"),
        (["eval.max_windows=0"], "eval.max_windows=0"),
        (["algo.w_qtype=per_row"], "per_row"),
        (["model.dtype=int8"], "model.dtype"),
        (["num_calibrate=many"], "num_calibrate must be an integer"),
        (["skip_layers=['(unclosed']"], "skip_layers"),
        (["save.format=gguf"], "save.format='gguf' is not valid; choose one of: quantkit, compressed-tensors"),
        (["save.dtype=int8"], "save.dtype='int8' is not valid"),
        (["calibrate_dtype=int8"], "calibrate_dtype='int8' is not valid"),
    ],
)
def test_invalid_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=None) as exc:
        run = build_run_config(compose_dict(*overrides))
        from quantkit.algorithms.registry import build_algorithm

        build_algorithm(run.algo, run.w_dtype, run.a_dtype)
    assert message in str(exc.value)


def test_unknown_key_in_plain_dict_is_rejected_with_valid_keys():
    data = compose_dict()
    data["algo"]["groupsze"] = 64
    with pytest.raises(ConfigError, match="algo.groupsze.*valid keys of algo: .*groupsize"):
        build_run_config(data)


def test_unknown_algorithm_lists_valid_ones():
    data = compose_dict()
    data["algo"]["name"] = "magic"
    with pytest.raises(ConfigError, match="unknown algorithm 'magic'; valid: .*rtn"):
        build_run_config(data)


def test_groupsize_with_per_channel_is_rejected():
    from quantkit.algorithms.registry import build_algorithm

    run = build_run_config(compose_dict("algo.w_qtype=per_channel"))
    with pytest.raises(ConfigError, match="groupsize=128 has no meaning with algo.w_qtype=per_channel"):
        build_algorithm(run.algo, run.w_dtype, run.a_dtype)
    run = build_run_config(compose_dict("algo.w_qtype=per_channel", "algo.groupsize=-1"))
    assert build_algorithm(run.algo, run.w_dtype, run.a_dtype).w_scheme.granularity == "per_channel"


def test_float_dtype_with_zero_point_is_rejected():
    with pytest.raises(ConfigError, match="fp8 is a signed float grid"):
        build_run_config(compose_dict("w_dtype=fp8", "w_dtype.has_zero=true"))

"""SmoothQuant ``alpha=auto``: the key's validation, the per-group search against a brute force
through the real fold and QuantLinear forward, and the alphas recorded in results.json."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from quantkit import models, runner
from quantkit.algorithms import smoothquant as sq
from quantkit.algorithms.base import ChannelRangeObserver
from quantkit.algorithms.fold import fold_scales
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.smoothquant_search import DEFAULT_ALPHA_GRID, best_alpha
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig, build, build_run_config
from quantkit.pipeline import FoldTarget, quantize_model
from tests.test_config import compose_dict
from tests.test_smoothquant import load, samples

INT8 = DTypeConfig("int8")
INT4 = DTypeConfig("int4")
TINY = ["model=tiny-llama", "eval.seq_length=64", "eval.max_windows=3", "num_calibrate=4", "calibrate_seq_length=32"]


# ---------------------------------------------------------------- the keys


def test_yaml_default_grid_is_the_code_default():
    assert DEFAULT_ALPHA_GRID == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    config = build(sq.SmoothQuantConfig, {"alpha": "auto"}, "algo")
    assert config.auto and config.alpha_grid == DEFAULT_ALPHA_GRID
    assert build(sq.SmoothQuantConfig, {"alpha": "auto", "alpha_grid": [0.2, 0.7], "max_tokens": 64},
                 "algo").alpha_grid == (0.2, 0.7)
    assert not build(sq.SmoothQuantConfig, {"alpha": 1}, "algo").auto


@pytest.mark.parametrize("data, match", [
    ({"alpha": "best"}, r"algo.alpha='best' is not valid; use a number in \[0, 1\].* or auto"),
    ({"alpha": 1.5}, r"algo.alpha=1.5 is not valid.*or auto"),
    ({"alpha": -0.1}, r"algo.alpha=-0.1 is not valid"),
    ({"alpha": True}, r"algo.alpha"),
    ({"alpha": "auto", "alpha_grid": []}, r"algo.alpha_grid=\[\] is not valid"),
    ({"alpha": "auto", "alpha_grid": [0.5, 1.2]}, r"algo.alpha_grid\[1\]=1.2 is not valid; use a number in \[0, 1\]"),
    ({"alpha": "auto", "alpha_grid": [0.5, 0.5]}, r"algo.alpha_grid=\[0.5, 0.5\] repeats a value"),
    ({"alpha": "auto", "alpha_grid": ["auto"]}, r"algo.alpha_grid\[0\]"),
    ({"alpha": "auto", "max_tokens": 0}, r"algo.max_tokens=0 must be >= 1"),
    ({"alpha": 0.5, "alpha_grid": [0.5, 0.8]}, r"algo.alpha_grid acts only with algo.alpha=auto"),
    ({"alpha": 0.8, "max_tokens": 64}, r"algo.max_tokens acts only with algo.alpha=auto"),
])
def test_bad_values_are_rejected_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        build(sq.SmoothQuantConfig, data, "algo")


def test_bad_alpha_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(ConfigError, match="algo.alpha='autoo' is not valid"):
        build_run_config(compose_dict(*TINY, "algo=smoothquant", "w_dtype=int8", "a_dtype=int8",
                                      "algo.alpha=autoo", f"output_dir={tmp_path}"))
    assert not (tmp_path / "results.json").exists()


def test_best_alpha_takes_the_smallest_loss_and_the_earlier_value_on_ties():
    assert best_alpha([0.9, 0.2, 0.5], [3.0, 1.0, 2.0]) == 0.2
    assert best_alpha([0.9, 0.2, 0.5], [1.0, 2.0, 1.0]) == 0.9
    assert best_alpha([0.1, 0.2], [math.inf, 5.0]) == 0.2


# ---------------------------------------------------------------- the search vs a brute force


def _attention_input(model, ids):
    """Block 0's hidden states (the input of input_layernorm), (tokens, hidden)."""
    with torch.no_grad():
        return model.model.embed_tokens(ids).reshape(-1, model.config.hidden_size)


def _brute_force(block, hidden, names, algorithm, alpha):
    """The q/k/v group's summed squared output error at ``alpha``, measured the long way: fold
    the smoothing into a copy of the norm and the linears, build each QuantLinear as the run
    would (static activation scales from the smoothed inputs), and run their forward."""
    block = copy.deepcopy(block)
    norm = block.input_layernorm
    linears = [block.get_submodule(n) for n in names]
    with torch.no_grad():
        x = norm(hidden)  # (tokens, hidden)
        want = [lin(x) for lin in linears]
        w = torch.cat([lin.weight for lin in linears])
        s = sq.smooth_scales(x.abs().amax(0), w.abs().amax(0), alpha)
        fold_scales(FoldTarget(norm), linears, s)
        xs = norm(hidden)
        observer = ChannelRangeObserver(algorithm.run_scheme.a)
        observer.update(xs)
        got = [algorithm._to_quant_linear(lin, observer)(xs) for lin in linears]
    return sum(float(((g - r) ** 2).sum(dtype=torch.float64)) for g, r in zip(got, want)), norm.weight.clone()


@pytest.mark.parametrize("w, a_qtype, quant_out, grid", [
    (INT8, "per_token", False, DEFAULT_ALPHA_GRID),
    (INT8, "per_tensor", False, (0.9, 0.3, 0.6, 0.0, 1.0)),
    (INT4, "per_token", True, (0.25, 0.5, 0.75)),
], ids=["w8a8-dynamic", "w8a8-static-unordered-grid", "w4a4-quant_out"])
def test_search_picks_the_alpha_of_the_smallest_brute_force_error(tiny_model, w, a_qtype, quant_out, grid):
    model = load(tiny_model)
    block = model.model.layers[0]
    hidden = _attention_input(model, samples(n=2, length=24))  # (48, 64)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    config = sq.SmoothQuantConfig(alpha="auto", alpha_grid=grid, a_qtype=a_qtype, quant_out=quant_out,
                                  max_tokens=hidden.shape[0])
    algorithm = build_algorithm(config, w, w if w is INT8 else DTypeConfig("int4"))
    brute = [_brute_force(block, hidden, names, algorithm, alpha) for alpha in grid]
    errors = [e for e, _ in brute]
    expected = min(range(len(grid)), key=lambda i: (errors[i], i))
    assert len({round(e, 6) for e in errors}) > 1, "the grid must make a difference for the test to mean anything"

    work = copy.deepcopy(block)
    linears = {n: work.get_submodule(n) for n in names}
    algorithm.start_block("model.layers.0.")
    observers = algorithm.make_group_observers(linears)
    with torch.no_grad():
        observers[names[0]].update(work.input_layernorm(hidden))
    algorithm.prepare_group(linears, observers, FoldTarget(work.input_layernorm))

    (record,) = algorithm.record()["smoothquant"]["groups"]
    assert record["linears"] == [f"model.layers.0.{n}" for n in names]
    assert record["alpha"] == grid[expected]
    torch.testing.assert_close(torch.tensor(record["losses"], dtype=torch.float64),
                               torch.tensor(errors, dtype=torch.float64), rtol=2e-3, atol=1e-9)
    torch.testing.assert_close(work.input_layernorm.weight, brute[expected][1])  # folded at that alpha


def test_a_search_on_a_subsample_still_picks_from_the_grid(tiny_model):
    model = load(tiny_model)
    algorithm = build_algorithm(sq.SmoothQuantConfig(alpha="auto", max_tokens=8), INT8, INT8)
    quantize_model(model, get_arch("llama"), algorithm, samples(), "cpu", progress=False)
    groups = algorithm.record()["smoothquant"]["groups"]
    assert all(g["alpha"] is None or g["alpha"] == best_alpha(DEFAULT_ALPHA_GRID, g["losses"]) for g in groups)


# ---------------------------------------------------------------- the pipeline and results.json


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_every_group_is_recorded_with_its_full_names(tiny_model, kind):
    model = load(tiny_model, kind)
    reference = copy.deepcopy(model)
    arch = get_arch(model.config.model_type)
    algorithm = build_algorithm(sq.SmoothQuantConfig(alpha="auto"), INT8, INT8)
    quantize_model(model, arch, algorithm, samples(), "cpu", progress=False)
    record = algorithm.record()["smoothquant"]
    assert record["alpha"] == "auto" and record["alpha_grid"] == list(DEFAULT_ALPHA_GRID)
    groups = record["groups"]
    per_block = len(groups) // model.config.num_hidden_layers
    assert per_block >= 3 and len(groups) == per_block * model.config.num_hidden_layers
    assert groups[0]["linears"][0].startswith(f"{arch.blocks}.0.") and groups[-1]["linears"][0].startswith(f"{arch.blocks}.1.")
    searched = [g for g in groups if g["alpha"] is not None]
    assert searched and all(len(g["losses"]) == len(DEFAULT_ALPHA_GRID) for g in searched)
    assert all(g["losses"][DEFAULT_ALPHA_GRID.index(g["alpha"])] == min(g["losses"]) for g in searched)
    if kind == "llama":  # GQA: no exact fold for o_proj, recorded with the reason
        (o,) = [g for g in groups if g["linears"] == [f"{arch.blocks}.0.self_attn.o_proj"]]
        assert o["alpha"] is None and "grouped-query attention" in o["reason"]
    assert sum(record["alpha_counts"].values()) == len(groups)
    ids = samples(seed=3)
    with torch.no_grad():  # still a W8A8 model close to the original
        err = float(((model(ids).logits - reference(ids).logits) ** 2).mean())
        assert err < 0.05 * float(reference(ids).logits.var())


def test_gqa_fold_records_o_proj_smoothed(tmp_path):
    cfg = build_run_config(compose_dict(*TINY, "algo=smoothquant", "w_dtype=int8", "a_dtype=int8",
                                        "algo.gqa_fold=true", f"output_dir={tmp_path}"))
    record = runner.run(cfg)["smoothquant"]
    assert record["alpha_counts"] == {"0.5": 8}  # 4 groups x 2 blocks, o_proj's included
    assert cfg.algo.gqa_fold


def test_results_json_records_the_alphas(tmp_path):
    cfg = build_run_config(compose_dict(*TINY, "algo=smoothquant", "w_dtype=int8", "a_dtype=int8",
                                        "algo.alpha=auto", "algo.alpha_grid=[0.3,0.6]", f"output_dir={tmp_path}"))
    runner.run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    record = results["smoothquant"]
    assert record["alpha"] == "auto" and record["alpha_grid"] == [0.3, 0.6]
    assert {g["alpha"] for g in record["groups"]} <= {0.3, 0.6, None}


def test_fixed_alpha_records_it_per_group(tmp_path):
    cfg = build_run_config(compose_dict(*TINY, "algo=smoothquant", "w_dtype=int8", "a_dtype=int8",
                                        f"output_dir={tmp_path}"))
    record = runner.run(cfg)["smoothquant"]
    assert record["alpha"] == 0.5 and "alpha_grid" not in record
    assert {g["alpha"] for g in record["groups"]} == {0.5, None}
    assert all("losses" not in g for g in record["groups"])

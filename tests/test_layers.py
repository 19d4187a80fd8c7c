"""Per-layer schemes: the ``layers`` rules and the ``sensitivity`` probe, from the command line to
the scheme table, through every algorithm, into results.json; bad rules fail before any weight loads."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from quantkit import models, runner
from quantkit.algorithms import awq
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.rtn import RTNConfig
from quantkit.algorithms.zeroquant import ZeroQuantConfig
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig, LayerRule, SensitivityConfig, build_run_config
from quantkit.layers import LayerScheme, resolve, run_rules, sensitivity_rule
from quantkit.pipeline import plan_schemes, quantize_model
from quantkit.quant_linear import QuantLinear, weight_qparams
from quantkit.reference import dequantize, quantize
from quantkit.results import bits_per_weight
from quantkit.scheme import QuantScheme
from tests.test_config import compose_dict
from tests.test_run import TINY, run_cli

FP16, INT8, INT4 = DTypeConfig("float16"), DTypeConfig("int8"), DTypeConfig("int4")
INT3_ASYM = DTypeConfig("int3", has_zero=True, unsigned=True)
DOWN8 = 'layers=[{match:".*down_proj",w_dtype:int8}]'


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return models.build_tiny_llama(tmp_path_factory.mktemp("layers-models") / "llama")


def tiny(tiny_path):
    return models.load_model(str(tiny_path), torch.float32)[0]


def samples(n=4, length=24):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(samples(2, 16)).logits


# names and input widths of the tiny Llama's linears, as the pipeline sees them
LINEARS = {f"model.layers.{b}.{n}": (128 if n == "mlp.down_proj" else 64) for b in range(2) for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")} | {"lm_head": 64}


def rtn(w=INT3_ASYM, a=FP16, **kwargs):
    return build_algorithm(RTNConfig(**{"groupsize": 32, **kwargs}), w, a)


def rules(*items: LayerRule) -> list[tuple[str, LayerRule]]:
    return [(f"layers[{i}]", r) for i, r in enumerate(items)]


# ---------------------------------------------------------------- the command line and the typed config


def test_a_dtype_name_in_a_rule_means_what_it_means_on_the_command_line():
    run = build_run_config(compose_dict("w_dtype=int3", DOWN8, "sensitivity.w_dtype=int2"))
    (rule,) = run.layers
    assert rule.match == ".*down_proj" and rule.w_dtype == DTypeConfig("int8")  # conf/w_dtype/int8: symmetric
    assert run.sensitivity.w_dtype == DTypeConfig("int2", has_zero=True, unsigned=True)  # int2: asymmetric
    run = build_run_config(compose_dict(
        "w_dtype=int3", 'layers=[{match:q_proj,w_dtype:{has_zero:false,unsigned:false}},'
                        '{match:k_proj,w_dtype:{name:int4,symmetric_range:restricted},groupsize:-1}]'))
    assert run.layers[0].w_dtype == DTypeConfig("int3")  # no name: the run's dtype, these keys changed
    assert run.layers[1].w_dtype == DTypeConfig("int4", True, True, "restricted") and run.layers[1].groupsize == -1
    assert build_run_config(compose_dict()).layers == () and not build_run_config(compose_dict()).sensitivity.active


@pytest.mark.parametrize(("override", "message"), [
    ('layers=[{match:q_proj,w_dtype:int5}]', "layers[0].w_dtype='int5' is not valid; choose one of: float16"),
    ('layers=[{match:q_proj,w_dtype:{name:int5}}]', "layers[0].w_dtype.name='int5' is not valid"),
    ('layers=[{match:q_proj,w_dtype:int8},{match:k_proj,bits:4}]',
     "unknown config key(s) layers[1].bits; valid keys of layers[1]: a_dtype, groupsize, match, skip, w_dtype"),
    ('layers=[{match:q_proj,w_dtype:{name:int4,zero:true}}]', "unknown config key(s) layers[0].w_dtype.zero"),
    ('layers=[{match:q_proj,groupsize:0}]', "layers[0]: groupsize=0 is not valid"),
    ('layers=[{match:q_proj}]', "layers[0]: no override: set one of w_dtype, a_dtype, groupsize, skip"),
    ('layers=[{match:q_proj,skip:true,w_dtype:int8}]', "layers[0]: skip=true keeps the layer in full precision"),
    ('layers=[{match:"q_proj(",w_dtype:int8}]', "layers[0]: match='q_proj(' is not a valid regex"),
    ('layers=[{w_dtype:int8}]', "missing config key(s): layers[0].match"),
    ('sensitivity.blocks=4-2', "sensitivity.blocks='4-2' is not a block range"),
    ('sensitivity.type=q.proj', "sensitivity.type='q.proj' is not a layer type"),
    ('sensitivity.type=q', "sensitivity: no override"),
])
def test_bad_rules_are_one_line_naming_the_rule_and_key(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_run_config(compose_dict(override))


# ---------------------------------------------------------------- resolution


def test_first_match_wins_skip_layers_first_and_the_rest_keeps_the_run_scheme():
    table = resolve(LINEARS, rules(LayerRule(match=r"model\.layers\.0\..*", w_dtype=INT8),
                                   LayerRule(match="down_proj", groupsize=-1), LayerRule(match=".*", skip=True)),
                    rtn(), skip_layers=("lm_head", "v_proj"))
    assert table["model.layers.0.mlp.down_proj"].describe() == "int8 g32" and \
        table["model.layers.0.mlp.down_proj"].source == "layers[0]"
    assert table["model.layers.1.mlp.down_proj"].describe() == "int3 channel asym unsigned"
    assert table["model.layers.1.self_attn.q_proj"] == LayerScheme(None, source="layers[2]")
    assert table["model.layers.0.self_attn.v_proj"].source == table["lm_head"].source == "skip_layers"
    assert table.kept_float() == [f"model.layers.1.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert table.counts() == {"int8 g32": 6, "float16": 5, "int3 channel asym unsigned": 1}
    plain = resolve(LINEARS, [], rtn())
    assert {s.source for s in plain.layers.values()} == {"run"} and not plain.mixed


@pytest.mark.parametrize(("rule", "skip", "message"), [
    (LayerRule(match="out_proj", w_dtype=INT8), (), "layers[1] (match 'out_proj') matches no linear layer the "
     "pipeline quantizes (a name, a name suffix or a regex over full names such as model.layers.0.self_attn.q_proj"),
    (LayerRule(match="lm_head", w_dtype=INT8), ("lm_head",), "layers[1] (match 'lm_head') matches only linears "
                                                             "that skip_layers keeps in full precision (lm_head)"),
    (LayerRule(match="down_proj", groupsize=256), (), "layers[1].groupsize=256 is larger than the input width 128 "
                                                      "of model.layers.0.mlp.down_proj"),
    (LayerRule(match="q_proj", a_dtype=INT8, w_dtype=FP16), (), "layers[1]: w_dtype=float16 with a quantized a_dtype"),
    (LayerRule(match="q_proj", w_dtype=DTypeConfig("int4", False, True)), (),
     "layers[1]: w_dtype.unsigned=true without a zero point"),
])
def test_rules_that_change_nothing_or_cannot_apply_are_errors(rule, skip, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        resolve(LINEARS, rules(LayerRule(match="gate_proj", w_dtype=INT8), rule), rtn(), skip)
    with pytest.raises(ConfigError, match=r"layers\[1\] \(match 'up_proj'\) matches .*mlp.up_proj, but an earlier "
                                          r"rule takes every one of them"):
        resolve(LINEARS, rules(LayerRule(match=".*mlp.*", w_dtype=INT8), LayerRule(match="up_proj", w_dtype=INT4)), rtn())


def test_a_rule_goes_through_the_algorithm_like_the_run_scheme():
    zq = build_algorithm(ZeroQuantConfig(groupsize=32, w_has_zero=False, w_unsign=False), INT3_ASYM, INT8)
    scheme = zq.layer_scheme(DTypeConfig("int4", True, True), None, 64)  # ZeroQuant's grid keys apply to it
    assert scheme.w == QuantScheme("int4", "per_group", 64) and scheme.a == zq.a_scheme
    sq = build_algorithm(build_run_config(compose_dict("algo=smoothquant", "algo.quant_out=true")).algo, INT8, INT8)
    assert sq.layer_scheme(None, DTypeConfig("int4"), None).o.dtype.name == "int4"  # the output grid follows a_dtype
    assert sq.layer_scheme(None, FP16, None).o is None
    static = rtn(INT4, FP16, a_qtype="per_tensor").layer_scheme(None, INT8, -1)
    assert static.a_static and static.w.granularity == "per_channel"


def test_a_rule_with_a_block_format_takes_its_own_blocks():
    """A rule naming nvfp4/mxfp4 but no groupsize quantizes in the format's blocks (the run's
    algo.groupsize is for the run's dtype); a rule naming both must agree with the block."""
    run = rtn(INT4)  # int4 g32
    assert run.layer_scheme(DTypeConfig("nvfp4"), None, None).w.groupsize == 16
    assert run.layer_scheme(DTypeConfig("mxfp4"), None, None).w.groupsize == 32
    assert run.layer_scheme(DTypeConfig("nvfp4"), None, 16).w.groupsize == 16
    with pytest.raises(ConfigError, match="quantizes in blocks of 1x16"):
        run.layer_scheme(DTypeConfig("nvfp4"), None, 64)


@pytest.mark.parametrize(("probe", "picked"), [
    (SensitivityConfig(type="down", w_dtype=INT8), {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
    (SensitivityConfig(type="q", w_dtype=INT8), {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
    (SensitivityConfig(blocks="1", w_dtype=INT8), {n for n in LINEARS if n.startswith("model.layers.1.")}),
    (SensitivityConfig(type="o", blocks="0-0", w_dtype=INT8), {"model.layers.0.self_attn.o_proj"}),
])
def test_the_sensitivity_probe_is_the_first_rule(probe, picked):
    table = resolve(LINEARS, run_rules((LayerRule(match=".*", groupsize=-1),), probe, "model.layers", 2), rtn())
    assert {n for n, s in table.layers.items() if s.source == "sensitivity"} == picked
    assert all(table[n].describe() == "int8 g32" for n in picked)
    assert {s.source for n, s in table.layers.items() if n not in picked and n != "lm_head"} == {"layers[0]"}
    with pytest.raises(ConfigError, match=r"sensitivity.blocks=1-2 reaches past the model's last block: it has 2 "
                                          r"blocks \(0-1\)"):
        sensitivity_rule(SensitivityConfig(blocks="1-2", w_dtype=INT8), "model.layers", 2)
    assert sensitivity_rule(SensitivityConfig(w_dtype=INT8), "model.layers", 2) is None  # the reference run


# ---------------------------------------------------------------- the pipeline and every algorithm

ALGOS = {  # overrides, a_dtype
    "rtn": (["algo=rtn"], FP16),
    "gptq": (["algo=gptq"], FP16),
    "awq": (["algo=awq"], FP16),
    "awq+gptq": (["algo=awq_gptq"], FP16),
    "smoothquant": (["algo=smoothquant", "algo.w_qtype=per_group"], INT8),
    "smoothquant+gptq": (["algo=smoothquant_gptq"], INT8),
    "zeroquant": (["algo=zeroquant"], INT8),
}
MIXED = (LayerRule(match="q_proj", w_dtype=INT8),  # q/k/v share one input (and AWQ's scale search)
         LayerRule(match="down_proj", groupsize=-1), LayerRule(match="model.layers.1.mlp.gate_proj", skip=True))


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_quantizes_each_linear_with_its_own_scheme(tiny_path, algo):
    overrides, a = ALGOS[algo]
    cfg = build_run_config(compose_dict(*overrides, "algo.groupsize=32"))
    algorithm = build_algorithm(cfg.algo, INT4, a)
    model = tiny(tiny_path)
    report = quantize_model(model, get_arch("llama"), algorithm, samples(), "cpu", batch_size=2, progress=False,
                            layers=MIXED)
    table = report.schemes
    assert table["model.layers.0.self_attn.q_proj"].w.dtype.name == "int8"
    assert table["model.layers.1.mlp.down_proj"].w.granularity == "per_channel"
    for name, scheme in table.layers.items():
        module = model.get_submodule(name)
        if not scheme.quantized:
            assert type(module) is torch.nn.Linear, name
            continue
        assert isinstance(module, QuantLinear), name
        assert (module.w_scheme, module.a_scheme, module.o_scheme) == (scheme.w, scheme.a, scheme.o), name
    assert report.skipped == ["model.layers.1.mlp.gate_proj", "lm_head"]
    assert torch.isfinite(logits(model)).all()


def test_rtn_with_rules_equals_rtn_of_each_layer_on_its_own_grid(tiny_path):
    float_model, model = tiny(tiny_path), tiny(tiny_path)
    quantize_model(model, get_arch("llama"), rtn(), None, "cpu", progress=False, layers=MIXED)
    for name, (w, scheme) in {"model.layers.0.self_attn.q_proj": (INT8, QuantScheme("int8", "per_group", 32)),
                              "model.layers.0.mlp.down_proj": (INT3_ASYM, QuantScheme("int3", "per_channel",
                                                                                      has_zero=True, unsigned=True)),
                              "model.layers.0.self_attn.k_proj": (INT3_ASYM, QuantScheme(
                                  "int3", "per_group", 32, has_zero=True, unsigned=True))}.items():
        weight = float_model.get_submodule(name).weight.detach()
        scale, zero = weight_qparams(weight, scheme)
        expected = dequantize(quantize(weight, scale, zero, scheme), scale, zero, scheme)
        assert torch.equal(model.get_submodule(name).dequantized_weight(), expected), name


def test_static_activation_scales_of_a_group_with_mixed_schemes(tiny_path):
    """Only k_proj has static int8 activations: the group's one observer still keeps the range
    (made for k_proj, not q_proj which comes first), and k's scale is the range on k's grid."""
    for algorithm in (rtn(INT4, FP16, a_qtype="per_tensor"),
                      build_algorithm(build_run_config(compose_dict("algo=gptq", "algo.groupsize=32",
                                                                    "algo.a_qtype=per_tensor")).algo, INT4, FP16)):
        model = tiny(tiny_path)
        report = quantize_model(model, get_arch("llama"), algorithm, samples(), "cpu", batch_size=2, progress=False,
                                layers=(LayerRule(match="k_proj", a_dtype=INT8),))
        assert report.schemes.needs_calibration(algorithm)
        k, q = model.model.layers[0].self_attn.k_proj, model.model.layers[0].self_attn.q_proj
        assert k.a_static and k.act_scale.item() != 1.0 and q.a_scheme is None and q.act_scale is None


def test_awq_searches_one_scale_for_a_group_with_mixed_schemes():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=gen)  # two linears of 24 rows
    x = torch.randn(200, 32, generator=gen) * torch.linspace(0.1, 4, 32)
    int3, int8 = QuantScheme("int3", "per_group", 16, True, True), QuantScheme("int8", "per_group", 16)
    mixed = awq.fake_quantize_group(w, [int3, int8], [24, 24])
    assert torch.equal(mixed, torch.cat([awq.fake_quantize_weight(w[:24], int3), awq.fake_quantize_weight(w[24:], int8)]))
    same = awq.search_scales(w, x, x.abs().mean(0), [int3, int3], 10, [24, 24])
    assert torch.equal(same, awq.search_scales(w, x, x.abs().mean(0), int3, 10, [24, 24]))
    s = awq.search_scales(w, x, x.abs().mean(0), [int3, int8], 10, [24, 24])

    def loss(alpha: float) -> float:  # the summed output error, each half on its own grid
        s = x.abs().mean(0).pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        return float(((w - awq.fake_quantize_group(w * s, [int3, int8], [24, 24]) / s) @ x.T).pow(2).sum())

    losses = [loss(i / 10) for i in range(10)]
    best = x.abs().mean(0).pow(losses.index(min(losses)) / 10)
    torch.testing.assert_close(s, best / (best.max() * best.min()).sqrt())


def test_bits_per_weight_counts_rule_kept_layers_at_16_bits(tiny_path):
    model = tiny(tiny_path)
    report = quantize_model(model, get_arch("llama"), rtn(), None, "cpu", progress=False, layers=MIXED)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    gate = model.model.layers[1].mlp.gate_proj  # kept by layers[2]
    stored = sum(m.weight_storage_bits() for m in quant) + gate.weight.numel() * 16
    weights = sum(m.in_features * m.out_features for m in quant) + gate.weight.numel()
    assert bits_per_weight(model, report.schemes.kept_float()) == pytest.approx(stored / weights)
    assert bits_per_weight(model) == pytest.approx((stored - gate.weight.numel() * 16) / (weights - gate.weight.numel()))


def test_plan_on_the_skeleton_is_the_plan_on_the_loaded_model(tiny_path):
    from quantkit.inputs import meta_model
    from quantkit.pipeline import plan_skeleton
    from transformers import AutoConfig

    model = tiny(tiny_path)
    skeleton = meta_model(AutoConfig.from_pretrained(tiny_path), str(tiny_path))
    probe = SensitivityConfig(type="v", w_dtype=INT8)
    args = (rtn(), ("lm_head",), MIXED, probe)
    assert plan_skeleton(skeleton, get_arch("llama"), *args) == plan_schemes(model, get_arch("llama"), *args)


# ---------------------------------------------------------------- runs: early errors, results.json


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*_a, **_k):
        raise AssertionError("the model must not load for an invalid config")

    monkeypatch.setattr(models, "load_model", fail)


@pytest.mark.parametrize(("overrides", "message"), [
    (['layers=[{match:"mlp.fc.*",w_dtype:int8}]'], "layers[0] (match 'mlp.fc.*') matches no linear layer"),
    (['layers=[{match:lm_head,w_dtype:int8}]'], "layers[0] (match 'lm_head') matches only linears that skip_layers"),
    (["sensitivity.type=fc1", "sensitivity.w_dtype=int8"], "sensitivity (match"),
    (["sensitivity.blocks=1-5", "sensitivity.w_dtype=int8"], "sensitivity.blocks=1-5 reaches past"),
    (['layers=[{match:".*",skip:true}]'], "keep every linear in full precision"),
    (["save.enabled=true", "save.format=compressed-tensors", 'layers=[{match:down_proj,w_dtype:int3}]'],
     "save.format=compressed-tensors (layers[0]): compressed-tensors cannot express weights int3 g32"),
])
def test_bad_rules_fail_before_the_weights_load(tmp_path, no_model_load, overrides, message):
    cfg = build_run_config(compose_dict(*TINY, "algo.groupsize=32", *overrides, f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        runner.run(cfg)
    assert not (tmp_path / "results.json").exists()


def test_float16_run_with_rules_quantizes_only_what_they_select(tmp_path):
    cfg = build_run_config(compose_dict(*TINY, "w_dtype=float16", "algo.groupsize=32",
                                        'layers=[{match:down_proj,w_dtype:int4}]', f"output_dir={tmp_path}"))
    results = runner.run(cfg)
    assert results["quantized_layers"] == 2 and results["mixed"]
    assert results["scheme_counts"] == {"float16": 12, "int4 g32 asym unsigned": 2}
    assert 4 < results["bits_per_weight"] < 16  # the 12 float16 linears count at 16 bits


def test_cli_mixed_run_records_every_layer_scheme(tmp_path):
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    for out, extra in ((plain, []), (mixed, [DOWN8])):
        proc = run_cli(*TINY, "w_dtype=int3", "algo.groupsize=32", *extra, f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    p, m = (json.loads((d / "results.json").read_text()) for d in (plain, mixed))
    assert m["config"]["layers"] == [{"match": ".*down_proj", "w_dtype": {
        "name": "int8", "has_zero": False, "unsigned": False, "symmetric_range": None, "scale_format": None,
        "block": None, "clip_ratio": 1.0}}]
    assert m["layer_schemes"]["model.layers.1.mlp.down_proj"] == {"scheme": "int8 g32", "source": "layers[0]"}
    assert m["layer_schemes"]["model.layers.1.mlp.up_proj"] == {"scheme": "int3 g32 asym unsigned", "source": "run"}
    assert m["layer_schemes"]["lm_head"] == {"scheme": "float16", "source": "skip_layers"}
    assert m["scheme_counts"] == {"int3 g32 asym unsigned": 12, "int8 g32": 2} and not p["mixed"]
    assert m["bits_per_weight"] > p["bits_per_weight"] and m["w_scheme"] == p["w_scheme"]
    assert "mixed: 12 x int3 g32 asym unsigned, 2 x int8 g32" in proc.stdout + proc.stderr
    # the same config again reuses the results; another rule is a different config
    again = run_cli(*TINY, "w_dtype=int3", "algo.groupsize=32", DOWN8, f"hydra.run.dir={mixed}")
    assert again.returncode == 0 and "reused" in again.stdout + again.stderr
    other = run_cli(*TINY, "w_dtype=int3", "algo.groupsize=32", 'layers=[{match:".*down_proj",w_dtype:int4}]',
                    f"hydra.run.dir={mixed}")
    assert other.returncode != 0 and "layers" in other.stderr


def test_cli_unknown_dtype_in_a_rule_is_one_line(tmp_path):
    proc = run_cli(*TINY, 'layers=[{match:q_proj,w_dtype:int5}]', f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "configuration error: layers[0].w_dtype='int5' is not valid; choose one of: float16" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_rules_survive_a_deep_copy_of_the_config():
    run = build_run_config(compose_dict(DOWN8))
    assert copy.deepcopy(run) == run and hash(run.layers[0]) == hash(copy.deepcopy(run.layers[0]))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_rules_reach_experts_on_the_skeleton_as_on_the_loaded_model(kind):
    """The skeleton's fused experts are split first, so a rule for one expert's down_proj is
    checked before loading against the names the pipeline quantizes."""
    from quantkit.inputs import meta_model
    from quantkit.pipeline import _unfuse, plan_skeleton
    from tests.test_arch import _CONFIGS, build

    model = build(kind)
    arch = get_arch(kind)
    skeleton = meta_model(_CONFIGS[kind](), kind)
    args = (rtn(INT4, FP16, groupsize=16), ("lm_head",), (LayerRule(match=r".*experts\.1\.down_proj", w_dtype=INT8),))
    table = plan_skeleton(skeleton, arch, *args)
    _unfuse(model.get_submodule(arch.blocks), arch)
    assert table == plan_schemes(model, arch, *args)
    picked = [n for n, s in table.layers.items() if s.source == "layers[0]"]
    assert picked == ["model.layers.0.mlp.experts.1.down_proj"] + (
        ["model.layers.1.mlp.experts.1.down_proj"] if kind == "mixtral" else [])

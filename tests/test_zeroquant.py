"""ZeroQuant: every parameter acts, nonsense is rejected, static (asymmetric) vs dynamic activations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from quantkit import reference as ref
from quantkit.algorithms import zeroquant as zq
from quantkit.algorithms.registry import build_algorithm
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig, build
from quantkit.pipeline import quantize_model
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme

CONF = Path(__file__).resolve().parents[1] / "conf" / "algo" / "zeroquant.yaml"
FP16 = DTypeConfig("float16")
INT8 = DTypeConfig("int8")
INT4 = DTypeConfig("int4")
FP8 = DTypeConfig("fp8")


def samples(n=4, length=24, seed=1):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(seed))


def zeroquant(w=INT4, a=INT8, **kwargs):
    return build_algorithm(zq.ZeroQuantConfig(**{"groupsize": 32, **kwargs}), w, a)


def quantized(tiny_model, w=INT4, a=INT8, kind="llama", **kwargs):
    model = tiny_model(kind)
    quantize_model(model, get_arch(model.config.model_type), zeroquant(w, a, **kwargs), samples(), "cpu",
                   batch_size=2, progress=False)
    return model


def logits(model, seed=2):
    with torch.no_grad():
        return model(samples(2, 16, seed)).logits


# ---------------------------------------------------------------- config


def test_yaml_builds_the_defaults_and_documents_every_key():
    data = OmegaConf.to_container(OmegaConf.load(CONF))
    assert build(zq.ZeroQuantConfig, data, "algo") == zq.ZeroQuantConfig()
    lines = [line for line in CONF.read_text().splitlines() if line and not line.startswith("#")]
    assert all("#" in line for line in lines if not line.startswith("name:")), "every key has a comment"


@pytest.mark.parametrize("data, key", [
    ({"groupsize": 0}, "algo.groupsize"),
    ({"quantization_type": "per_token"}, "algo.quantization_type"),
    ({"w_has_zero": "yes"}, "algo.w_has_zero"),
])
def test_invalid_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        build(zq.ZeroQuantConfig, data, "algo")


@pytest.mark.parametrize("w, a, kwargs, key", [
    (INT4, FP8, {"a_has_zero": True}, "algo.a_has_zero=true is not valid with a_dtype=fp8"),
    (INT4, FP8, {"a_unsign": True}, "algo.a_unsign=true is not valid with a_dtype=fp8"),
    (FP8, INT8, {"w_has_zero": True}, "algo.w_has_zero=true is not valid with w_dtype=fp8"),
    (INT4, FP16, {"a_has_zero": False}, "algo.a_has_zero=False has nothing to act on: a_dtype=float16"),
    (INT4, FP16, {}, "algo=zeroquant quantizes activations.*a_dtype=float16"),
    (INT4, INT8, {"w_unsign": True}, "algo.w_unsign=true without a zero point"),
    (INT4, INT8, {"a_unsign": True, "a_has_zero": False}, "algo.a_unsign=true without a zero point"),
    (INT4, INT8, {"groupsize": 16, "w_has_zero": True, "w_unsign": True, "quantization_type": "static"}, None),
])
def test_nonsense_combinations_are_config_errors_naming_the_key(w, a, kwargs, key):
    if key is None:  # the sensible combination builds
        assert zeroquant(w, a, **kwargs).a_static
        return
    with pytest.raises(ConfigError, match=key):
        zeroquant(w, a, **kwargs)


def test_keys_override_the_dtype_grids_and_null_keeps_them():
    asym = DTypeConfig("int4", has_zero=True, unsigned=True)
    assert zeroquant(asym).w_scheme.has_zero and zeroquant(asym).w_scheme.unsigned
    algo = zeroquant(asym, w_has_zero=False, w_unsign=False)
    assert not algo.w_scheme.has_zero and not algo.w_scheme.unsigned
    algo = zeroquant(INT4, INT8, a_has_zero=True, a_unsign=True)
    assert algo.a_scheme == QuantScheme("int8", "per_token", has_zero=True, unsigned=True)
    assert zeroquant(groupsize=-1).w_scheme.granularity == "per_channel"


# ---------------------------------------------------------------- every parameter acts


def _dequantized(model):
    return {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_groupsize_acts(tiny_model):
    a, b = _dequantized(quantized(tiny_model, groupsize=16)), _dequantized(quantized(tiny_model, groupsize=-1))
    assert all(not torch.equal(a[n], b[n]) for n in a)


def test_w_has_zero_acts(tiny_model):
    sym, asym = quantized(tiny_model, w_has_zero=False), quantized(tiny_model, w_has_zero=True)
    q = asym.model.layers[0].mlp.down_proj
    assert q.qzeros is not None and sym.model.layers[0].mlp.down_proj.qzeros is None
    assert not torch.equal(logits(sym), logits(asym))


def test_w_unsign_acts_on_the_codes_not_the_values(tiny_model):
    signed = quantized(tiny_model, w_has_zero=True, w_unsign=False).model.layers[0].self_attn.q_proj
    unsigned = quantized(tiny_model, w_has_zero=True, w_unsign=True).model.layers[0].self_attn.q_proj
    assert signed.weight_codes().dtype == torch.int8 and unsigned.weight_codes().dtype == torch.uint8
    shift = unsigned.weight_codes().int() - signed.weight_codes().int()
    assert bool((shift == 8).all())  # int4: codes and zero points move by 2**(bits-1)
    assert torch.equal(unsigned.zeros() - signed.zeros(), torch.full_like(signed.zeros(), 8))
    assert torch.equal(unsigned.dequantized_weight(), signed.dequantized_weight())


def test_a_has_zero_acts(tiny_model):
    """Dynamic here; static zero points: test_static_zero_point_is_calibrated_and_used."""
    sym = quantized(tiny_model, INT4, DTypeConfig("int4"), a_has_zero=False)
    asym = quantized(tiny_model, INT4, DTypeConfig("int4"), a_has_zero=True)
    assert asym.model.layers[0].self_attn.q_proj.a_scheme.has_zero
    assert not torch.equal(logits(sym), logits(asym))


def test_a_unsign_acts_on_the_stored_zero_point_not_the_values(tiny_model):
    kw = {"a_has_zero": True, "quantization_type": "static"}
    signed = quantized(tiny_model, a_unsign=False, **kw).model.layers[0].self_attn.q_proj
    unsigned = quantized(tiny_model, a_unsign=True, **kw).model.layers[0].self_attn.q_proj
    assert unsigned.act_zero.item() - signed.act_zero.item() == 128
    assert unsigned.a_scheme.qmin == 0 and signed.a_scheme.qmin == -128
    x = torch.randn(3, 64)
    assert torch.equal(unsigned.quantize_input(x), signed.quantize_input(x))


def test_static_and_dynamic_activations(tiny_model):
    static = quantized(tiny_model, quantization_type="static")
    dynamic = quantized(tiny_model, quantization_type="dynamic")
    qs, qd = static.model.layers[0].self_attn.q_proj, dynamic.model.layers[0].self_attn.q_proj
    assert qs.a_static and qs.a_scheme.granularity == "per_tensor" and qs.act_scale.item() != 1.0
    assert not qd.a_static and qd.act_scale is None and qd.a_scheme.granularity == "per_token"
    assert torch.equal(qs.dequantized_weight(), qd.dequantized_weight())  # only the activations differ
    assert not torch.equal(logits(static), logits(dynamic))
    x = torch.randn(2, 5, 64)  # dynamic: one scale per token, computed per call
    # activations default to the restricted symmetric grid (amax / 127)
    act = QuantScheme("int8", "per_token", symmetric_range="restricted")
    assert torch.equal(qd.quantize_input(x), ref.fake_quantize(x, act))


@pytest.mark.parametrize("flag", ["block_sequential", "layer_sequential"])
def test_sequential_flags_act_on_static_calibration(tiny_model, flag):
    def scales(model):
        return {n: m.act_scale.item() for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    base = scales(quantized(tiny_model, quantization_type="static"))
    seq = scales(quantized(tiny_model, quantization_type="static", **{flag: True}))
    assert base["model.layers.0.self_attn.q_proj"] == seq["model.layers.0.self_attn.q_proj"]
    assert any(base[n] != pytest.approx(seq[n], rel=1e-6) for n in base)


# ---------------------------------------------------------------- static asymmetric activations


def test_static_zero_point_is_calibrated_and_used(tiny_model):
    """OPT's fc2 reads ReLU outputs (all >= 0): an asymmetric static grid stores a zero point at
    the bottom of the range and halves the activation error of the symmetric one."""
    model = tiny_model("opt")
    reference = copy.deepcopy(model)
    seen = []
    fc2 = reference.model.decoder.layers[0].fc2
    handle = fc2.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for i in range(0, 4, 2):
            reference(samples()[i:i + 2])
    handle.remove()
    x = torch.cat(seen)  # (tokens, ffn) the calibration inputs of block 0's fc2
    errors = {}
    for a_has_zero in (False, True):
        model = quantized(tiny_model, kind="opt", a_has_zero=a_has_zero, a_unsign=a_has_zero,
                          quantization_type="static")
        q = model.model.decoder.layers[0].fc2
        if a_has_zero:
            scheme = QuantScheme("int8", "per_tensor", has_zero=True, unsigned=True)
            scale, zero = ref.compute_qparams(torch.stack([x.min(), x.max()]).reshape(1, 2), scheme)
            assert q.act_zero.item() == zero.item() == 0  # min 0: zero point at code 0
            assert q.act_scale.item() == pytest.approx(scale.item(), rel=1e-6)
        else:
            assert q.act_zero is None
        errors[a_has_zero] = float(((q.quantize_input(x) - x) ** 2).mean())
    assert errors[True] < 0.5 * errors[False]


def test_quant_linear_static_zero_point_round_trip():
    scheme = QuantScheme("int8", "per_tensor", has_zero=True)
    x = torch.rand(6, 16) * 3 + 1  # all positive: the zero point is far from the middle
    scale, zero = ref.compute_qparams(x, scheme)
    lin = nn.Linear(16, 4)
    q = QuantLinear.from_linear(lin, QuantScheme("int8", "per_channel"), scheme, act_scale=scale, act_zero=zero)
    assert q.act_zero.dtype == torch.int32 and q.act_zero.item() == zero.item()
    torch.testing.assert_close(q.quantize_input(x), ref.fake_quantize(x, scheme))
    with pytest.raises(ValueError, match="need act_zero"):
        QuantLinear.from_linear(lin, QuantScheme("int8", "per_channel"), scheme, act_scale=scale)
    with pytest.raises(ValueError, match="act_zero is the zero point"):
        QuantLinear.from_linear(lin, QuantScheme("int8", "per_channel"), QuantScheme("int8", "per_tensor"),
                                act_scale=scale, act_zero=zero)


@pytest.mark.parametrize("name, cfg", [
    ("rtn", {"groupsize": 32, "a_qtype": "per_tensor"}),
    ("awq", {"groupsize": 32, "a_qtype": "per_tensor", "n_grid": 4}),
    ("gptq", {"groupsize": 32, "a_qtype": "per_tensor"}),
    ("gptq", {"groupsize": 32, "a_qtype": "per_tensor", "pre": "smoothquant"}),
    ("smoothquant", {"a_qtype": "per_tensor"}),
    ("zeroquant", {"groupsize": 32, "quantization_type": "static"}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_every_algorithm_stores_static_activation_zero_points(tiny_model, name, cfg):
    from quantkit.algorithms.registry import algorithm_config_class

    a_dtype = DTypeConfig("int8", has_zero=True, unsigned=True)
    algo = build_algorithm(algorithm_config_class(name)(**cfg), INT8, a_dtype)
    model = tiny_model()
    quantize_model(model, get_arch("llama"), algo, samples(), "cpu", batch_size=2, progress=False)
    zeros = [m.act_zero.item() for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(zeros) == 14 and all(0 < z < 255 for z in zeros)  # signed inputs: a zero point inside the grid


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_zeroquant_w8a8_end_to_end(tiny_model, kind):
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    arch = get_arch(model.config.model_type)
    report = quantize_model(model, arch, zeroquant(INT8, INT8), None, "cpu", progress=False)
    block_linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith(arch.blocks)]
    assert sorted(report.quantized) == sorted(block_linears)
    assert model.get_submodule(block_linears[0]).w_scheme == QuantScheme("int8", "per_group", 32)
    ref_logits = logits(reference)
    assert float(((logits(model) - ref_logits) ** 2).mean()) < 1e-3 * float((ref_logits ** 2).mean())

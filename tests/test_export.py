"""compressed-tensors export: bit-exact packing against the compressed-tensors package, weights that
its own decompressor turns back into ours, transformers loading the folder on CPU, clear errors.

What transformers (5.x with compressed-tensors 0.20) loads on CPU: symmetric pack-quantized
int4/int8 (W4A16/W8A16), int-quantized W8A8 and float-quantized fp8. It cannot load asymmetric
pack-quantized checkpoints at all (llm-compressor issue #1618: the module it builds expects an
unpacked zero point while the format stores it packed), so the asymmetric and unsigned exports are
checked through compressed-tensors' own ``PackedQuantizationCompressor.decompress`` instead.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import quantkit  # noqa: E402
from quantkit import models  # noqa: E402
from quantkit.algorithms.registry import build_algorithm  # noqa: E402
from quantkit.algorithms.rtn import RTNConfig  # noqa: E402
from quantkit.arch import get_arch  # noqa: E402
from quantkit.config import DTypeConfig, LayerRule  # noqa: E402
from quantkit.export import ExportError, compressed_tensors_state, export_format, pack_int32  # noqa: E402
from quantkit.pipeline import quantize_model  # noqa: E402
from quantkit.quant_linear import QuantLinear  # noqa: E402
from quantkit.scheme import QuantScheme  # noqa: E402

FP16 = DTypeConfig("float16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = models.build_tiny_llama(tmp_path_factory.mktemp("export-models") / "llama")
    return lambda: models.load_model(str(path), torch.float32)


def samples(n=4, length=24):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(1))


def quantized(tiny, w, a=FP16, **rtn):
    model, tok = tiny()
    algorithm = build_algorithm(RTNConfig(**{"groupsize": 32, **rtn}), w, a)
    data = samples() if algorithm.needs_calibration else None
    quantize_model(model, get_arch("llama"), algorithm, data, "cpu", batch_size=2, progress=False)
    return model, tok


def logits(model):
    with torch.no_grad():
        return model(samples(2, 16)).logits


CHANNEL = {"w_qtype": "per_channel", "groupsize": -1}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [32, 64, 100])
def test_packing_is_bit_identical_to_compressed_tensors(bits, cols):
    gen = torch.Generator().manual_seed(cols)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (12, cols), generator=gen, dtype=torch.int32)
    assert torch.equal(pack_int32(q, bits), pack_to_int32(q.to(torch.int8), bits))
    assert torch.equal(pack_int32(q.t(), bits).t(), pack_to_int32(q.to(torch.int8), bits, packed_dim=0))


# (w_dtype, rtn overrides): every integer weight scheme the pack-quantized format can express
PACKED = {
    "int4-g32-sym": (DTypeConfig("int4"), {}),
    "int4-g32-asym-unsigned": (DTypeConfig("int4", True, True), {}),
    "int4-g32-asym-signed": (DTypeConfig("int4", True, False), {}),
    "int4-g32-sym-restricted": (DTypeConfig("int4", symmetric_range="restricted"), {}),
    "int4-channel-sym": (DTypeConfig("int4"), CHANNEL),
    "int8-g64-asym-unsigned": (DTypeConfig("int8", True, True), {"groupsize": 64}),
    "int8-channel-sym": (DTypeConfig("int8"), CHANNEL),
}


@pytest.mark.parametrize("case", PACKED)
def test_compressed_tensors_decompresses_our_weights_exactly(tiny, case):
    """The unsigned -> signed conversion keeps q - z: the format's own decompressor gives our weights."""
    w, rtn = PACKED[case]
    model, _ = quantized(tiny, w, **rtn)
    tensors, qconfig = compressed_tensors_state(model)
    QuantizationConfig.model_validate(qconfig)  # the config parses as the package's own model
    (group,) = qconfig["config_groups"].values()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**group["weights"]))
    assert qconfig["format"] == "pack-quantized"
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert "weight_zero_point" in local or group["weights"]["symmetric"], name
        local["weight_scale"] = local["weight_scale"].float()  # dequantize in float32, as QuantLinear does
        dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(dense, module.dequantized_weight()), name


# transformers loads these on CPU; tolerance 1e-5 on logits of magnitude ~1 where the math is the
# same (weights dequantize to the same float32 values). Dynamic per-token int8 activations are
# recomputed by the runtime: compressed-tensors (here) divides amax by 127.5, the full grid, vLLM
# by 127; quantkit's activations default to the restricted grid (127): 3% of the largest logit
# (measured: 1%), and exact with a_dtype.symmetric_range=full.
LOADABLE = {
    "w4a16-g32": (DTypeConfig("int4"), FP16, {}, 1e-5),
    "w4a16-g32-restricted": (DTypeConfig("int4", symmetric_range="restricted"), FP16, {}, 1e-5),
    "w4a16-channel": (DTypeConfig("int4"), FP16, CHANNEL, 1e-5),
    "w8a16-g32": (DTypeConfig("int8"), FP16, {}, 1e-5),
    "w8a8-dynamic": (DTypeConfig("int8"), DTypeConfig("int8"), CHANNEL, 3e-2),
    "w8a8-dynamic-full-range": (DTypeConfig("int8"), DTypeConfig("int8", symmetric_range="full"), CHANNEL, 1e-5),
    "w8a8-static": (DTypeConfig("int8"), DTypeConfig("int8"), {**CHANNEL, "a_qtype": "per_tensor"}, 1e-5),
    "fp8-weight-only": (DTypeConfig("fp8"), FP16, CHANNEL, 1e-5),
    "fp8-dynamic": (DTypeConfig("fp8"), DTypeConfig("fp8"), CHANNEL, 1e-5),
    "fp8-static": (DTypeConfig("fp8"), DTypeConfig("fp8"), {**CHANNEL, "a_qtype": "per_tensor"}, 1e-5),
}


@pytest.mark.parametrize("case", LOADABLE)
def test_transformers_loads_the_export_with_our_logits(tiny, tmp_path, case):
    w, a, rtn, tol = LOADABLE[case]
    model, tok = quantized(tiny, w, a, **rtn)
    expected = logits(model)
    out = quantkit.export_compressed_tensors(model, tok, tmp_path / "ct")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = logits(loaded)
    assert (got - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize(("bits", "rtn"), [(4, {}), (8, {}), (4, CHANNEL), (8, CHANNEL)],
                         ids=["int4-g32", "int8-g32", "int4-channel", "int8-channel"])
def test_symmetric_weights_are_compressed_tensors_own_qparams_and_codes(tiny, bits, rtn):
    """The default symmetric weight grid is compressed-tensors' (llm-compressor's): its
    ``calculate_qparams`` on the float weights gives our scales (after the float16 storage rounding
    both store), its ``quantize`` with them gives our codes, every code of [-2^(b-1), 2^(b-1) - 1]
    occurs, and the exported tensors decompress to our weights."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    float_model, _ = tiny()
    model, _ = quantized(tiny, DTypeConfig(f"int{bits}"), **rtn)
    tensors, qconfig = compressed_tensors_state(model)
    args = QuantizationArgs(**qconfig["config_groups"]["group_0"]["weights"])
    assert args.symmetric and args.num_bits == bits
    seen = set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        w = float_model.get_submodule(name).weight.detach().float()  # (out, in)
        groups = module.scales.shape[1]
        wg = w.reshape(w.shape[0], groups, -1)  # (out, G, gs)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)  # (out, G)
        assert torch.equal(scale.to(torch.float16), module.scales), name
        codes = quantize(w, module.scales.float(), torch.zeros_like(zp), args)  # (out, in)
        assert torch.equal(codes.to(torch.int32), module.weight_codes().to(torch.int32)), name
        seen |= set(module.weight_codes().unique().tolist())
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        local["weight_scale"] = local["weight_scale"].float()
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        assert torch.equal(PackedQuantizationCompressor.decompress(local, scheme)["weight"],
                           module.dequantized_weight()), name
    assert seen == set(range(-(1 << (bits - 1)), 1 << (bits - 1)))  # the full range: qmin included


def test_formats_and_stored_tensors(tiny):
    model, _ = quantized(tiny, DTypeConfig("int4", True, True))
    tensors, qconfig = compressed_tensors_state(model)
    p = "model.layers.0.mlp.down_proj."  # (64, 128), 4 groups of 32
    assert tensors[p + "weight_packed"].shape == (64, 16) and tensors[p + "weight_packed"].dtype == torch.int32
    assert tensors[p + "weight_scale"].shape == (64, 4) and tensors[p + "weight_scale"].dtype == torch.float16
    assert tensors[p + "weight_zero_point"].shape == (8, 4) and tensors[p + "weight_zero_point"].dtype == torch.int32
    assert tensors[p + "weight_shape"].tolist() == [64, 128]
    assert not any(k.endswith(("qweight", "qzeros", "scales")) for k in tensors)
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 32, False)
    assert qconfig["config_groups"]["group_0"]["targets"] == ["Linear"]
    w8a8, _ = quantized(tiny, DTypeConfig("int8"), DTypeConfig("int8"), **CHANNEL, a_qtype="per_tensor")
    tensors, qconfig = compressed_tensors_state(w8a8)
    assert qconfig["format"] == "int-quantized" and tensors[p + "weight"].dtype == torch.int8
    assert tensors[p + "input_scale"].shape == (1,)
    assert qconfig["config_groups"]["group_0"]["input_activations"]["dynamic"] is False


@pytest.mark.parametrize(
    ("w", "a", "a_static", "message"),
    [
        (QuantScheme("int3", "per_group", 32), None, False, "weights int3 g32: .*int3 has no equivalent"),
        (QuantScheme("int2", "per_channel"), None, False, "int2 has no equivalent"),
        (QuantScheme("fp4", "per_group", 32), None, False, "fp4 has no equivalent"),
        (QuantScheme("int4", "per_group", 48), None, False, "groupsize 48 does not divide the input dim 64"),
        (QuantScheme("int4", "per_tensor"), None, False, "per_channel or per_group"),
        (QuantScheme("int4", "per_channel"), QuantScheme("int8", "per_token"), False, "W8A8 only"),
        (QuantScheme("int8", "per_channel"), QuantScheme("int8", "per_token", has_zero=True), False, "symmetric and signed"),
        (QuantScheme("fp8", "per_group", 32), None, False, "fp8 weights must be per_channel"),
        (None, None, False, "nothing is quantized"),
    ],
)
def test_schemes_without_an_equivalent_are_named(w, a, a_static, message):
    with pytest.raises(ExportError, match=message):
        export_format(w, a, a_static, (64, 128))
    with pytest.raises(ExportError, match=r"output quantization \(int8 token\) is not exported"):
        export_format(QuantScheme("int8", "per_channel"), None, False, (64,), o=QuantScheme("int8", "per_token"))


def test_layers_with_an_output_scheme_or_activation_zero_are_refused(tiny, tmp_path):
    model, tok = quantized(tiny, DTypeConfig("int8"), DTypeConfig("int8", True, True), **CHANNEL, a_qtype="per_tensor")
    with pytest.raises(ExportError, match="layer model.layers.0.self_attn.q_proj: no compressed-tensors equivalent for act_zero"):
        quantkit.export_compressed_tensors(model, tok, tmp_path / "ct")
    model, tok = quantized(tiny, DTypeConfig("int4"))
    q = model.model.layers[1].mlp.up_proj
    with_out = QuantLinear(q.in_features, q.out_features, False, q.w_scheme, o_scheme=QuantScheme("int8", "per_token"))
    with_out.load_state_dict(q.state_dict())
    model.model.layers[1].mlp.up_proj = with_out
    with pytest.raises(ExportError, match="layer model.layers.1.mlp.up_proj: no compressed-tensors equivalent for o_scheme"):
        quantkit.export_compressed_tensors(model, tok, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_unexportable_model_names_the_layer_and_writes_nothing(tiny, tmp_path):
    model, tok = quantized(tiny, DTypeConfig("int4", True, True), groupsize=48)
    with pytest.raises(ExportError, match="layer model.layers.0.self_attn.q_proj: .*int4 g48 asym unsigned"):
        quantkit.export_compressed_tensors(model, tok, tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="no quantized layers"):
        quantkit.export_compressed_tensors(tiny()[0], tok, tmp_path / "ct")


# per-layer schemes (``layers`` rules): one config group per scheme; several formats make "mixed-precision"
MIXED = {
    "int4-g32+int8-g32": ((LayerRule(match="down_proj", w_dtype=DTypeConfig("int8")),), "pack-quantized", 2),
    "w4a16+fp8+w8a8": ((LayerRule(match="down_proj", w_dtype=DTypeConfig("int8"), groupsize=-1,
                                  a_dtype=DTypeConfig("int8", symmetric_range="full")),
                        LayerRule(match="o_proj", w_dtype=DTypeConfig("fp8"), groupsize=-1)), "mixed-precision", 3),
}


@pytest.mark.parametrize("case", MIXED)
def test_per_layer_schemes_export_as_config_groups_that_transformers_loads(tiny, tmp_path, case):
    rules, fmt, groups = MIXED[case]
    model, tok = tiny()
    algorithm = build_algorithm(RTNConfig(groupsize=32), DTypeConfig("int4"), FP16)
    report = quantize_model(model, get_arch("llama"), algorithm, None, "cpu", progress=False, layers=rules)
    expected = logits(model)
    out = quantkit.export_compressed_tensors(model, tok, tmp_path / "ct")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qconfig)
    assert qconfig["format"] == fmt and len(qconfig["config_groups"]) == groups
    by_name = {t: g for g in qconfig["config_groups"].values() for t in g["targets"]}
    assert sorted(by_name) == sorted(report.schemes.quantized())  # each linear in exactly the group of its scheme
    assert by_name["model.layers.1.mlp.down_proj"]["weights"]["num_bits"] == 8
    assert by_name["model.layers.1.mlp.up_proj"]["weights"]["num_bits"] == 4
    if fmt == "mixed-precision":
        assert by_name["model.layers.0.self_attn.o_proj"]["format"] == "float-quantized"
        assert by_name["model.layers.0.mlp.down_proj"]["format"] == "int-quantized"
        assert by_name["model.layers.0.mlp.down_proj"]["input_activations"]["dynamic"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(loaded) - expected).abs().max() <= 1e-5 * expected.abs().max()

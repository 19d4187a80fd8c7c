"""compressed-tensors export of the block formats: mxfp4 / nvfp4 / mxfp6_e2m3 / mxfp8 and fp8 in
128 x 128 (here 16 x 32) blocks decompress, through compressed-tensors' own compressors, to
quantkit's weights bit for bit; transformers loads them with quantkit's logits; formats without
an equivalent are refused naming the reason."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.base import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402

import quantkit  # noqa: E402
from quantkit import models  # noqa: E402
from quantkit.algorithms.registry import build_algorithm  # noqa: E402
from quantkit.algorithms.rtn import RTNConfig  # noqa: E402
from quantkit.arch import get_arch  # noqa: E402
from quantkit.config import DTypeConfig  # noqa: E402
from quantkit.export import ExportError, compressed_tensors_state, export_format  # noqa: E402
from quantkit.pipeline import quantize_model  # noqa: E402
from quantkit.quant_linear import QuantLinear  # noqa: E402
from quantkit.scheme import QuantScheme  # noqa: E402

FP16 = DTypeConfig("float16")
FORMATS = {  # (w_dtype, a_dtype, compressed-tensors format)
    "mxfp4": (DTypeConfig("mxfp4"), FP16, "mxfp4-pack-quantized"),
    "mxfp4-a-mxfp4": (DTypeConfig("mxfp4"), DTypeConfig("mxfp4"), "mxfp4-pack-quantized"),
    "nvfp4": (DTypeConfig("nvfp4"), FP16, "nvfp4-pack-quantized"),
    "mxfp6_e2m3": (DTypeConfig("mxfp6_e2m3"), FP16, "mxfp6-pack-quantized"),
    "mxfp8-a-mxfp8": (DTypeConfig("mxfp8"), DTypeConfig("mxfp8"), "mxfp8-quantized"),
    "fp8-block": (DTypeConfig("fp8_block", block=[16, 32]), FP16, "float-quantized"),
    "fp8-block-a-1x32": (DTypeConfig("fp8_block", block=[16, 32]), DTypeConfig("fp8_block", block=32),
                         "float-quantized"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = models.build_tiny_llama(tmp_path_factory.mktemp("export-formats") / "llama")
    return lambda: models.load_model(str(path), torch.float32)


def quantized(tiny, w, a=FP16):
    model, tok = tiny()
    algorithm = build_algorithm(RTNConfig(), w, a)  # the dtype's own block decides the groups
    quantize_model(model, get_arch("llama"), algorithm, None, "cpu", batch_size=2, progress=False)
    return model, tok


def logits(model):
    with torch.no_grad():
        return model(torch.randint(4, 260, (2, 16), generator=torch.Generator().manual_seed(1))).logits


@pytest.mark.parametrize("case", FORMATS)
def test_compressed_tensors_decompresses_our_weights_exactly(tiny, case):
    w, a, fmt = FORMATS[case]
    model, _ = quantized(tiny, w, a)
    tensors, qconfig = compressed_tensors_state(model)
    QuantizationConfig.model_validate(qconfig)  # the config parses as the package's own model
    assert qconfig["format"] == fmt
    (group,) = qconfig["config_groups"].values()
    args = QuantizationArgs(**group["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        ours = module.dequantized_weight()
        dense = compressor.decompress(dict(local), scheme)["weight"]
        assert torch.equal(dense, ours.to(dense.dtype)), name  # mx/nvfp4 decompress to bfloat16
        if "weight_packed" in local and w.name != "mxfp6_e2m3":  # and in float32, exactly
            values = _fp4_values(local["weight_packed"], module.out_features, module.in_features)
            scale = compressor._decompress_scale(local["weight_scale"], torch.float32)
            exact = dequantize(values, scale.float(), args=args, global_scale=local.get("weight_global_scale"),
                               dtype=torch.float32)
            assert torch.equal(exact, ours), name


def _fp4_values(packed, m, n):
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    return unpack_fp4_from_uint8(packed, m, n, dtype=torch.float32)


def test_stored_tensors(tiny):
    model, _ = quantized(tiny, DTypeConfig("nvfp4"))
    tensors, qconfig = compressed_tensors_state(model)
    layer = model.model.layers[0].mlp.down_proj
    name = "model.layers.0.mlp.down_proj"
    assert tensors[f"{name}.weight_packed"].shape == (layer.out_features, layer.in_features // 2)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(tensors[f"{name}.weight_global_scale"], layer.global_scale.reshape(1))
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"], weights["scale_dtype"]) == (
        "tensor_group", 16, "torch.float8_e4m3fn")
    model, _ = quantized(tiny, DTypeConfig("fp8_block", block=[16, 32]))
    tensors, qconfig = compressed_tensors_state(model)
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["block_structure"]) == ("block", [16, 32])
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (4, 4)  # (64 / 16, 128 / 32)


@pytest.mark.parametrize("case", ["mxfp4", "mxfp8-a-mxfp8", "fp8-block", "nvfp4"])
def test_transformers_loads_the_export(tiny, tmp_path, case):
    """transformers (with compressed-tensors) builds the model from the folder and runs it.
    compressed-tensors decompresses MX / NVFP4 weights into bfloat16 whatever the model's dtype
    (a float32 model fails in ``F.linear``), so those load in bfloat16 and the logits differ by
    bfloat16 arithmetic (the weights themselves are ours exactly: the decompression test);
    dynamic MX activations are recomputed by compressed-tensors' own rule (the block maximum
    rounded to the nearest power of two, where the OCP spec floors it)."""
    w, a, _ = FORMATS[case]
    model, tok = quantized(tiny, w, a)
    expected = logits(model)
    out = quantkit.export_compressed_tensors(model, tok, tmp_path / "ct")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    from transformers import AutoModelForCausalLM

    bf16 = qconfig["format"] != "float-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16 if bf16 else torch.float32)
    got = logits(loaded).float()
    tol = 0.1 if a is not FP16 else 0.03 if bf16 else 1e-5
    assert (got - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize(("w", "a", "message"), [
    (QuantScheme("mxfp6_e3m2", "per_group", 32), None, "mxfp6_e2m3"),
    (QuantScheme("fp4", "per_group", 32, scale_format="e4m3"), None, "nvfp4"),
    (QuantScheme("fp4", "per_group", 64, scale_format="e8m0"), None, "groups of 32"),
    (QuantScheme("nvfp4", "per_group", 16), QuantScheme("nvfp4", "per_group", 16),
     "static calibrated per-tensor scale"),
    (QuantScheme("mxfp4", "per_group", 32), QuantScheme("mxfp8", "per_group", 32), "fp4 with e8m0 scales"),
    (QuantScheme("fp8", "per_group", 32, block_rows=16, scale_format="e8m0"), None, "fp8 e4m3 with float scales"),
    (QuantScheme("fp4", "per_group", 32), None, "weights must be int4, int8 or fp8"),
    (QuantScheme("int4", "per_group", 32, scale_format="float32"), None, "float32 scales"),
])
def test_formats_without_an_equivalent_are_refused(w, a, message):
    with pytest.raises(ExportError, match=message):
        export_format(w, a, False, (64, 128))

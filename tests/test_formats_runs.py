"""Block formats through the run: config keys validated before loading, schemes the algorithms
build, QuantLinear storage in the scale format and its bits, exact save/reload, GPTQ and AWQ on
the block grid."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import quantkit
from quantkit import models, reference, runner
from quantkit.algorithms.awq import search_clip
from quantkit.algorithms.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.rtn import RTNConfig
from quantkit.algorithms.smoothquant import SmoothQuantConfig
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig, build_run_config
from quantkit.pipeline import quantize_model
from quantkit.quant_linear import QuantLinear, weight_qparams
from quantkit.results import bits_per_weight
from quantkit.scheme import QuantScheme
from tests.test_config import compose_dict

FP16 = DTypeConfig("float16")
TINY = ["model=tiny-llama", "eval.seq_length=64", "eval.max_windows=2", "num_calibrate=4", "calibrate_seq_length=32"]


# ------------------------------------------------------------------------- config and schemes


@pytest.mark.parametrize(("overrides", "w", "a"), [
    (["w_dtype=mxfp4"], "mxfp4 g32", None),
    (["w_dtype=nvfp4", "a_dtype=nvfp4"], "nvfp4 g16", "nvfp4 g16"),
    (["w_dtype=fp8_block", "a_dtype=fp8_block"], "fp8_block b128x128", "fp8_block g128"),
    (["w_dtype=mxfp6_e3m2", "a_dtype=mxfp8", "algo=gptq"], "mxfp6_e3m2 g32", "mxfp8 g32"),
    (["w_dtype=mxfp4", "algo.groupsize=32"], "mxfp4 g32", None),  # the block's own groups, spelled out
    (["w_dtype=mxfp4", "w_dtype.block=16"], "mxfp4 g16", None),
    (["w_dtype=fp4", "w_dtype.scale_format=e8m0", "algo.groupsize=64"], "fp4 g64 e8m0", None),
    (["w_dtype=int4", "w_dtype.scale_format=float32", "a_dtype=int4", "a_dtype.block=32"],
     "int4 g128 asym unsigned float32", "int4 g32 restricted"),
    (["w_dtype=mxfp4", "algo=smoothquant", "a_dtype=mxfp4"], "mxfp4 g32", "mxfp4 g32"),
])
def test_the_schemes_runs_build(overrides, w, a):
    cfg = build_run_config(compose_dict(*overrides))
    algorithm = build_algorithm(cfg.algo, cfg.w_dtype, cfg.a_dtype)
    assert algorithm.w_scheme.describe() == w
    assert (algorithm.a_scheme.describe() if algorithm.a_scheme else None) == a


@pytest.mark.parametrize(("overrides", "message"), [
    (["w_dtype=mxfp4", "algo.groupsize=64"], "w_dtype=mxfp4 quantizes in blocks of 1x32 (w_dtype.block), so "
                                             "algo.groupsize=64 cannot apply"),
    (["w_dtype=nvfp4", "algo.w_qtype=per_channel", "algo.groupsize=-1"], "with algo.w_qtype=per_channel cannot apply"),
    (["w_dtype=int4", "w_dtype.scale_format=e8m0"], "w_dtype.scale_format=e8m0 scales float grids only"),
    (["w_dtype=fp4", "w_dtype.scale_format=fp8"], "w_dtype.scale_format='fp8' is not valid; choose one of: "
                                                  "float16, float32, e8m0, e4m3"),
    (["w_dtype=fp4", "w_dtype.block=[0,32]"], r"w_dtype.block=\[0, 32\] is not valid"),
    (["a_dtype=fp8", "a_dtype.block=[128,128]"], "activations are quantized in groups of one token"),
    (["a_dtype=mxfp4", "algo.a_qtype=per_tensor"], "algo.a_qtype=per_tensor (static scales) with a_dtype=mxfp4"),
    (["a_dtype.scale_format=e8m0"], "a_dtype.scale_format=e8m0 has nothing to act on"),
])
def test_bad_format_keys_fail_before_the_model_loads(overrides, message, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    cfg = build_run_config(compose_dict(*TINY, *overrides, f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("1x", "1x")):
        runner.run(cfg)


def test_block_wider_than_a_layer_names_the_block_key(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    cfg = build_run_config(compose_dict(*TINY, "w_dtype=fp8_block", f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"w_dtype.block: groups of 128 columns are wider than the model's "
                                          r"smallest layer input \(64\)"):
        runner.run(cfg)


# ----------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize(("scheme", "dtype", "bits"), [
    (QuantScheme("mxfp4", "per_group", 32), torch.uint8, 4 + 8 / 32),
    (QuantScheme("nvfp4", "per_group", 16), torch.uint8, 4 + 8 / 16 + 32 / (64 * 128)),
    (QuantScheme("mxfp6_e3m2", "per_group", 32), torch.uint8, 6 + 8 / 32),
    (QuantScheme("mxfp8", "per_group", 32), torch.uint8, 8 + 8 / 32),
    (QuantScheme("fp8_block", "per_group", 32, block_rows=32), torch.float32, 8 + 32 / (32 * 32)),
    (QuantScheme("fp4", "per_group", 32), torch.float16, 4 + 16 / 32),
])
def test_scales_are_stored_in_their_format_and_counted(scheme, dtype, bits):
    lin = nn.Linear(128, 64, bias=False)
    q = QuantLinear.from_linear(lin, scheme)
    assert q.scales.dtype == dtype and q.scales.shape == scheme.scale_shape(64, 128)
    assert (q.global_scale is not None) == scheme.has_global_scale
    assert q.weight_storage_bits() / (64 * 128) == pytest.approx(bits, abs=1e-12)
    w = lin.weight.detach()
    scale, _ = weight_qparams(w, scheme)  # float16 scales rounded to float16; the others on their grid
    assert torch.equal(q.dequantized_weight(), reference.dequantize(reference.quantize(w, scale, None, scheme),
                                                                    scale, None, scheme))
    if scheme.scale_format != "float16":
        assert torch.equal(q.dequantized_weight(), reference.fake_quantize(w, scheme))


def test_set_weight_refuses_scales_off_the_format_grid():
    lin = nn.Linear(64, 8, bias=False)
    scheme = QuantScheme("mxfp4", "per_group", 32)
    q = QuantLinear.from_linear(lin, scheme)
    codes, scale, _ = reference.quantize_tensor(lin.weight.detach(), scheme)
    with pytest.raises(ValueError, match="not a value of the e8m0 scale format"):
        q.set_weight(codes, scale * 1.5, None)
    nv = QuantLinear.from_linear(lin, QuantScheme("nvfp4", "per_group", 16))
    with pytest.raises(ValueError, match="need their per-tensor global_scale"):
        nv.set_weight(codes, nv.effective_scales(), None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = models.build_tiny_llama(tmp_path_factory.mktemp("formats") / "llama")
    return lambda: models.load_model(str(path), torch.float32)


def _samples(n=4, length=24):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(1))


def _quantized(tiny, config, w, a=FP16):
    model, tok = tiny()
    algorithm = build_algorithm(config, w, a)
    data = _samples() if algorithm.needs_calibration else None
    quantize_model(model, get_arch("llama"), algorithm, data, "cpu", batch_size=2, progress=False)
    return model, tok


@pytest.mark.parametrize(("config", "w", "a"), [
    (RTNConfig(), DTypeConfig("mxfp4"), DTypeConfig("mxfp4")),
    (RTNConfig(), DTypeConfig("nvfp4"), DTypeConfig("nvfp4")),
    (RTNConfig(), DTypeConfig("mxfp6_e2m3"), FP16),
    (GPTQConfig(), DTypeConfig("fp8_block", block=[16, 32]), DTypeConfig("fp8_block", block=32)),
    (GPTQConfig(), DTypeConfig("nvfp4"), FP16),
], ids=["rtn-mxfp4-w4a4", "rtn-nvfp4-w4a4", "rtn-mxfp6", "gptq-fp8-block", "gptq-nvfp4"])
def test_block_formats_save_and_reload_exactly(tiny, tmp_path, config, w, a):
    model, tok = _quantized(tiny, config, w, a)
    ids = _samples(2, 16)
    with torch.no_grad():
        expected = model(ids).logits
    quantkit.save_quantized(model, tok, tmp_path / "q")
    loaded = quantkit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.w_scheme == model.model.layers[0].mlp.down_proj.w_scheme
    assert bits_per_weight(loaded) == bits_per_weight(model)


# ------------------------------------------------------------------------------ algorithms


def _hessian(cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.3  # correlated
    H, _ = accumulate_hessian(None, 0, x)
    return H


@pytest.mark.parametrize("scheme", [QuantScheme("mxfp4", "per_group", 32), QuantScheme("nvfp4", "per_group", 16),
                                    QuantScheme("fp8_block", "per_group", 32, block_rows=8),
                                    QuantScheme("mxfp6_e3m2", "per_group", 32)],
                         ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_lies_on_the_block_grid_and_beats_rtn(scheme, actorder):
    """Every block's scale is a value of its format (the per-tensor e4m3 scale fixed before the
    columns change), the codes dequantize to GPTQ's weight, and the loss is below RTN's."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(24, 96, generator=gen)
    H = _hessian(96)
    codes, scale, zero, stats = gptq_quantize(W, H, scheme, blocksize=32, actorder=actorder)
    assert zero is None and scale.shape == scheme.scale_shape(24, 96)
    if scheme.has_global_scale:
        assert torch.equal(stats.global_scale, reference.global_scale(W, scheme))
    q = QuantLinear(96, 24, False, scheme)
    q.set_weight(codes, scale, None, stats.global_scale)  # raises if a scale is off its grid
    assert torch.equal(q.dequantized_weight(), stats.weight)
    rtn = reference.fake_quantize(W, scheme) - W
    assert stats.loss < float((rtn @ H * rtn).sum())


@pytest.mark.parametrize("scheme", [QuantScheme("mxfp4", "per_group", 32), QuantScheme("nvfp4", "per_group", 16),
                                    QuantScheme("fp8_block", "per_group", 32, block_rows=8)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_awq_clip_search_stays_on_the_scale_grid(scheme):
    """Candidate scales follow the format's rule for the shrunk range; the result is never worse
    than no clipping on the search's own loss. (On these heavy-tailed weights nvfp4 blocks find
    better clips; MX scales, which can only halve, and fp8 do not.)"""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 96, generator=gen) ** 3
    x = torch.randn(256, 96, generator=gen)
    scale, zero = search_clip(w, x, scheme, n_grid=10, max_shrink=0.5)
    glob = reference.global_scale(w, scheme)
    q = QuantLinear.from_linear(nn.Linear(96, 24, bias=False), scheme)
    q.set_weight(reference.quantize(w, scale, None, scheme), scale, None, glob)  # on the grid, else raises

    def loss(s):
        dw = reference.dequantize(reference.quantize(w, s, None, scheme), s, None, scheme) - w
        return float(((x @ dw.T) ** 2).sum())

    base = reference.compute_qparams(w, scheme, glob)[0]
    assert loss(scale) <= loss(base) * (1 + 1e-6)
    if scheme.scale_format == "e4m3":
        assert not torch.equal(scale, base) and loss(scale) < loss(base)


def test_smoothquant_w4a4_mx(tiny):
    model, _ = _quantized(tiny, SmoothQuantConfig(), DTypeConfig("mxfp4"), DTypeConfig("mxfp4"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.w_scheme.describe() == "mxfp4 g32" and layer.a_scheme.describe() == "mxfp4 g32"
    with torch.no_grad():
        assert math.isfinite(float(model(_samples(1, 16)).logits.abs().max()))

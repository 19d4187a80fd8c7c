"""AWQ: the pure searches on synthetic data, the exact fold, and the pipeline on tiny models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import quantkit.algorithms.awq as awq
from quantkit.algorithms.fold import FoldTarget, fold_scales
from quantkit import models
from quantkit import reference as ref
from quantkit.algorithms.rtn import RTN, RTNConfig
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig, build
from quantkit.pipeline import quantize_model
from quantkit.quant_linear import QuantLinear, storage_scale, weight_qparams
from quantkit.scheme import QuantScheme

FP16 = DTypeConfig("float16")
INT3 = DTypeConfig("int3", has_zero=True, unsigned=True)
INT4 = DTypeConfig("int4", has_zero=True, unsigned=True)
INT8 = DTypeConfig("int8")

# every grid family: signed symmetric, asymmetric signed/unsigned, unsigned without zero is
# left out (it clips negative weights to 0), minifloats; groups that do not divide 200 columns
SCHEMES = {
    "int4-g64-sym": QuantScheme("int4", "per_group", 64),
    "int3-g64-asym": QuantScheme("int3", "per_group", 64, has_zero=True, unsigned=True),
    "int2-chan-asym-signed": QuantScheme("int2", "per_channel", has_zero=True),
    "int4-tensor": QuantScheme("int4", "per_tensor"),
    "fp4-g32": QuantScheme("fp4", "per_group", 32),
    "fp8-chan": QuantScheme("fp8", "per_channel"),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": models.build_tiny_llama(root / "llama"), "opt": models.build_tiny_opt(root / "opt")}


def load(tiny_dirs, kind="llama", outliers=True):
    """A tiny model whose norms boost a few channels 30x: activation outliers, as in real LLMs."""
    model, _ = models.load_model(str(tiny_dirs[kind]), torch.float32)
    if outliers:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith(("layernorm", "layer_norm")):
                    module.weight[[3, 17, 40]] *= 30
    return model


def samples(n=4, length=32, seed=1):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(seed))


def outlier_data(tokens=256, cols=200, rows=48, seed=0):
    """Inputs with a few 30x channels, and weights ``(rows, cols)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, [5, 77, 130, 199]] *= 30
    w = torch.randn(rows, cols, generator=g)
    return x, w


def output_loss(x, w, w_hat):
    return float(((x @ (w - w_hat).T) ** 2).sum())


def group_loss(x, w, w_hat, scheme):
    """Sum over weight groups of each group's own output error (what the clip search minimises)."""
    groups = ref.group_index(x.shape[1], scheme)
    return sum(output_loss(x[:, groups == g], w[:, groups == g], w_hat[:, groups == g]) for g in groups.unique())


def awq_weight(w, s, scheme):
    """What the quantized group computes, on the original inputs: ``Q(w * s) / s``."""
    return awq.fake_quantize_weight(w * s, scheme) / s


# ---------------------------------------------------------------- config


def test_w_groupsize_is_the_seed_alias_of_groupsize():
    assert build(awq.AWQConfig, {"w_groupsize": 32}, "algo").groupsize == 32
    assert build(awq.AWQConfig, {"groupsize": 64, "w_groupsize": None}, "algo").groupsize == 64
    algo = awq.AWQ(awq.AWQConfig(w_groupsize=-1), INT4, FP16)
    assert algo.w_scheme.granularity == "per_channel"


@pytest.mark.parametrize("key, value", [
    ("w_groupsize", 0), ("groupsize", -2), ("n_grid", 0), ("max_shrink", 1.0), ("max_shrink", -0.1),
    ("max_tokens", 0), ("w_qtype", "per_row"), ("a_qtype", "per_channel"),
])
def test_invalid_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"algo.{key}"):
        build(awq.AWQConfig, {key: value}, "algo")


def test_awq_needs_quantized_weights():
    with pytest.raises(ConfigError, match="w_dtype=float16"):
        awq.AWQ(awq.AWQConfig(), FP16, INT8)


# ---------------------------------------------------------------- observer


def test_observer_keeps_an_even_bounded_subsample_and_exact_means():
    obs = awq.AWQObserver(max_tokens=64)
    xs = [torch.randn(37, 5) for _ in range(10)]  # 370 tokens in uneven batches
    for i, x in enumerate(xs):
        x[:, 0] = torch.arange(37) + 37 * i  # channel 0 holds the global token index
        obs.update(x)
    full = torch.cat(xs)
    kept = obs.rows[:, 0].long()
    assert 32 <= len(kept) <= 64
    assert torch.equal(kept, torch.arange(0, 370, obs.stride))
    assert torch.allclose(obs.mean_abs, full.abs().mean(0))
    s = torch.rand(5) + 0.5
    obs.rescale(s)
    assert torch.allclose(obs.mean_abs, (full / s).abs().mean(0))
    assert torch.allclose(obs.rows, full[::obs.stride] / s)
    assert torch.allclose(obs.lo, (full / s).amin(0)) and torch.allclose(obs.hi, (full / s).amax(0))


# ---------------------------------------------------------------- scale search


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_search_scales_never_loses_to_rtn(scheme):
    x, w = outlier_data()
    s = awq.search_scales(w, x, x.abs().mean(0), scheme, n_grid=10)
    assert s.shape == (200,) and bool((s > 0).all())
    rtn = output_loss(x, w, awq.fake_quantize_weight(w, scheme))
    assert output_loss(x, w, awq_weight(w, s, scheme)) <= rtn * (1 + 1e-5)


@pytest.mark.parametrize("name", ["int4-g64-sym", "int3-g64-asym", "fp4-g32"])
def test_search_scales_beats_rtn_on_outlier_channels(name):
    scheme = SCHEMES[name]
    x, w = outlier_data()
    s = awq.search_scales(w, x, x.abs().mean(0), scheme)
    rtn = output_loss(x, w, awq.fake_quantize_weight(w, scheme))
    assert output_loss(x, w, awq_weight(w, s, scheme)) < 0.8 * rtn
    assert s[[5, 77, 130, 199]].min() > s.median()  # the salient channels are scaled up


def test_search_scales_returns_ones_when_alpha_zero_is_best():
    x, w = outlier_data()
    scheme = SCHEMES["int3-g64-asym"]
    # a misleading activation mean: a channel that is zero in the loss data looks salient,
    # so scaling it up only costs resolution elsewhere in its group
    x[:, 0] = 0
    x_mean = torch.ones(200)
    x_mean[0] = 1e4
    assert torch.equal(awq.search_scales(w, x, x_mean, scheme), torch.ones(200))
    # uniform activations: every alpha gives s = 1 up to rounding
    torch.testing.assert_close(awq.search_scales(w, x, torch.full((200,), 3.0), scheme), torch.ones(200))


def test_search_scales_per_tensor_quantizes_each_linear_on_its_own():
    x, w = outlier_data()
    w[:24] *= 100  # the first linear is much larger: one shared scale would crush the second
    scheme = SCHEMES["int4-tensor"]
    s = awq.search_scales(w, x, x.abs().mean(0), scheme, row_splits=[24, 24])
    per_linear = torch.cat([awq_weight(part, s, scheme) for part in w.split(24)])
    assert output_loss(x, w, per_linear) <= output_loss(x, w, torch.cat(
        [awq.fake_quantize_weight(part, scheme) for part in w.split(24)])) * (1 + 1e-5)


# ---------------------------------------------------------------- clip search


def heavy_tailed_weights(rows=48, cols=200, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 8  # rare large weights stretch the ranges
    return w


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_clip_never_increases_the_loss_and_returns_storage_qparams(scheme):
    x, _ = outlier_data()
    w = heavy_tailed_weights()
    scale, zero = awq.search_clip(w, x, scheme, n_grid=20, max_shrink=0.5, chunk_rows=20)
    base_scale, base_zero = weight_qparams(w, scheme)
    assert scale.shape == base_scale.shape and torch.equal(scale, storage_scale(scale))
    assert (zero is None) == (base_zero is None) and (zero is None or torch.equal(zero, base_zero))
    clipped = ref.dequantize(ref.quantize(w, scale, zero, scheme), scale, zero, scheme)
    plain = awq.fake_quantize_weight(w, scheme)
    assert group_loss(x, w, clipped, scheme) <= group_loss(x, w, plain, scheme) * (1 + 1e-5)
    if scheme.granularity == "per_channel":  # one group per row: the group loss is the output loss
        assert output_loss(x, w, clipped) <= output_loss(x, w, plain) * (1 + 1e-5)
    # QuantLinear stores exactly what the search evaluated
    q = QuantLinear.from_linear(_linear(w), scheme, qparams=(scale, zero))
    assert torch.equal(q.dequantized_weight(), clipped)


@pytest.mark.parametrize("name", ["int3-g64-asym", "int4-g64-sym", "int2-chan-asym-signed"])
def test_clip_helps_on_heavy_tailed_weights(name):
    scheme = SCHEMES[name]
    x, _ = outlier_data()
    w = heavy_tailed_weights()
    scale, zero = awq.search_clip(w, x, scheme)
    clipped = ref.dequantize(ref.quantize(w, scale, zero, scheme), scale, zero, scheme)
    assert group_loss(x, w, clipped, scheme) < 0.95 * group_loss(x, w, awq.fake_quantize_weight(w, scheme), scheme)


def test_clip_with_no_shrink_is_plain_min_max():
    x, w = outlier_data()
    scheme = SCHEMES["int3-g64-asym"]
    scale, zero = awq.search_clip(w, x, scheme, max_shrink=0.0)
    assert torch.equal(scale, weight_qparams(w, scheme)[0]) and torch.equal(zero, weight_qparams(w, scheme)[1])


def _linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


# ---------------------------------------------------------------- fold (every family: test_arch.py)


class _FoldOnly(awq.AWQ):
    """AWQ that searches and folds scales but leaves the weights in full precision."""

    def quantize_group(self, linears, observers, prev, schemes=None):
        return dict(linears)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_awq_scale_search_and_fold_through_the_pipeline_is_exact(tiny_dirs, kind):
    model = load(tiny_dirs, kind)
    reference = copy.deepcopy(model)
    algo = _FoldOnly(awq.AWQConfig(groupsize=32, n_grid=10), INT3, FP16)
    quantize_model(model, get_arch(model.config.model_type), algo, samples(), "cpu", progress=False)
    blocks = get_arch(model.config.model_type).blocks
    norm = "input_layernorm" if kind == "llama" else "self_attn_layer_norm"
    changed = [not torch.equal(a.get_submodule(norm).weight, b.get_submodule(norm).weight)
               for a, b in zip(model.get_submodule(blocks), reference.get_submodule(blocks))]
    assert any(changed)  # the search did pick alpha > 0 somewhere
    ids = samples(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_gqa_producer_without_heads_layout_keeps_unit_scales_but_is_clipped_and_quantized(tiny_dirs, caplog):
    """A v_proj narrower than o_proj's input and no heads layout in the target: no fold."""
    model = load(tiny_dirs, "llama")
    attn = model.model.layers[0].self_attn
    assert attn.v_proj.out_features != attn.o_proj.in_features  # 2 KV heads for 4 query heads
    v_before, o_before = attn.v_proj.weight.detach().clone(), attn.o_proj.weight.detach().clone()
    algo = awq.AWQ(awq.AWQConfig(groupsize=32), INT3, FP16)
    obs = algo.make_observer("self_attn.o_proj", attn.o_proj)
    x = torch.randn(128, 64)
    x[:, 5] *= 30
    obs.update(x)
    linears, observers = {"self_attn.o_proj": attn.o_proj}, {"self_attn.o_proj": obs}
    with caplog.at_level(logging.INFO, logger="quantkit.algorithms.awq"):
        algo.prepare_group(linears, observers, FoldTarget(attn.v_proj))
    assert "grouped-query attention" in caplog.text
    assert torch.equal(attn.v_proj.weight, v_before) and torch.equal(attn.o_proj.weight, o_before)
    q = algo.quantize_group(linears, observers, FoldTarget(attn.v_proj))["self_attn.o_proj"]
    assert isinstance(q, QuantLinear)
    assert output_loss(x, o_before, q.dequantized_weight()) <= output_loss(
        x, o_before, awq.fake_quantize_weight(o_before, algo.w_scheme)) * (1 + 1e-5)
    with pytest.raises(ValueError, match="grouped-query"):
        fold_scales(FoldTarget(attn.v_proj), [attn.o_proj], torch.ones(64))


def test_gqa_o_proj_scales_are_shared_by_the_query_heads_of_a_value_head(tiny_dirs):
    """Under grouped-query attention o_proj reads each value head once per query head sharing
    it: AWQ's scale is one value per copy set, folded once into v_proj's rows, and the
    full-precision model computes the same function."""
    model = load(tiny_dirs, "llama")
    reference = copy.deepcopy(model)
    attn = model.model.layers[0].self_attn
    repeat, dim = attn.num_key_value_groups, attn.head_dim
    assert repeat == 2 and attn.o_proj.in_features == repeat * attn.v_proj.out_features
    seen = []
    handle = attn.o_proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        model(samples())
    handle.remove()
    x = torch.cat(seen)  # (tokens, 64): o_proj's real inputs
    x[:, 5] *= 30  # an outlier channel in one copy only: the shared scale must still be one value
    algo = awq.AWQ(awq.AWQConfig(groupsize=32), INT3, FP16)
    obs = algo.make_observer("self_attn.o_proj", attn.o_proj)
    obs.update(x)
    target = FoldTarget(attn.v_proj, heads=(repeat, dim))
    v_before, o_before = attn.v_proj.weight.detach().clone(), attn.o_proj.weight.detach().clone()
    algo.prepare_group({"self_attn.o_proj": attn.o_proj}, {"self_attn.o_proj": obs}, target)
    s = attn.o_proj.weight[0] / o_before[0]  # (64,): the folded scale per input column
    assert not torch.allclose(s, torch.ones_like(s))  # the outlier made AWQ scale something
    copies = s.reshape(-1, repeat, dim)  # (kv_heads, repeat, head_dim)
    torch.testing.assert_close(copies, copies[:, :1].expand_as(copies))
    torch.testing.assert_close(attn.v_proj.weight, v_before / copies[:, 0].reshape(-1, 1))
    ids = samples(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="differ between the query heads"):
        fold_scales(target, [attn.o_proj], torch.rand(64) + 0.5)
    shared = target.share(torch.arange(64.0))
    assert torch.equal(shared.reshape(-1, repeat, dim)[:, 0], torch.arange(64.0).reshape(-1, repeat, dim)[:, -1])


# ---------------------------------------------------------------- end to end


def _logits_error(model, reference, ids):
    with torch.no_grad():
        return float(((model(ids).logits - reference(ids).logits) ** 2).mean())


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_awq_end_to_end_quantizes_every_block_linear_and_beats_rtn(tiny_dirs, kind):
    model = load(tiny_dirs, kind)
    arch = get_arch(model.config.model_type)
    reference, rtn_model = copy.deepcopy(model), copy.deepcopy(model)
    report = quantize_model(model, arch, awq.AWQ(awq.AWQConfig(groupsize=32), INT3, FP16), samples(8), "cpu",
                            progress=False)
    quantize_model(rtn_model, arch, RTN(RTNConfig(groupsize=32), INT3, FP16), None, "cpu", progress=False)
    block_linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith(arch.blocks)]
    assert sorted(report.quantized) == sorted(block_linears)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in block_linears)
    ids = samples(seed=2)
    assert _logits_error(model, reference, ids) < 0.8 * _logits_error(rtn_model, reference, ids)


@pytest.mark.parametrize("flags", [
    {"layer_sequential": True}, {"block_sequential": True}, {"clip": False}, {"a_qtype": "per_tensor"},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_awq_variants_run_and_stay_close_to_full_precision(tiny_dirs, flags):
    model = load(tiny_dirs)
    reference = copy.deepcopy(model)
    a_dtype = INT8 if flags.get("a_qtype") == "per_tensor" else FP16
    algo = awq.AWQ(awq.AWQConfig(groupsize=32, n_grid=10, **flags), INT4, a_dtype)
    quantize_model(model, get_arch("llama"), algo, samples(), "cpu", batch_size=2, progress=False)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and (q_proj.act_scale is not None) == (a_dtype is INT8)
    ids = samples(seed=2)
    with torch.no_grad():
        scale = float((reference(ids).logits ** 2).mean())
    assert _logits_error(model, reference, ids) < 0.05 * scale

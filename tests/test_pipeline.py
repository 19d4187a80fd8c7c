"""The calibration pipeline with RTN on tiny models: what gets quantized, and what each flag does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantkit import models
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.rtn import RTNConfig
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig
from quantkit.pipeline import quantize_model
from quantkit import reference as ref
from quantkit.quant_linear import QuantLinear, weight_qparams

INT4 = DTypeConfig("int4", has_zero=True, unsigned=True)
INT2 = DTypeConfig("int2", has_zero=True, unsigned=True)
INT8 = DTypeConfig("int8")
FP16 = DTypeConfig("float16")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": models.build_tiny_llama(root / "llama"), "opt": models.build_tiny_opt(root / "opt")}


def load(tiny_dirs, kind="llama"):
    model, _ = models.load_model(str(tiny_dirs[kind]), torch.float32)
    return model


def rtn(w=INT4, a=FP16, **kwargs):
    return build_algorithm(RTNConfig(**{"groupsize": 32, **kwargs}), w, a)


def samples(n=4, length=24):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_rtn_weight_only_quantizes_every_block_linear_and_skips_lm_head(tiny_dirs, kind):
    model = load(tiny_dirs, kind)
    reference = copy.deepcopy(model)
    report = quantize_model(model, get_arch(model.config.model_type), rtn(), None, "cpu")
    arch = get_arch(model.config.model_type)
    block_linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith(arch.blocks)]
    assert sorted(report.quantized) == sorted(block_linears)
    assert isinstance(model.lm_head, nn.Linear) and report.skipped == ["lm_head"]
    for name in block_linears:  # RTN weights are exactly the fake-quantized originals
        q, w = model.get_submodule(name), reference.get_submodule(name).weight.detach()
        scale, zero = weight_qparams(w, q.w_scheme)
        codes = ref.quantize(w, scale, zero, q.w_scheme)
        assert torch.equal(q.dequantized_weight(), ref.dequantize(codes, scale, zero, q.w_scheme))
    ids = samples(1)
    assert torch.isfinite(model(ids).logits).all()


def test_skip_layers_by_regex_and_suffix(tiny_dirs):
    model = load(tiny_dirs)
    skip = ("lm_head", r"model\.layers\.0\.mlp\..*", "o_proj")
    quantize_model(model, get_arch("llama"), rtn(), None, "cpu", skip_layers=skip)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert all(isinstance(layer.self_attn.o_proj, nn.Linear) for layer in model.model.layers)


def test_lm_head_can_be_quantized_by_rtn_when_not_skipped(tiny_dirs):
    model = load(tiny_dirs)
    quantize_model(model, get_arch("llama"), rtn(), None, "cpu", skip_layers=())
    assert isinstance(model.lm_head, QuantLinear)


def _act_scales(model):
    return {n: m.act_scale.item() for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.act_scale is not None}


def _fp_input_ranges(model, ids):
    """Static int8 per-tensor scales computed from the full-precision model's own activations."""
    ranges, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers"):
            def hook(_m, args, _o, name=name):
                x = args[0]
                lo, hi = ranges.get(name, (float("inf"), float("-inf")))
                ranges[name] = (min(lo, x.min().item()), max(hi, x.max().item()))
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {n: max(abs(lo), abs(hi)) / 127 for n, (lo, hi) in ranges.items()}


def test_static_activation_scales_come_from_full_precision_inputs_by_default(tiny_dirs):
    model = load(tiny_dirs)
    ids = samples()
    expected = _fp_input_ranges(copy.deepcopy(model), ids)
    quantize_model(model, get_arch("llama"), rtn(INT2, INT8, a_qtype="per_tensor"), ids, "cpu", batch_size=2)
    got = _act_scales(model)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name


def test_block_sequential_calibrates_on_quantized_outputs(tiny_dirs):
    ids = samples()
    base = _act_scales(_quantized(tiny_dirs, ids, block_sequential=False))
    seq = _act_scales(_quantized(tiny_dirs, ids, block_sequential=True))
    block0 = [n for n in base if n.startswith("model.layers.0.")]
    block1 = [n for n in base if n.startswith("model.layers.1.")]
    assert all(base[n] == seq[n] for n in block0 if "q_proj" in n)  # block 0's first group: same input
    assert any(base[n] != pytest.approx(seq[n], rel=1e-6) for n in block1)


def test_layer_sequential_calibrates_later_groups_on_quantized_earlier_ones(tiny_dirs):
    ids = samples()
    base = _act_scales(_quantized(tiny_dirs, ids, layer_sequential=False))
    seq = _act_scales(_quantized(tiny_dirs, ids, layer_sequential=True))
    first = "model.layers.0.self_attn.q_proj"
    assert base[first] == seq[first]  # the first group always sees the block's input
    assert base["model.layers.0.self_attn.o_proj"] != pytest.approx(seq["model.layers.0.self_attn.o_proj"], rel=1e-6)


def _quantized(tiny_dirs, ids, **flags):
    model = load(tiny_dirs)
    quantize_model(model, get_arch("llama"), rtn(INT2, INT8, a_qtype="per_tensor", **flags), ids, "cpu", batch_size=2)
    return model


def test_blocks_move_to_device_and_back_to_offload(tiny_dirs, monkeypatch):
    model = load(tiny_dirs)
    moves = []
    for i, block in enumerate(model.model.layers):
        original = block.to

        def spy(*args, i=i, original=original, **kwargs):
            moves.append((i, str(args[0]) if args else str(kwargs.get("device"))))
            return original(*args, **kwargs)

        monkeypatch.setattr(block, "to", spy)
    quantize_model(model, get_arch("llama"), rtn(INT4, INT8, a_qtype="per_tensor"), samples(), "cpu", offload="cpu")
    per_block = [[d for j, d in moves if j == i] for i in range(2)]
    assert per_block[1][-2:] == ["cpu", "cpu"]  # device for quantization, then offload
    assert len(per_block[1]) >= 2


def test_static_activations_without_samples_is_an_error(tiny_dirs):
    model = load(tiny_dirs)
    with pytest.raises(ValueError, match="needs calibration samples"):
        quantize_model(model, get_arch("llama"), rtn(INT4, INT8, a_qtype="per_tensor"), None, "cpu")


def test_nan_activations_are_rejected_during_calibration(tiny_dirs):
    model = load(tiny_dirs)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_model(model, get_arch("llama"), rtn(INT4, INT8, a_qtype="per_tensor"), samples(), "cpu")


def test_unsupported_architecture_names_what_to_add():
    with pytest.raises(ConfigError, match="unsupported architecture model_type='bloom'.*ARCHS"):
        get_arch("bloom")


@pytest.mark.parametrize("block_sequential", [False, True])
def test_layer_sequential_phases_stop_after_their_linears_and_share_group_observers(tiny_dirs, block_sequential):
    """Counting calls: each phase's forward ends once its observed linears have run, and one
    observer per group is fed once per batch; the results match a run without the shortcut."""
    from quantkit import pipeline

    model = load(tiny_dirs)
    runs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers.0."):
            module.register_forward_hook(lambda *_a, name=name: runs.__setitem__(name, runs.get(name, 0) + 1))
    algorithm = rtn(INT4, INT8, a_qtype="per_tensor", layer_sequential=True, block_sequential=block_sequential)
    fed = []
    original = algorithm.make_group_observers

    def make_group_observers(linears, schemes=None):
        observers = original(linears, schemes)
        for observer in {id(o): o for o in observers.values()}.values():
            update = observer.update
            observer.update = lambda x, update=update: (fed.append(x.shape), update(x))
        assert len({id(o) for o in observers.values()}) <= 1
        return observers

    algorithm.make_group_observers = make_group_observers
    reference_model = copy.deepcopy(model)
    batches = 2  # 4 samples, batch_size 2
    quantize_model(model, get_arch("llama"), algorithm, samples(), "cpu", batch_size=batches)
    # the hooks were on the original linears (replaced after their phase): calls until then
    first_pass = 1 if not block_sequential else 0  # the pass that keeps full-precision outputs runs whole
    assert runs["model.layers.0.self_attn.q_proj"] == batches  # phase 0 observes it
    # phases 1-2 end before the MLP's down_proj (without the shortcut: 4 x batches), phase 3 observes it
    assert runs["model.layers.0.mlp.down_proj"] == batches * (1 + first_pass)
    assert len(fed) == 2 * 4 * batches  # 2 blocks x 4 groups, one shared observer each

    # the same model without the early stop: identical quantized weights and activation scales
    monkeypatch_run = pipeline._run_block
    pipeline._run_block = lambda block, hidden, kwargs, device, offload, keep, *_args, **options: monkeypatch_run(
        block, hidden, kwargs, device, offload, keep, in_place=options.get("in_place", False))
    try:
        full = build_algorithm(algorithm.config, INT4, INT8)
        quantize_model(reference_model, get_arch("llama"), full, samples(), "cpu", batch_size=batches)
    finally:
        pipeline._run_block = monkeypatch_run
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            other = reference_model.get_submodule(name)
            assert torch.equal(module.dequantized_weight(), other.dequantized_weight())
            assert torch.equal(module.act_scale, other.act_scale), name


def test_calibrate_dtype_autocasts_the_calibration_matmuls_only(tiny_dirs):
    """Under ``calibrate_dtype=bfloat16`` the linears compute in bfloat16 during calibration
    (an MLP input produced by them arrives rounded to bfloat16) while the residual stream, the
    weights and the quantized result stay float32; the scales move, but only a little."""
    ids = samples()
    seen = {}
    model = load(tiny_dirs)
    down = model.model.layers[1].mlp.down_proj

    def record(key):
        def hook(_module, args):
            seen.setdefault(key, args[0].dtype)  # returns None: the input stays as it is
        return hook

    down.register_forward_pre_hook(record("down"))
    model.model.layers[1].register_forward_pre_hook(record("block"))
    algorithm = rtn(INT2, INT8, a_qtype="per_tensor")
    quantize_model(model, get_arch("llama"), algorithm, ids, "cpu", batch_size=2, calibrate_dtype=torch.bfloat16)
    assert seen == {"down": torch.bfloat16, "block": torch.float32}
    got = _act_scales(model)
    assert all(m.act_scale.dtype == torch.float32 for m in model.modules() if isinstance(m, QuantLinear))
    fp32 = _act_scales(_quantized(tiny_dirs, ids))
    assert got.keys() == fp32.keys()
    assert any(got[n] != fp32[n] for n in got)
    for name in got:
        assert got[name] == pytest.approx(fp32[name], rel=0.05), name


def _gptq(**kwargs):
    from quantkit.algorithms.gptq import GPTQConfig

    return build_algorithm(GPTQConfig(**{"groupsize": 32, **kwargs}), INT4, INT8)


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("block_sequential", [True, False])
def test_reuse_outputs_gives_identical_results_with_fewer_forwards(tiny_dirs, kind, block_sequential, monkeypatch):
    """Reusing the stored outputs of already quantized parts changes nothing in the result
    (GPTQ weights, static activation scales) and computes fewer quantized linears (the
    attention in the MLP phases and the final pass, gate/up in the final pass)."""
    ids = samples()
    calls = {}
    results = {}
    forward = QuantLinear.forward
    for reuse in (False, True):
        def counting(self, x, reuse=reuse):
            calls[reuse] = calls.get(reuse, 0) + 1
            return forward(self, x)

        monkeypatch.setattr(QuantLinear, "forward", counting)
        model = load(tiny_dirs, kind)
        arch = get_arch(kind)
        algorithm = _gptq(a_qtype="per_tensor", layer_sequential=True, block_sequential=block_sequential)
        quantize_model(model, arch, algorithm, ids, "cpu", batch_size=2, reuse_outputs=reuse)
        results[reuse] = {n: (m.dequantized_weight(), m.act_scale) for n, m in model.named_modules()
                          if isinstance(m, QuantLinear)}
    assert results[True].keys() == results[False].keys()
    for name, (weight, act_scale) in results[True].items():
        assert torch.equal(weight, results[False][name][0]), name
        assert torch.equal(act_scale, results[False][name][1]), name
    assert calls[True] < 0.8 * calls[False], calls


def test_replay_store_is_safe_against_in_place_changes_and_changed_inputs():
    from quantkit.pipeline import _Replay

    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    replay = _Replay(block)
    x = torch.randn(3, 4)
    with replay.active({"2"}, store=True):  # layer 0 is final, layer 2 pending
        assert replay.parts({"2"}) == ["0"]
        first = block(x)
    with replay.active(set(), store=False):
        out = block[0](x)
        out.add_(100.0)  # a caller changing the output in place must not reach the store
        again = block(x)
        assert replay.hits == 2
        assert torch.equal(again, first)
        block(x + 1.0)  # other inputs: recomputed, not a hit
        assert replay.hits == 2
    y = torch.randn(3, 4)
    with replay.active({"2"}, store=True):
        stored = block(y)  # a miss, stored over the entry of x
    y_before = y.clone()
    y.mul_(2.0)  # the stored input changed in place afterwards: only a miss can follow
    with replay.active(set(), store=False):
        assert torch.equal(block(y_before), stored)
        assert replay.hits == 2
    replay.invalidate([block[0]])
    assert "0" not in replay.entries

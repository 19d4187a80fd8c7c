"""Architectures beyond Llama/OPT: the table rows against what transformers builds, exact scale
folding in every family, every algorithm through the pipeline, and the refusal of models that
do not follow the layout their model_type selects (before anything is changed).

Tiny random models (hidden 64, 2 layers, 4 experts) are built from transformers' own config
classes, so the module names and shapes are the installed version's.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers as tf
from torch import nn

from quantkit.algorithms.awq import AWQConfig
from quantkit.algorithms.gptq import GPTQConfig
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.rtn import RTNConfig
from quantkit.algorithms.smoothquant import SmoothQuantConfig
from quantkit.arch import ARCHS, expand_groups, get_arch, get_blocks, norm_probe, resolve_model_type, verify_layout
from quantkit.algorithms.fold import fold_blocker, fold_scales
from quantkit.config import ConfigError, DTypeConfig
from quantkit.calibration import capture_block_inputs
from quantkit.experts import UnfusedExperts, unfuse_experts
from quantkit.pipeline import fold_target, quantize_model
from quantkit.quant_linear import QuantLinear

FP16 = DTypeConfig("float16")
INT4 = DTypeConfig("int4", has_zero=True, unsigned=True)
INT8 = DTypeConfig("int8")
VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
# sliding windows shorter than the calibration samples: the blocks' masks differ
_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=64, max_position_embeddings=256, pad_token_id=0),
    "gemma": lambda: tf.GemmaConfig(**_COMMON, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: tf.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2),
    "mixtral": lambda: tf.MixtralConfig(**{**_COMMON, "intermediate_size": 96}, num_local_experts=4,
                                        num_experts_per_tok=2),
    # layer 1 dense: Qwen3-MoE mixes sparse and dense MLP layers
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_COMMON, head_dim=16, moe_intermediate_size=48, num_experts=4,
                                           num_experts_per_tok=2, mlp_only_layers=[1]),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                           num_experts=4, num_experts_per_tok=2),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                                  eos_token_id=2),
    "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
}
SUPPORTED = ["llama", "opt", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"]
NEW = ["gemma2", "phi3", "mixtral", "qwen3_moe"]


def build(kind: str) -> nn.Module:
    """A tiny random float32 model of ``kind`` with norms (and biases) perturbed away from
    their initial values, so folds into them are not trivially exact."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_CONFIGS[kind](), dtype=torch.float32).eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the reference loop the unfused experts reproduce
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights and biases, linear biases
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def samples(n: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _unfused(model: nn.Module, arch) -> nn.Module:
    if arch.experts is not None:
        for block in get_blocks(model, arch):
            path = arch.experts.path
            try:
                fused = block.get_submodule(path)
            except AttributeError:
                continue
            block.set_submodule(path, unfuse_experts(fused))
    return model


# ------------------------------------------------------------- layouts and exact folds


def test_model_types_select_the_rows_named_after_them():
    for kind in SUPPORTED:
        model_type = _CONFIGS[kind]().model_type
        assert model_type == kind and get_arch(model_type) is ARCHS[kind]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_unfused_experts_compute_what_the_fused_ones_do(kind):
    """Same routing and weights; gate and up run as two matmuls instead of one (float rounding)."""
    model = build(kind)
    ids = samples()
    before = logits(model, ids)
    _unfused(model, get_arch(kind))
    assert any(isinstance(m, UnfusedExperts) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", SUPPORTED)
def test_folding_random_scales_into_every_group_leaves_float_logits_unchanged(kind):
    """No quantization: fold random positive scales (0.1 .. 4) wherever the table allows it;
    the logits change only by float32 rounding. Counts the folds, so a row that silently
    allows none (or loses the fused/offset/router ones) fails."""
    model = build(kind)
    arch = get_arch(kind)
    ids = samples()
    before = logits(model, ids)
    _unfused(model, arch)
    verify_layout(model, arch)
    folded = {}
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in get_blocks(model, arch):
            for groups in expand_groups(block, arch):
                for group in groups:
                    try:
                        linears = [block.get_submodule(n) for n in group.linears]
                    except AttributeError:
                        continue  # an optional group this block lacks
                    target = fold_target(block, group, arch, gqa=True)
                    if group.heads is not None and linears[0].in_features != getattr(target.module, "out_features", 0):
                        # grouped-query attention: a fold only with the heads layout (algo.gqa_fold)
                        assert "grouped-query" in fold_blocker(fold_target(block, group, arch), linears)
                    if fold_blocker(target, linears) is None:
                        s = torch.rand(linears[0].in_features, generator=generator) * 3.9 + 0.1
                        fold_scales(target, linears, target.share(s))
                        folded[group.prev] = folded.get(group.prev, 0) + 1
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 0  # something was folded
    expected = {  # producers folded into, per model (2 layers); GQA v_proj -> o_proj with shared scales (gqa)
        "llama": {"input_layernorm": 2, "self_attn.v_proj": 2, "post_attention_layernorm": 2, "mlp.up_proj": 2},
        "opt": {"self_attn_layer_norm": 2, "self_attn.v_proj": 2, "final_layer_norm": 2, "fc1": 2},
        "gemma": {"input_layernorm": 2, "self_attn.v_proj": 2, "post_attention_layernorm": 2, "mlp.up_proj": 2},
        "gemma2": {"input_layernorm": 2, "self_attn.v_proj": 2, "pre_feedforward_layernorm": 2, "mlp.up_proj": 2},
        "gemma3_text": {"input_layernorm": 2, "self_attn.v_proj": 2, "pre_feedforward_layernorm": 2,
                        "mlp.up_proj": 2},
        "phi3": {"input_layernorm": 2, "self_attn.qkv_proj": 2, "post_attention_layernorm": 2, "mlp.gate_up_proj": 2},
        "mixtral": {"input_layernorm": 2, "self_attn.v_proj": 2, "post_attention_layernorm": 2,
                    **{f"mlp.experts.{e}.up_proj": 2 for e in range(4)}},
        "qwen3_moe": {"input_layernorm": 2, "self_attn.v_proj": 2, "post_attention_layernorm": 2, "mlp.up_proj": 1,
                      **{f"mlp.experts.{e}.up_proj": 1 for e in range(4)}},
    }
    assert folded == expected[kind]


def test_norm_probe_tells_plain_from_one_plus_weight_norms():
    llama, gemma2 = build("llama"), build("gemma2")
    plain, offset = llama.model.layers[0].input_layernorm, gemma2.model.layers[0].input_layernorm
    assert norm_probe(plain, 0.0) is None and norm_probe(offset, 1.0) is None
    assert "normalize(x) * weight" in norm_probe(offset, 0.0)
    assert "normalize(x) * (1 + weight)" in norm_probe(plain, 1.0)
    assert norm_probe(nn.LayerNorm(64), 0.0) is None  # weight and bias


# ------------------------------------------------------------- every algorithm, every new family


def _algorithm(name: str):
    configs = {
        "rtn": (RTNConfig(groupsize=32), INT4, FP16),
        "awq": (AWQConfig(groupsize=32, n_grid=5), INT4, FP16),
        "gptq": (GPTQConfig(groupsize=32), INT4, FP16),
        "gptaq": (GPTQConfig(groupsize=32, float_target=0.25), INT4, FP16),  # the full-precision stream too
        "smoothquant": (SmoothQuantConfig(alpha=0.5), INT8, INT8),
    }
    return build_algorithm(*configs[name])


@pytest.mark.parametrize("algo", ["rtn", "awq", "gptq", "gptaq", "smoothquant"])
@pytest.mark.parametrize("kind", NEW)
def test_every_algorithm_quantizes_every_block_linear_of_the_new_families(kind, algo):
    model = build(kind)
    arch = get_arch(kind)
    ids = samples(seed=3)
    before = logits(model, ids)
    report = quantize_model(model, arch, _algorithm(algo), samples(), "cpu", batch_size=2, progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(report.quantized) == quantized and report.skipped == ["lm_head"]
    assert not any(isinstance(m, nn.Linear) and n.startswith(arch.blocks) for n, m in model.named_modules())
    if arch.experts is not None:  # every expert's two matrices; the router stays in full precision
        experts = [n for n in quantized if ".experts." in n]
        sparse_layers = 2 if kind == "mixtral" else 1
        assert len(experts) == 3 * 4 * sparse_layers
        assert all(isinstance(b.mlp.gate.weight, nn.Parameter) for b in model.model.layers if hasattr(b.mlp, "gate"))
    after = logits(model, ids)
    assert torch.isfinite(after).all()
    rel = float((after - before).norm() / before.norm())
    assert rel < 0.35, rel  # int4 g32 here: 0.09-0.22 (the tiny Gemma 2 is the most sensitive)


def test_layer_sequential_gptq_runs_all_experts_down_proj_in_one_phase():
    """Per-expert groups of one table row are one phase: one calibration pass for all experts."""
    from quantkit import pipeline

    model = build("mixtral")
    passes = []
    original = pipeline._run_block

    def counting(block, *args, **kwargs):
        passes.append(kwargs.get("in_place", False))
        return original(block, *args, **kwargs)

    pipeline._run_block = counting
    try:
        quantize_model(model, get_arch("mixtral"), _algorithm("gptq"), samples(), "cpu", batch_size=2, progress=False)
    finally:
        pipeline._run_block = original
    assert len(passes) == 2 * (4 + 1)  # per block: q/k/v, o, experts' gate/up, experts' down, final


def test_every_expert_is_calibrated_on_every_token_even_if_never_routed():
    """Expert 3 is never chosen by the router; its observers still see all calibration tokens
    (and GPTQ gets a Hessian for it), while the layer output still uses the routed experts only."""
    model = build("mixtral")
    arch = get_arch("mixtral")

    def never_three(_module, _args, out):
        router_logits, weights, index = out
        return router_logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    for block in model.model.layers:
        block.mlp.gate.register_forward_hook(never_three)
    ids = samples()
    reference = logits(_unfused(copy.deepcopy(model), arch), ids)
    algorithm = _algorithm("gptq")
    seen = {}
    original = algorithm.make_group_observers

    def make_group_observers(linears, schemes=None):
        observers = original(linears, schemes)
        for name, observer in observers.items():
            update = observer.update
            observer.update = lambda x, name=name, update=update: (seen.__setitem__(name, seen.get(name, 0) + len(x)),
                                                                   update(x))
        return observers

    algorithm.make_group_observers = make_group_observers
    quantize_model(model, arch, algorithm, ids, "cpu", batch_size=2, progress=False)
    tokens = ids.numel()
    assert seen["mlp.experts.3.gate_proj"] == 2 * tokens  # the group's one observer: all tokens per block
    assert "mlp.experts.3.up_proj" not in seen or seen["mlp.experts.3.up_proj"] == 2 * tokens
    assert seen["mlp.experts.3.down_proj"] == 2 * tokens  # its own input, all tokens
    assert isinstance(model.model.layers[0].mlp.experts[3].down_proj, QuantLinear)
    rel = float((logits(model, ids) - reference).norm() / reference.norm())
    assert rel < 0.5


# ------------------------------------------------------------- per-block arguments


def test_capture_keeps_each_blocks_own_mask_and_positions():
    """Gemma 3: block 0 is sliding-window (window 8 < 24 tokens) with local rotary, block 1
    full attention with global rotary; each block must be calibrated with its own arguments."""
    model = build("gemma3_text")
    arch = get_arch("gemma3_text")
    ids = samples()
    blocks = get_blocks(model, arch)
    calib = capture_block_inputs(model, blocks, arch.blocks, ids, "cpu", "cpu", 2, progress=False)
    assert len(calib.hidden) == 2 and len(calib.kwargs) == 2
    with torch.no_grad():
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        hidden = torch.cat(calib.hidden)
        torch.testing.assert_close(hidden, states[0])
        for i, block in enumerate(blocks):
            hidden = torch.cat([block(h, **kw) for h, kw in zip(hidden.split(2), calib.kwargs[i])])
            if i < len(blocks) - 1:  # the last entry is after the final norm
                torch.testing.assert_close(hidden, states[i + 1])
    first, second = calib.kwargs[0][0], calib.kwargs[1][0]
    assert first["attention_mask"] is not None  # sliding window; full attention may pass None (causal)
    assert second["attention_mask"] is None or not torch.equal(first["attention_mask"], second["attention_mask"])
    assert not torch.equal(first["position_embeddings"][0], second["position_embeddings"][0])  # rotary bases


# ------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", ["gpt2", "falcon", "qwen2_moe"])
def test_unsupported_architectures_are_named(kind):
    with pytest.raises(ConfigError, match=f"unsupported architecture model_type='{kind}'.*ARCHS"):
        get_arch(_CONFIGS[kind]().model_type)


@pytest.mark.parametrize("kind, forced, message", [
    ("gemma2", "llama", r"input_layernorm \(Gemma2RMSNorm\) does not compute normalize\(x\) \* weight"),
    ("gemma", "llama", r"input_layernorm \(GemmaRMSNorm\) does not compute normalize\(x\) \* weight"),
    ("gemma3_text", "llama", r"does not compute normalize\(x\) \* weight"),
    ("llama", "gemma2", r"input_layernorm \(LlamaRMSNorm\) does not compute normalize\(x\) \* \(1 \+ weight\)"),
    ("phi3", "gemma2", r"has no self_attn.q_proj"),
    ("llama", "gemma", r"does not compute normalize\(x\) \* \(1 \+ weight\)"),
    ("phi3", "llama", r"has no self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"),
    ("mixtral", "llama", r"has no mlp.gate_proj, mlp.up_proj"),
    ("qwen3_moe", "qwen3", r"has no mlp.gate_proj, mlp.up_proj"),
    ("mixtral", "phi3", r"has no self_attn.qkv_proj"),
    ("phi3", "mixtral", r"has no self_attn.q_proj"),
    ("gpt2", "opt", r"no decoder blocks at 'model.decoder.layers'"),
    ("gpt2", "gpt_neox", r"no decoder blocks at 'gpt_neox.layers'"),
    ("falcon", "gpt_neox", r"no decoder blocks at 'gpt_neox.layers'"),
    ("opt", "llama", r"no decoder blocks at 'model.layers'"),
    ("qwen2_moe", "qwen3_moe", r"has linears the layout does not know: mlp.shared_expert.gate_proj"),
])
@pytest.mark.parametrize("algo", ["rtn", "awq"])
def test_a_model_that_does_not_follow_the_forced_layout_is_refused_before_any_change(kind, forced, message, algo):
    model = build(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message) as info:
        quantize_model(model, get_arch(forced), _algorithm(algo), samples(), "cpu", progress=False)
    assert "set model_type to the layout the model follows" in str(info.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_fold_probe_refuses_a_row_whose_norm_does_not_feed_the_group():
    """A Gemma 2 row that claims the MLP reads post_attention_layernorm (right kind of norm,
    right width, but it normalizes the attention output): only running the block shows it."""
    model = build("gemma2")
    groups = tuple(dataclasses.replace(g, prev="post_attention_layernorm") if g.prev == "pre_feedforward_layernorm"
                   else g for g in get_arch("gemma2").groups)
    wrong = dataclasses.replace(get_arch("gemma2"), groups=groups)
    verify_layout(model, wrong)  # names, widths and norm kind all look right
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="folding a scale into model.layers.0.post_attention_layernorm changed"):
        quantize_model(model, wrong, _algorithm("awq"), samples(), "cpu", progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("forced, own, ok", [
    ("auto", "gemma2", "gemma2"),
    ("llama", "mistral", "llama"),  # same layout
    ("llama", "falcon", "llama"),  # unknown to the table: checked after loading
    ("llama", "gemma2", None),
    ("gemma2", "llama", None),
    ("mixtral", "qwen3_moe", "mixtral"),  # one layout under two names
])
def test_resolve_model_type_refuses_a_layout_the_models_own_type_contradicts(forced, own, ok):
    if ok is None:
        with pytest.raises(ConfigError, match=f"model_type={forced!r} selects.*config.json says model_type={own!r}"):
            resolve_model_type(forced, own)
    else:
        assert resolve_model_type(forced, own) == ok


def test_tiny_llama_from_the_zoo_still_follows_its_row(tiny_model):
    for kind in ("llama", "opt"):
        verify_layout(tiny_model(kind), get_arch(kind))


def test_stray_and_wrongly_typed_linears_are_refused():
    from transformers.pytorch_utils import Conv1D

    model = build("llama")
    model.model.layers[1].mlp.extra = nn.Linear(64, 64)  # a linear no group of the row holds
    with pytest.raises(ConfigError, match=r"model.layers.1 has linears the layout does not know: mlp.extra"):
        verify_layout(model, get_arch("llama"))
    model = build("llama")
    model.model.layers[0].self_attn.q_proj = Conv1D(64, 64)  # GPT-2's kind of projection
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj is a Conv1D \(not an nn.Linear\)"):
        verify_layout(model, get_arch("llama"))


@pytest.mark.parametrize("kind", ["mixtral", "phi3"])
def test_quantized_new_families_save_and_load_to_identical_logits(kind, tmp_path):
    from quantkit.serialization import load, save_quantized

    model = build(kind)
    quantize_model(model, get_arch(kind), _algorithm("rtn"), None, "cpu", progress=False)
    save_quantized(model, None, tmp_path / "saved")
    loaded = load(tmp_path / "saved")
    ids = samples(seed=4)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# ------------------------------------------------------------- through the runner


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A tiny Gemma 2 checkpoint with the tiny models' byte-level tokenizer."""
    from transformers import AutoTokenizer

    from quantkit import models

    root = tmp_path_factory.mktemp("gemma2")
    tokenizer = AutoTokenizer.from_pretrained(models.build_tiny_llama(root / "llama"))
    build("gemma2").save_pretrained(root / "gemma2")
    tokenizer.save_pretrained(root / "gemma2")
    return root / "gemma2"


def _run_config(path, tmp_path, *overrides):
    from quantkit.config import build_run_config
    from tests.test_config import compose_dict

    return build_run_config(compose_dict(
        "model=hf", f"model.path={path}", "eval.seq_length=64", "eval.max_windows=2", "num_calibrate=4",
        "calibrate_seq_length=32", "algo.groupsize=32", f"output_dir={tmp_path}", *overrides))


def test_runner_refuses_a_contradicting_model_type_before_loading_weights(gemma2_dir, tmp_path, monkeypatch):
    from quantkit import runner

    monkeypatch.setattr(runner.models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError, match="model_type='llama' selects the llama layout.*model_type='gemma2'"):
        runner.run(_run_config(gemma2_dir, tmp_path, "model_type=llama"))
    assert not (tmp_path / "results.json").exists()


def test_runner_quantizes_gemma2_with_awq_end_to_end(gemma2_dir, tmp_path, monkeypatch):
    from quantkit import runner

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    results = runner.run(_run_config(gemma2_dir, tmp_path, "algo=awq", "algo.n_grid=4", "eval.baseline=true"))
    assert results["model_type"] == "gemma2" and results["quantized_layers"] == 2 * 7
    assert results["perplexity"] < 1.5 * results["baseline_perplexity"]


def test_min_input_dim_counts_the_attention_width_where_heads_times_head_dim_is_narrower():
    from quantkit.arch import min_input_dim

    config = tf.Gemma2Config(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, head_dim=256)
    assert min_input_dim(get_arch("gemma2"), config) == 2048  # o_proj reads 8 x 256
    assert min_input_dim(get_arch("llama"), tf.LlamaConfig(hidden_size=576, intermediate_size=1536,
                                                           num_attention_heads=9)) == 576

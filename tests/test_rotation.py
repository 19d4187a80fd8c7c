"""Rotations (QuaRot): the rotated float model computes what the original does, in every family
the table supports; the rest are refused before anything changes. Then what rotation is for:
outliers spread over all channels, and every algorithm quantizes the rotated model (online
Hadamards included), which saves, reloads and exports.

Tiny random models (hidden 64, 2 layers) come from transformers' own config classes, with norms
and biases perturbed so that folding them is not trivially exact.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn

import quantkit
from quantkit.algorithms.awq import AWQConfig
from quantkit.algorithms.gptq import GPTQConfig
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.rtn import RTNConfig
from quantkit.algorithms.smoothquant import SmoothQuantConfig
from quantkit.algorithms.zeroquant import ZeroQuantConfig
from quantkit.arch import get_arch, get_blocks
from quantkit.config import ConfigError, DTypeConfig, RotationConfig
from quantkit.hadamard import HadamardLinear, OnlineHadamard, hadamard_matrix, input_transform
from quantkit.pipeline import PipelineReport, _observe, fold_target, plan_block, plan_schemes, quantize_model
from quantkit.quant_linear import QuantLinear
from quantkit.rotation import Orthogonal, check_inputs, rms_norm_problem, rotate_model
from quantkit.serialization import CONFIG_FILE, CheckpointError

VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "llama-tied": lambda: tf.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: tf.MistralConfig(**_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),  # q/k/v biases
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=16),  # per-head q/k norms
    "gemma": lambda: tf.GemmaConfig(**_COMMON, head_dim=16),  # (1 + weight) norms, tied, scaled embeddings
    "phi3": lambda: tf.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2),  # fused qkv_proj / gate_up_proj
    "mixtral": lambda: tf.MixtralConfig(**{**_COMMON, "intermediate_size": 96}, num_local_experts=4,
                                        num_experts_per_tok=2),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_COMMON, head_dim=16, moe_intermediate_size=48, num_experts=4,
                                           num_experts_per_tok=2, mlp_only_layers=[1]),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                                pad_token_id=0),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"]),
}
SUPPORTED = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen3_moe"]
FULL = RotationConfig("hadamard", seed=0, heads=True, online=("down_proj", "o_proj"))
INT4, INT8, FP16 = DTypeConfig("int4"), DTypeConfig("int8"), DTypeConfig("float16")


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float32).eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights and biases, linear biases
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def samples(n: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(samples() if ids is None else ids, use_cache=False).logits


def rotated(kind: str, cfg: RotationConfig = FULL) -> nn.Module:
    model = build(kind)
    rotate_model(model, get_arch(model.config.model_type), cfg, model.config, samples(1, 16, seed=7))
    return model


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


# ---------------------------------------------------------------- exact in float


@pytest.mark.parametrize("kind, name", [(k, "hadamard") for k in SUPPORTED]
                         + [(k, "random") for k in ("llama", "qwen2", "phi3", "qwen3_moe")])
def test_rotated_float_model_computes_the_same_logits(kind, name):
    model = build(kind)
    before, embed = logits(model), model.get_input_embeddings().weight.clone()
    arch = get_arch(model.config.model_type)
    report = rotate_model(model, arch, RotationConfig(name, 3, True, ("down_proj", "o_proj")), model.config,
                          samples(1, 16, seed=7))
    assert rel_error(logits(model), before) < 1e-5
    assert report.probe_error < 1e-5
    assert (model.get_input_embeddings().weight - embed).abs().max() > 0.01  # really rotated
    blocks = get_blocks(model, arch)
    downs = [m for n, m in model.named_modules() if n.endswith("down_proj")]
    assert downs and all(isinstance(m, HadamardLinear) for m in downs)
    assert report.online["down_proj"] == len(downs) and report.online["o_proj"] == len(blocks)
    for block in blocks:  # every folded norm is the identity scale now
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            assert torch.all(norm.weight + arch.norm_offset == 1)


@pytest.mark.parametrize("kind", ["llama-tied", "gemma"])
def test_tied_embeddings_are_untied_and_reload_untied(kind, tmp_path):
    model = build(kind)
    before = logits(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model = rotated(kind, RotationConfig("hadamard"))
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is False
    quantkit.save_quantized(model, None, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = quantkit.load(tmp_path / "m")
    assert torch.equal(logits(loaded), logits(model)) and rel_error(logits(loaded), before) < 1e-5


@pytest.mark.parametrize("kind, reason", [
    ("opt", "LayerNorms subtract the mean and add a bias"),
    ("gemma2", "post-attention and post-feedforward norms"),
    ("gemma3_text", "post-attention and post-feedforward norms"),
])
def test_unsupported_layouts_are_refused_before_any_change(kind, reason):
    model = build(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=f"rotation is unsupported for the {kind} layout: its {reason}"):
        rotate_model(model, get_arch(kind), FULL, model.config, samples(1, 16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_norm_probe_tells_rms_norms_from_layer_norms():
    rms = build("llama").model.layers[0].input_layernorm
    assert rms_norm_problem(rms, 0.0) is None
    assert "subtracts the mean or adds a bias" in rms_norm_problem(nn.LayerNorm(64), 0.0)
    gemma = build("gemma").model.layers[0].input_layernorm
    assert rms_norm_problem(gemma, 1.0) is None


def test_a_row_that_misses_a_reader_is_caught_by_the_probe_batch():
    """A RotationSpec without o_proj among the writers leaves the attention output unrotated: the
    logits check refuses it."""
    import dataclasses

    arch = get_arch("llama")
    wrong = dataclasses.replace(arch, rotation=dataclasses.replace(arch.rotation, writers=("mlp.down_proj",)))
    model = build("llama")
    with pytest.raises(ConfigError, match="(neither reads nor writes|changed the model's logits)"):
        rotate_model(model, wrong, RotationConfig("hadamard"), model.config, samples(1, 16))


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal_and_seeded(kind):
    q = Orthogonal(576, kind, torch.Generator().manual_seed(0)).dense()  # (576, 576)
    assert torch.allclose(q @ q.t(), torch.eye(576), atol=1e-5)
    other = Orthogonal(576, kind, torch.Generator().manual_seed(1)).dense()
    assert (q - other).abs().max() > 0.01
    if kind == "hadamard":  # diag(+-1) H_576 with H_576 = (H_36 kron H_16) / 24
        signs = torch.sign(q @ hadamard_matrix(576).float().t()).diagonal()
        assert torch.allclose(q, signs[:, None] * hadamard_matrix(576).float(), atol=1e-6)


# ---------------------------------------------------------------- what it is for


def _outliers(model: nn.Module) -> nn.Module:
    """A few huge channels in the normalized stream and in down_proj's input, as trained LLMs have."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 30
            layer.mlp.up_proj.weight[[5, 40]] *= 20
    return model


def _inputs_of(model: nn.Module, name: str) -> torch.Tensor:
    seen = []
    module = model.get_submodule(name)
    handle = module.register_forward_hook(lambda m, a, o: seen.append(input_transform(m)(a[0]) if input_transform(m)
                                                                       else a[0]))
    logits(model)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_rotation_spreads_outlier_channels():
    plain, rot = _outliers(build("llama")), _outliers(build("llama"))
    rotate_model(rot, get_arch("llama"), RotationConfig("hadamard", online=("down_proj",)), rot.config, samples(1, 16))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        ratio = {}
        for label, model in (("plain", plain), ("rotated", rot)):
            x = _inputs_of(model, name)  # what the linear multiplies: (tokens, in)
            ratio[label] = float((x.abs().amax(1) / x.pow(2).mean(1).sqrt()).mean())  # max / rms per token
        assert ratio["rotated"] < ratio["plain"] / 2, (name, ratio)


def test_rotation_lowers_the_w4a4_error():
    errors = {}
    for rotate in (False, True):
        model = _outliers(build("llama"))
        before = logits(model)
        if rotate:
            rotate_model(model, get_arch("llama"), FULL, model.config, samples(1, 16))
        quantize_model(model, get_arch("llama"), build_algorithm(RTNConfig(groupsize=32), INT4, INT4), None, "cpu",
                       progress=False)
        errors[rotate] = float((logits(model) - before).pow(2).mean() / before.pow(2).mean())
    assert errors[True] < 0.75 * errors[False], errors


# ---------------------------------------------------------------- every algorithm composes

ALGORITHMS = {
    "rtn": (RTNConfig(groupsize=32), INT4, INT4),
    "gptq": (GPTQConfig(groupsize=32), INT4, INT8),
    "gptaq": (GPTQConfig(groupsize=32, float_target=0.25, hessian_inputs="quantized"), INT4, INT8),
    "awq_gptq": (GPTQConfig(groupsize=32, pre="awq", observer="mse"), INT4, INT8),
    "smoothquant_gptq": (GPTQConfig(groupsize=32, pre="smoothquant"), INT4, INT8),
    "awq": (AWQConfig(groupsize=32, n_grid=5), INT4, FP16),
    "smoothquant": (SmoothQuantConfig(alpha=0.5), INT8, INT8),
    "zeroquant": (ZeroQuantConfig(groupsize=32), INT4, INT8),
}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_quantizes_the_rotated_model(algo):
    model = rotated("llama")
    before = logits(model)
    config, w, a = ALGORITHMS[algo]
    report = quantize_model(model, get_arch("llama"), build_algorithm(config, w, a), samples(8, 32, seed=3), "cpu",
                            batch_size=4, progress=False)
    assert len(report.quantized) == 14
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.online_hadamard, name
    assert rel_error(logits(model), before) < 0.5  # a 4-bit random model: close, not equal


def test_online_linears_are_never_fold_targets():
    """A scale folded into up_proj would act before down_proj's Hadamard: AWQ/SmoothQuant keep s=1 there."""
    model = rotated("llama", RotationConfig("hadamard", online=("down_proj",)))
    arch, block = get_arch("llama"), model.model.layers[0]
    table = plan_schemes(model, arch, build_algorithm(RTNConfig(groupsize=32), INT4, FP16))
    planned = {tuple(g.linears): g for entry in plan_block(block, 0, arch, table, PipelineReport()) for g, _ in entry}
    assert fold_target(block, planned[("mlp.down_proj",)], arch) is None
    assert fold_target(block, planned[("mlp.gate_proj", "mlp.up_proj")], arch) is not None


def test_observers_see_the_transformed_input():
    linear = HadamardLinear.from_linear(nn.Linear(12, 3))

    class Recorder:
        def update(self, x):
            self.x = x

    recorder, x = Recorder(), torch.randn(2, 5, 12)
    handles = _observe({"lin": linear}, {"lin": recorder})
    linear(x)
    for h in handles:
        h.remove()
    assert torch.allclose(recorder.x, (x @ hadamard_matrix(12).float()).reshape(10, 12), atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("w, a", [(INT8, INT8), (INT4, INT4)], ids=["w8a8-fused-hadamard-quantize", "w4a4"])
def test_quant_linear_with_online_hadamard_triton_equals_torch(w, a):
    linear = HadamardLinear.from_linear(nn.Linear(1536, 40, bias=False))
    algorithm = build_algorithm(RTNConfig(groupsize=-1, w_qtype="per_channel"), w, a)
    layer = algorithm._to_quant_linear(linear, None)
    assert isinstance(layer.input_transform, OnlineHadamard)
    x = torch.randn(5, 1536)
    layer.backend = "torch"
    want = layer(x)
    layer.backend = "triton"
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    dense = torch.nn.functional.linear(layer.quantize_input(x @ hadamard_matrix(1536).float()),
                                       layer.dequantized_weight())
    assert torch.allclose(want, dense, atol=1e-4 * float(want.abs().max()))


# ---------------------------------------------------------------- save, load, export


def test_rotated_quantized_model_saves_and_reloads_its_online_transforms(tmp_path):
    model = rotated("qwen2")
    quantize_model(model, get_arch("qwen2"), build_algorithm(RTNConfig(groupsize=32), INT4, INT8), None, "cpu",
                   skip_layers=("lm_head", "model.layers.1.mlp.down_proj"), progress=False)
    assert type(model.model.layers[1].mlp.down_proj) is HadamardLinear  # skipped: float, still transformed
    want = logits(model)
    quantkit.save_quantized(model, None, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["online_hadamard"] is True
    assert manifest["transforms"] == {"model.layers.1.mlp.down_proj": {"online_hadamard": True}}
    loaded = quantkit.load(tmp_path / "m")
    assert type(loaded.model.layers[1].mlp.down_proj) is HadamardLinear
    assert torch.equal(logits(loaded), want)
    # a reader that does not know the float layer's transform finds its tensor and refuses
    del manifest["transforms"]
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unexpected.*input_transform.hadamard_k"):
        quantkit.load(tmp_path / "m")


def test_export_writes_the_online_transforms_as_compressed_tensors_transform_config(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file

    model = build("llama")
    before = logits(model)
    rotate_model(model, get_arch("llama"), RotationConfig("hadamard", heads=True, online=("down_proj", "o_proj")),
                 model.config, samples(1, 16))
    quantize_model(model, get_arch("llama"), build_algorithm(RTNConfig(groupsize=32), INT4, FP16), None, "cpu",
                   progress=False)
    ours = logits(model)
    out = quantkit.export_compressed_tensors(model, None, tmp_path / "ct", torch.float32)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qconfig["transform_config"]["config_groups"]
    assert set(groups) == {"hadamard_64", "hadamard_128"}  # o_proj reads 64, down_proj 128
    assert groups["hadamard_128"]["apply"][0]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    loaded = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rel_error(logits(loaded), ours) > 0.1  # transformers ignores transform_config (documented)
    apply_transform_config(loaded, TransformConfig.model_validate(qconfig["transform_config"]))
    stored = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if "_input.weight" in k}
    assert len(stored) == 4
    assert loaded.load_state_dict(stored, strict=False).unexpected_keys == []
    assert rel_error(logits(loaded), ours) < 1e-5
    assert rel_error(ours, before) < 0.5


def test_export_refuses_an_online_transform_on_a_layer_with_a_bias(tmp_path):
    from quantkit.export import ExportError, compressed_tensors_state

    model = rotated("llama", RotationConfig("hadamard", online=("down_proj",)))
    quantize_model(model, get_arch("llama"), build_algorithm(RTNConfig(groupsize=32), INT4, FP16), None, "cpu",
                   progress=False)
    model.model.layers[0].mlp.down_proj.bias = torch.zeros(64, dtype=torch.float16)
    with pytest.raises(ExportError, match="model.layers.0.mlp.down_proj: an online Hadamard in front of a layer with a bias"):
        compressed_tensors_state(model)


# ---------------------------------------------------------------- inputs, before any weight loads


def _meta(config: object) -> nn.Module:
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def test_inputs_name_the_width_without_a_hadamard_matrix():
    config = tf.LlamaConfig(**{**_COMMON, "hidden_size": 52, "num_attention_heads": 2, "num_key_value_heads": 2,
                               "intermediate_size": 100})
    skeleton = _meta(config)
    arch = get_arch("llama")
    with pytest.raises(ConfigError, match="rotation=hadamard: hidden_size 52: no Hadamard matrix .*use rotation=random"):
        check_inputs(arch, RotationConfig("hadamard"), config, skeleton)
    with pytest.raises(ConfigError, match=r"rotation.online=\[down_proj\]: the input width of down_proj 100"):
        check_inputs(arch, RotationConfig("random", online=("down_proj",)), config, skeleton)
    check_inputs(arch, RotationConfig("random", heads=True), config, skeleton)  # dense: any width
    check_inputs(get_arch("opt"), RotationConfig("none"), tf.OPTConfig(), None)  # inactive: nothing to check
    with pytest.raises(ConfigError, match="rotation=hadamard .*unsupported for the opt layout"):
        check_inputs(get_arch("opt"), RotationConfig("hadamard"), CONFIGS["opt"](), _meta(CONFIGS["opt"]()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="quarot"), "rotation.name='quarot' is not valid; choose one of: none, hadamard, random"),
    (dict(online=("up_proj",)), "rotation.online entry 'up_proj' is not valid; choose from: down_proj, o_proj"),
    (dict(online=("o_proj", "o_proj")), "rotation.online lists o_proj more than once"),
])
def test_bad_rotation_keys_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RotationConfig(**kwargs)


# ---------------------------------------------------------------- runs (the tiny zoo model)

TINY = ["model=tiny-llama", "eval.seq_length=64", "eval.max_windows=3", "num_calibrate=4", "calibrate_seq_length=32"]


@pytest.fixture
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(tmp_path, *overrides: str) -> dict:
    from quantkit import runner
    from quantkit.config import build_run_config
    from tests.test_config import compose_dict

    resolved = compose_dict(*TINY, *overrides, f"output_dir={tmp_path}")
    return runner.run(build_run_config(resolved), resolved)


def test_rotation_alone_keeps_the_float_perplexity(tmp_path, _cache):
    results = _run(tmp_path, "rotation=hadamard", "w_dtype=float16", "eval.baseline=true")
    assert abs(results["perplexity"] / results["baseline_perplexity"] - 1) < 1e-4
    assert results["algo"] == "hadamard+rtn" and results["quantized_layers"] == 0
    rotation = results["rotation"]
    assert rotation["name"] == "hadamard" and rotation["heads"] is True
    assert rotation["online"] == {"down_proj": 2} and rotation["untied_embeddings"] is False
    assert json.loads((tmp_path / "results.json").read_text())["config"]["rotation"]["online"] == ["down_proj"]


def test_rotated_gptq_w4a4_run_saves_a_model_that_reloads_with_its_transforms(tmp_path, _cache):
    results = _run(tmp_path, "rotation=random", "rotation.online=[down_proj,o_proj]", "algo=gptq",
                   "+precision=w4a4", "algo.groupsize=32", "save.enabled=true")
    assert results["algo"] == "random+gptq" and results["a_scheme"] == "int4 token restricted"
    loaded = quantkit.load(results["saved_model_dir"])
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        assert loaded.get_submodule(name).online_hadamard, name


def test_unsupported_rotation_fails_before_the_model_loads(tmp_path, _cache, monkeypatch):
    from quantkit import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(ConfigError, match="rotation is unsupported for the opt layout"):
        _run(tmp_path, "model=tiny-opt", "rotation=hadamard")
    assert not (tmp_path / "results.json").exists()


def test_rotation_preset_sweeps_rotation_precision_and_algorithm():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.test_config import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=rotation"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == {"rotation": "none,hadamard", "+precision": "w8a8,w4a8,w4a4", "algo": "rtn,gptq"}
    for key, values in params.items():
        for value in values.split(","):
            assert (CONF / key.lstrip("+") / f"{value}.yaml").is_file(), (key, value)

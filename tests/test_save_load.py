"""save_quantized / load: bit-identical round trips for every scheme, clear errors for bad folders
(flipped bytes in the data included: per-tensor checksums), format-1 checkpoints, atomic writes,
and stored bytes equal to the theoretical size."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkit
from quantkit import models, runner
from quantkit.algorithms.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from quantkit.algorithms.registry import build_algorithm
from quantkit.algorithms.rtn import RTNConfig
from quantkit.arch import get_arch
from quantkit.config import ConfigError, DTypeConfig, build_run_config
from quantkit.pipeline import quantize_model
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme
from quantkit.serialization import (
    CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, CheckpointError, ClippedGridWarning, UnverifiedCheckpointWarning,
    scheme_from_dict, scheme_to_dict, tensor_checksum,
)
from tests.test_config import compose_dict

FP16 = DTypeConfig("float16")
INT8 = DTypeConfig("int8")
FP8 = DTypeConfig("fp8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Loader of fresh float32 copies (model, tokenizer) of a tiny Llama / OPT built once."""
    root = tmp_path_factory.mktemp("save-models")
    paths = {"llama": models.build_tiny_llama(root / "llama"), "opt": models.build_tiny_opt(root / "opt")}
    return lambda kind="llama": models.load_model(str(paths[kind]), torch.float32)


def samples(n=4, length=24):
    return torch.randint(4, 260, (n, length), generator=torch.Generator().manual_seed(1))


def quantized(tiny, w: DTypeConfig, a: DTypeConfig = FP16, kind: str = "llama", config=None, **rtn):
    """A tiny model quantized by the calibration pipeline (RTN unless ``config`` is given)."""
    model, tok = tiny(kind)
    config = config or RTNConfig(**{"groupsize": 48, **rtn})  # 48: the 64/128-wide layers end in a short group
    algorithm = build_algorithm(config, w, a)
    data = samples() if algorithm.needs_calibration else None
    quantize_model(model, get_arch(model.config.model_type), algorithm, data, "cpu", batch_size=2, progress=False)
    return model, tok


def logits(model, ids=None):
    with torch.no_grad():
        return model(samples(2, 16) if ids is None else ids).logits


def assert_round_trip(model, tok, path):
    expected = logits(model)
    quantkit.save_quantized(model, tok, path, {"test": True})
    loaded = quantkit.load(path)
    assert torch.equal(logits(loaded), expected)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers, "nothing was quantized"
    for name, module in layers.items():
        other = loaded.get_submodule(name)
        assert isinstance(other, QuantLinear)
        assert (other.w_scheme, other.a_scheme, other.a_static) == (module.w_scheme, module.a_scheme, module.a_static)
        assert module.state_dict().keys() == other.state_dict().keys()
        for key, t in module.state_dict().items():
            assert torch.equal(t, other.state_dict()[key]) and t.dtype == other.state_dict()[key].dtype, f"{name}.{key}"
    return loaded


# (has_zero, unsigned, symmetric_range): every grid a run can ask for
INT_VARIANTS = {"sym": (False, False, None), "sym-restricted": (False, False, "restricted"),
                "zero": (True, False, None), "unsigned-zero": (True, True, None)}
# every dtype and every sign/zero variant appears with both granularities (g48: short last group)
INT_CASES = [(d, v, ("per_channel", "g48")[(i + j) % 2]) for i, d in enumerate(("int2", "int3", "int4", "int8"))
             for j, v in enumerate(INT_VARIANTS)]


def _granularity(name: str) -> dict:
    return {"w_qtype": "per_channel", "groupsize": -1} if name == "per_channel" else {"w_qtype": "per_group", "groupsize": 48}


@pytest.mark.parametrize(("dtype", "variant", "granularity"), INT_CASES, ids=["-".join(c) for c in INT_CASES])
def test_integer_weights_round_trip_exactly(tiny, tmp_path, dtype, variant, granularity):
    has_zero, unsigned, symmetric_range = INT_VARIANTS[variant]
    model, tok = quantized(tiny, DTypeConfig(dtype, has_zero, unsigned, symmetric_range), **_granularity(granularity))
    loaded = assert_round_trip(model, tok, tmp_path / "q")
    expected = symmetric_range or "full"  # weights: full unless asked; asymmetric grids carry the default
    assert loaded.model.layers[0].mlp.up_proj.w_scheme.symmetric_range == expected


FLOAT_CASES = [("fp4", "per_channel"), ("fp4", "g48"), ("fp8", "per_channel"), ("fp8", "g48"), ("fp8_e5m2", "g48")]


@pytest.mark.parametrize(("dtype", "granularity"), FLOAT_CASES, ids=["-".join(c) for c in FLOAT_CASES])
def test_float_weights_round_trip_exactly(tiny, tmp_path, dtype, granularity):
    model, tok = quantized(tiny, DTypeConfig(dtype), **_granularity(granularity))
    assert_round_trip(model, tok, tmp_path / "q")


@pytest.mark.parametrize(
    ("w", "a", "a_qtype"),
    [
        (INT8, INT8, "per_tensor"),  # static act_scale, calibrated
        (DTypeConfig("int4", True, True), INT8, "per_token"),  # dynamic: nothing stored for activations
        (FP8, FP8, "per_tensor"),
        (DTypeConfig("int4", True, True), DTypeConfig("int8", True, True), "per_tensor"),
    ],
    ids=["w8a8-static", "w4a8-dynamic", "fp8-static", "w4-a8-unsigned-zero-static"],
)
def test_activation_quantized_layers_round_trip_exactly(tiny, tmp_path, w, a, a_qtype):
    model, tok = quantized(tiny, w, a, a_qtype=a_qtype)
    loaded = assert_round_trip(model, tok, tmp_path / "q")
    q = loaded.model.layers[1].mlp.down_proj
    assert q.a_static == (a_qtype == "per_tensor")
    if q.a_static:
        assert q.act_scale.item() != 1.0  # the calibrated value came back, not the constructor default


@pytest.mark.parametrize("groupsize", [16, -1], ids=["g16-static-groups", "per-channel"])
def test_gptq_actorder_round_trips_exactly(tiny, tmp_path, groupsize):
    config = GPTQConfig(groupsize=groupsize, actorder=True, blocksize=32)
    model, tok = quantized(tiny, DTypeConfig("int4", True, True), config=config)
    assert_round_trip(model, tok, tmp_path / "q")


def test_gptq_actorder_codes_are_in_the_original_column_order():
    """actorder permutes columns only while quantizing: the stored codes line up with W's columns."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=gen) * torch.logspace(-1, 1, 64)[torch.randperm(64, generator=gen)]  # (out, in)
    x = torch.randn(256, 64, generator=gen) * torch.logspace(1, -1, 64)
    H, _ = accumulate_hessian(None, 0, x)
    scheme = QuantScheme("int4", "per_group", 16, has_zero=True, unsigned=True)
    codes, scale, zero, _ = gptq_quantize(W, H, scheme, 16, 0.01, actorder=True, static_groups=True)
    module = QuantLinear(64, 32, False, scheme)
    module.set_weight(codes, scale, zero)
    Wq = module.dequantized_weight()  # (out, in)
    rtn = QuantLinear.from_linear(_linear(W), scheme).dequantized_weight()  # same static group grid
    assert (Wq - W).norm() < 0.3 * W.norm()
    assert (Wq[:, torch.randperm(64, generator=gen)] - W).norm() > 2 * (Wq - W).norm()
    assert (x @ (Wq - W).T).norm() < (x @ (rtn - W).T).norm()  # GPTQ's output error beats RTN's, in W's order


def _linear(W):
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data.copy_(W)
    return linear


def test_tied_embeddings_are_stored_once_and_retied(tiny, tmp_path):
    model, tok = quantized(tiny, DTypeConfig("int4", True, True), kind="opt")
    loaded = assert_round_trip(model, tok, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    assert loaded.lm_head.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()


def test_activation_zero_point_and_output_scheme_round_trip(tiny, tmp_path):
    """Static asymmetric activations store ``act_zero``; an output scheme is a constructor argument."""
    model, tok = quantized(tiny, DTypeConfig("int4", True, True), DTypeConfig("int8", True, True), a_qtype="per_tensor")
    o_scheme = QuantScheme("int8", "per_token")
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            with_out = QuantLinear(m.in_features, m.out_features, m.bias is not None, m.w_scheme, m.a_scheme,
                                   m.a_static, o_scheme=o_scheme)
            with_out.load_state_dict(m.state_dict())
            model.set_submodule(name, with_out)
    assert "act_zero" in model.model.layers[0].mlp.up_proj.state_dict()
    loaded = assert_round_trip(model, tok, tmp_path / "q")
    assert loaded.model.layers[0].mlp.up_proj.o_scheme == o_scheme
    layer = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())["layers"]["model.layers.0.mlp.up_proj"]
    assert layer["o_scheme"] == scheme_to_dict(o_scheme)


class FutureQuantLinear(QuantLinear):
    """QuantLinear as it may grow further: a new constructor argument kept as an attribute, a new buffer."""

    def __init__(self, in_features, out_features, bias, w_scheme, a_scheme=None, a_static=False, device=None,
                 k_scheme=None):
        super().__init__(in_features, out_features, bias, w_scheme, a_scheme, a_static, device)
        self.k_scheme = k_scheme
        self.register_buffer("k_scale", torch.ones(1, 1, device=device) if k_scheme is not None else None)


def test_new_quant_linear_arguments_and_buffers_are_saved_generically(tiny, tmp_path, monkeypatch):
    from quantkit import serialization

    monkeypatch.setattr(serialization, "QuantLinear", FutureQuantLinear)
    model, tok = quantized(tiny, DTypeConfig("int4", True, True), INT8, a_qtype="per_tensor")
    k_scheme = QuantScheme("int8", "per_tensor")
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            future = FutureQuantLinear(m.in_features, m.out_features, m.bias is not None, m.w_scheme, m.a_scheme,
                                       m.a_static, k_scheme=k_scheme)
            future.load_state_dict({**m.state_dict(), "k_scale": torch.full((1, 1), 0.25)})
            model.set_submodule(name, future)
    loaded = assert_round_trip(model, tok, tmp_path / "q")
    q = loaded.model.layers[0].self_attn.k_proj
    assert isinstance(q, FutureQuantLinear) and q.k_scheme == k_scheme and q.k_scale.item() == 0.25
    layer = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())["layers"]["model.layers.0.self_attn.k_proj"]
    assert layer["k_scheme"] == scheme_to_dict(k_scheme) and layer["a_static"] is True


def test_saved_folder_contents_and_manifest(tiny, tmp_path):
    model, tok = quantized(tiny, DTypeConfig("int4", True, True))
    quantkit.save_quantized(model, tok, tmp_path / "q", {"algo": {"name": "rtn"}})
    files = {p.name for p in (tmp_path / "q").iterdir()}
    assert {CONFIG_FILE, WEIGHTS_FILE, "config.json", "tokenizer.json"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "q").iterdir())
    manifest = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 4 and manifest["quantkit_version"] == quantkit.__version__
    assert manifest["run_config"] == {"algo": {"name": "rtn"}}
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["w_scheme"] == {"dtype": "int4", "granularity": "per_group", "groupsize": 48,
                                 "has_zero": True, "unsigned": True, "symmetric_range": "full",
                                 "scale_format": "float16", "block_rows": 1, "clip_ratio": 1.0}
    checksums = manifest["checksums"]
    assert checksums["algorithm"] == "sha256"
    state = model.state_dict()
    assert set(checksums["tensors"]) == set(state) - set(manifest["tied"])  # tied tensors are stored once
    assert checksums["tensors"]["model.layers.0.mlp.down_proj.qweight"] == tensor_checksum(
        model.model.layers[0].mlp.down_proj.qweight)
    assert layer["a_scheme"] is None and layer["a_static"] is False and layer["in_features"] == 128
    assert "quantization_config" not in json.loads((tmp_path / "q" / "config.json").read_text())
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tokenizer("hi").input_ids == tok("hi").input_ids


def test_scheme_dict_round_trip_and_rejects_unknown_fields():
    scheme = QuantScheme("int3", "per_group", 40, has_zero=True, unsigned=True)
    assert scheme_from_dict(scheme_to_dict(scheme)) == scheme
    with pytest.raises(ValueError, match="exactly the fields"):
        scheme_from_dict({**scheme_to_dict(scheme), "bits": 3})


# --- bad folders: clear errors, never a silently wrong model ------------------------------------


@pytest.fixture(scope="module")
def saved_once(tiny, tmp_path_factory):
    model, tok = quantized(tiny, DTypeConfig("int4", True, True))
    return quantkit.save_quantized(model, tok, tmp_path_factory.mktemp("saved") / "q")


@pytest.fixture
def saved(saved_once, tmp_path):
    """A fresh copy of one good checkpoint, for a test to damage."""
    return Path(shutil.copytree(saved_once, tmp_path / "q"))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_newer_format_version_is_refused(saved):
    _edit_json(saved / CONFIG_FILE, lambda d: d.update(format_version=5, quantkit_version="9.0"))
    with pytest.raises(CheckpointError, match=r"format version 5 .*reads versions up to 4: upgrade quantkit"):
        quantkit.load(saved)


def _tensor_spans(file: Path) -> dict[str, tuple[int, int]]:
    """``name -> (first byte, end)`` of every tensor's data in a safetensors file (absolute offsets)."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.o_proj.qweight", "model.layers.0.mlp.down_proj.scales",
                                    "model.norm.weight"])
def test_a_flipped_byte_in_the_data_names_the_tensor(saved, tensor, where):
    """One changed byte inside a tensor's data (the header stays intact, so safetensors reads it
    happily): the checksum names the tensor, no model comes back."""
    file = saved / WEIGHTS_FILE
    start, end = _tensor_spans(file)[tensor]
    offset = {"first": start, "middle": (start + end) // 2, "last": end - 1}[where]
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: tensor '{tensor}' does not match its sha256 checksum"):
        quantkit.load(saved)


def test_every_data_byte_is_covered_by_a_checksum(saved):
    """The tensors' data spans tile the data section: no byte after the header is unchecked."""
    file = saved / WEIGHTS_FILE
    spans = sorted(_tensor_spans(file).values())
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    assert spans[0][0] == 8 + n and spans[-1][1] == file.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    manifest = json.loads((saved / CONFIG_FILE).read_text())
    assert set(manifest["checksums"]["tensors"]) == set(_tensor_spans(file))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("checksums"), "no sha256 tensor checksums"),
    (lambda d: d["checksums"].update(algorithm="md5"), "no sha256 tensor checksums"),
    (lambda d: d["checksums"]["tensors"].pop("model.norm.weight"), r"tensors without a checksum \['model.norm.weight'\]"),
    (lambda d: d["checksums"]["tensors"].update(extra="00"), r"checksummed tensors missing from the file \['extra'\]"),
], ids=["missing", "other-algorithm", "unlisted-tensor", "absent-tensor"])
def test_format_2_manifest_without_matching_checksums_is_refused(saved, edit, message):
    _edit_json(saved / CONFIG_FILE, edit)
    with pytest.raises(CheckpointError, match=message):
        quantkit.load(saved)


def _as_format_3(path: Path) -> None:
    """What quantkit wrote before format 4: no clip_ratio in the schemes."""
    def edit(d):
        d["format_version"] = 3
        for layer in d["layers"].values():
            for value in layer.values():
                if isinstance(value, dict):
                    value.pop("clip_ratio")
    _edit_json(path / CONFIG_FILE, edit)


def _as_format_2(path: Path) -> None:
    """What quantkit wrote before format 3: no scale_format and block_rows in the schemes."""
    _as_format_3(path)

    def edit(d):
        d["format_version"] = 2
        for layer in d["layers"].values():
            for value in layer.values():
                if isinstance(value, dict):
                    value.pop("scale_format")
                    value.pop("block_rows")
    _edit_json(path / CONFIG_FILE, edit)


def _as_format_1(path: Path) -> None:
    """What quantkit wrote before format 2: no checksums, no symmetric_range in the schemes."""
    _as_format_2(path)

    def edit(d):
        d["format_version"] = 1
        d.pop("checksums")
        for layer in d["layers"].values():
            for value in layer.values():
                if isinstance(value, dict):
                    value.pop("symmetric_range")
    _edit_json(path / CONFIG_FILE, edit)


def test_format_3_checkpoint_loads_unclipped(tiny, tmp_path):
    model, tok = quantized(tiny, DTypeConfig("int4"), DTypeConfig("int8"))
    expected = logits(model)
    quantkit.save_quantized(model, tok, tmp_path / "q")
    _as_format_3(tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = quantkit.load(tmp_path / "q")
    assert loaded.model.layers[0].self_attn.q_proj.a_scheme.clip_ratio == 1.0
    assert torch.equal(logits(loaded), expected)


def test_clipped_activations_save_and_load(tiny, tmp_path):
    """A clip ratio is part of the activation scheme: the reloaded model computes the same."""
    model, tok = quantized(tiny, DTypeConfig("int4"), DTypeConfig("int4", clip_ratio=0.9))
    expected = logits(model)
    quantkit.save_quantized(model, tok, tmp_path / "q")
    loaded = quantkit.load(tmp_path / "q")
    assert loaded.model.layers[0].self_attn.q_proj.a_scheme.clip_ratio == 0.9
    assert torch.equal(logits(loaded), expected)


def test_format_2_checkpoint_loads_with_float16_scales(saved):
    expected = logits(quantkit.load(saved))
    _as_format_2(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = quantkit.load(saved)
    assert loaded.model.layers[0].mlp.up_proj.w_scheme.scale_format == "float16"
    assert torch.equal(logits(loaded), expected)


def test_format_1_checkpoint_loads_restricted_and_unverified_with_a_warning(tiny, tmp_path):
    """Format 1 knew only the restricted symmetric grid: its symmetric schemes load as restricted
    (dynamic activation scales computed at run time follow it) and its tensors load unverified."""
    restricted = DTypeConfig("int4", symmetric_range="restricted")
    model, tok = quantized(tiny, restricted, DTypeConfig("int8", symmetric_range="restricted"))
    expected = logits(model)
    quantkit.save_quantized(model, tok, tmp_path / "q")
    _as_format_1(tmp_path / "q")
    with pytest.warns(UnverifiedCheckpointWarning, match="format 1 checkpoint without checksums"):
        loaded = quantkit.load(tmp_path / "q")
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.w_scheme.symmetric_range == q.a_scheme.symmetric_range == "restricted"
    assert torch.equal(logits(loaded), expected)


def test_format_1_asymmetric_schemes_load_as_before(saved):
    _as_format_1(saved)
    with pytest.warns(UnverifiedCheckpointWarning):
        loaded = quantkit.load(saved)
    assert loaded.model.layers[0].mlp.up_proj.w_scheme == QuantScheme("int4", "per_group", 48, has_zero=True,
                                                                       unsigned=True)


def test_current_checkpoint_loads_without_warnings(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantkit.load(saved)


def test_unsigned_grid_without_zero_point_loads_with_a_warning(tiny, tmp_path):
    """Runs refuse this grid (it clips every negative weight to 0); a checkpoint that holds one,
    made by the library directly or by an older quantkit, loads as saved but says so."""
    model, tok = tiny()
    clipping = QuantScheme("int4", "per_channel", unsigned=True)
    model.model.layers[0].mlp.up_proj = QuantLinear.from_linear(model.model.layers[0].mlp.up_proj, clipping)
    quantkit.save_quantized(model, tok, tmp_path / "q")
    with pytest.warns(ClippedGridWarning, match=r"layer 'model.layers.0.mlp.up_proj' w_scheme is int4 channel unsigned"):
        loaded = quantkit.load(tmp_path / "q")
    assert loaded.model.layers[0].mlp.up_proj.w_scheme == clipping


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_names_the_file(saved, damage):
    file = saved / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} is not a readable safetensors file"):
        quantkit.load(saved)


def test_scheme_that_does_not_match_the_tensors_names_the_tensor(saved):
    def edit(d):
        d["layers"]["model.layers.0.mlp.down_proj"]["w_scheme"]["groupsize"] = 32
    _edit_json(saved / CONFIG_FILE, edit)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.scales' is torch.float16 \(64, 3\)"):
        quantkit.load(saved)


def test_model_config_that_does_not_match_the_tensors_names_the_tensor(saved):
    _edit_json(saved / "config.json", lambda d: d.update(vocab_size=300))
    with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' is torch.float32 \(260, 64\) but the config describes torch.float32 \(300, 64\)"):
        quantkit.load(saved)


def test_model_config_that_does_not_match_a_quantized_layer_names_it(saved):
    _edit_json(saved / "config.json", lambda d: d.update(intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"layer 'model.layers.0.mlp.gate_proj' is 64 -> 128 but config.json builds Linear 64 -> 96"):
        quantkit.load(saved)


def test_unlisted_quantized_layer_is_an_error(saved):
    _edit_json(saved / CONFIG_FILE, lambda d: d["layers"].pop("model.layers.1.self_attn.q_proj"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.q_proj.weight'\]"):
        quantkit.load(saved)


def test_invalid_scheme_in_manifest_names_the_layer(saved):
    def edit(d):
        d["layers"]["model.layers.0.self_attn.q_proj"]["w_scheme"]["dtype"] = "int5"
    _edit_json(saved / CONFIG_FILE, edit)
    with pytest.raises(CheckpointError, match=r"layer 'model.layers.0.self_attn.q_proj' cannot be rebuilt: unknown quantization dtype 'int5'"):
        quantkit.load(saved)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, "config.json"])
def test_missing_file_names_it(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name} not found"):
        quantkit.load(saved)


def test_missing_folder_and_garbage_manifest(saved, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        quantkit.load(tmp_path / "nowhere")
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is not valid JSON"):
        quantkit.load(saved)


# --- atomic writes -------------------------------------------------------------------------------


def test_failed_save_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    model, tok = quantized(tiny, DTypeConfig("int4", True, True))
    expected = logits(model)
    quantkit.save_quantized(model, tok, tmp_path / "q")
    before = (tmp_path / "q" / WEIGHTS_FILE).read_bytes()
    other, _ = quantized(tiny, DTypeConfig("int8"))

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        quantkit.save_quantized(other, tok, tmp_path / "q")
    with pytest.raises(OSError, match="disk full"):
        quantkit.save_quantized(other, tok, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial dirs left behind
    assert (tmp_path / "q" / WEIGHTS_FILE).read_bytes() == before  # the previous save is intact
    assert torch.equal(logits(quantkit.load(tmp_path / "q")), expected)


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tiny, tmp_path):
    model, tok = quantized(tiny, DTypeConfig("int4", True, True))
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        quantkit.save_quantized(model, tok, tmp_path / "q")
    assert (tmp_path / "q" / "notes.txt").read_text() == "mine"


# --- size on disk --------------------------------------------------------------------------------


def _theoretical_bytes(model) -> int:
    """Codes at their bit width + fp16 scales + packed zeros + fp16 bias and unquantized params."""
    total, quant = 0, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            quant[name] = m
            rows, groups = m.scales.shape
            bits = m.w_scheme.bits
            total += m.out_features * m.in_features * bits // 8  # in_features % 8 == 0 here: no run padding
            total += rows * groups * 2
            if m.qzeros is not None:
                total += rows * -(-groups // 8) * bits  # zeros pack in runs of 8
            total += (m.out_features * 2 if m.bias is not None else 0) + (4 if m.act_scale is not None else 0)
    total += sum(p.numel() * 2 for p in model.parameters())  # parameters(): tied tensors once
    return total


@pytest.mark.parametrize(
    ("w", "a", "rtn"),
    [(DTypeConfig("int4", True, True), FP16, {}), (DTypeConfig("int3"), FP16, {"groupsize": -1, "w_qtype": "per_channel"}),
     (INT8, INT8, {"a_qtype": "per_tensor", "groupsize": -1, "w_qtype": "per_channel"})],
    ids=["int4-g48-asym", "int3-channel", "w8a8-static"],
)
def test_weights_file_size_is_the_theoretical_size_plus_header(tiny, tmp_path, w, a, rtn):
    model, tok = quantized(tiny, w, a, **rtn)
    quantkit.save_quantized(model, tok, tmp_path / "q", float_dtype=torch.float16)
    file = tmp_path / "q" / WEIGHTS_FILE
    (header,) = struct.unpack("<Q", file.read_bytes()[:8])  # safetensors: u64 header length, JSON, data
    n_tensors = len(json.loads(file.read_bytes()[8:8 + header])) - 1  # minus __metadata__
    assert file.stat().st_size == 8 + header + _theoretical_bytes(model)
    assert header < 160 * n_tensors + 200  # the header is small: names, dtypes, shapes, offsets
    loaded = quantkit.load(tmp_path / "q")
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.qweight, model.model.layers[0].mlp.up_proj.qweight)


# --- the run's save config -----------------------------------------------------------------------

TINY = ["model=tiny-llama", "eval.seq_length=32", "eval.max_windows=2", "num_calibrate=2", "calibrate_seq_length=16"]


@pytest.fixture
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_run_saves_the_model_and_records_its_size(tmp_path, _cache):
    resolved = compose_dict(*TINY, "algo.groupsize=32", "save.enabled=true", f"output_dir={tmp_path}")
    results = runner.run(build_run_config(resolved), resolved)
    saved = tmp_path / "model"
    assert results["saved_model_dir"] == str(saved) and results["saved_format"] == "quantkit"
    assert results["saved_bytes"] == (saved / WEIGHTS_FILE).stat().st_size
    assert results["saved_bytes"] < results["model_bytes_before"] and 0 < results["saved_size_ratio"] < 1
    assert results["saved_bits_per_weight"] == pytest.approx(8 * results["saved_bytes"] / sum(
        p.numel() for p in models.load_model("tiny-llama", torch.float32)[0].parameters()))
    manifest = json.loads((saved / CONFIG_FILE).read_text())
    assert manifest["run_config"]["algo"]["groupsize"] == 32 and manifest["float_dtype"] == "float16"
    assert json.loads((tmp_path / "results.json").read_text())["saved_bytes"] == results["saved_bytes"]
    loaded = quantkit.load(saved)
    assert torch.isfinite(logits(loaded)).all()


def test_run_exports_compressed_tensors(tmp_path, _cache):
    resolved = compose_dict(*TINY, "algo.groupsize=32", "w_dtype.has_zero=false", "w_dtype.unsigned=false",
                            "save.enabled=true", "save.format=compressed-tensors", f"output_dir={tmp_path}")
    results = runner.run(build_run_config(resolved), resolved)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and results["saved_format"] == "compressed-tensors"
    assert results["saved_bytes"] == (tmp_path / "model" / "model.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["w_dtype=int3"], "save.format=compressed-tensors: compressed-tensors cannot express weights int3 g32"),
        (["algo.groupsize=48"], "groupsize 48 does not divide the input dim 64"),
        (["w_dtype=float16"], "nothing is quantized"),
    ],
)
def test_unexportable_scheme_fails_before_the_model_loads(tmp_path, _cache, monkeypatch, overrides, message):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    resolved = compose_dict(*TINY, "algo.groupsize=32", "save.enabled=true", "save.format=compressed-tensors",
                            *overrides, f"output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=message):
        runner.run(build_run_config(resolved), resolved)
    assert not (tmp_path / "results.json").exists()



def test_per_layer_schemes_round_trip(tiny, tmp_path):
    """A model whose linears have different schemes (``layers`` rules) reloads layer by layer:
    each QuantLinear with its own scheme, a rule-skipped linear as a float nn.Linear."""
    from quantkit.config import LayerRule

    model, tok = tiny()
    rules = (LayerRule(match="down_proj", w_dtype=INT8, groupsize=-1),
             LayerRule(match="q_proj", w_dtype=DTypeConfig("int3", True, True), groupsize=32),
             LayerRule(match="k_proj", a_dtype=INT8), LayerRule(match="model.layers.1.self_attn.o_proj", skip=True))
    algorithm = build_algorithm(RTNConfig(groupsize=48), DTypeConfig("int4", True, True), FP16)
    report = quantize_model(model, get_arch("llama"), algorithm, None, "cpu", progress=False, layers=rules)
    loaded = assert_round_trip(model, tok, tmp_path / "mixed")
    schemes = {n: m.w_scheme.describe() for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert schemes == {n: s.w.describe() for n, s in report.schemes.quantized().items()}
    assert set(schemes.values()) == {"int8 channel", "int3 g32 asym unsigned", "int4 g48 asym unsigned"}
    assert loaded.model.layers[0].self_attn.k_proj.a_scheme.describe() == "int8 token restricted"
    assert type(loaded.model.layers[1].self_attn.o_proj) is nn.Linear

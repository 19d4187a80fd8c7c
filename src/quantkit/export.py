"""Export to the compressed-tensors format (written by llm-compressor, read by vLLM and by
transformers through the ``compressed-tensors`` package).

What each quantkit scheme becomes (``W`` the weight ``(out, in)``, ``b`` its bits):

==========================  ================  ==============================================
quantkit                    format            tensors of a layer ``<name>.``
==========================  ================  ==============================================
int4/int8 weights only,     pack-quantized    ``weight_packed`` int32 ``(out, ceil(in*b/32))``,
per_channel or per_group                      ``weight_scale (out, G)``, ``weight_shape``
(groupsize divides ``in``)                    int64 ``[out, in]``, asymmetric grids also
                                              ``weight_zero_point`` int32 ``(ceil(out*b/32), G)``
int8 weights (symmetric,    int-quantized     ``weight`` int8 ``(out, in)``, ``weight_scale
per_channel) + int8                           (out, 1)``, static: ``input_scale (1,)``
activations (symmetric)
fp8 weights (per_channel),  float-quantized   ``weight`` float8_e4m3fn, ``weight_scale (out, 1)``,
optionally fp8 activations                    static: ``input_scale (1,)``
fp8_block (128x128 blocks,  float-quantized   ``weight`` float8_e4m3fn, ``weight_scale`` float32
float32 scales), optionally (strategy block)  ``(ceil(out/128), ceil(in/128))``
fp8 1x128 activations
mxfp4 (e8m0, groups of 32), mxfp4-pack-       ``weight_packed`` uint8 ``(out, in / 2)`` (two e2m1
optionally mxfp4            quantized         codes a byte, low nibble first: quantkit's own
activations                                   packing), ``weight_scale`` uint8 e8m0 ``(out, in / 32)``
nvfp4 (e4m3 groups of 16    nvfp4-pack-       ``weight_packed`` as mxfp4, ``weight_scale``
+ fp32), weights only       quantized         float8_e4m3fn ``(out, in / 16)``,
                                              ``weight_global_scale`` float32 ``(1,)``
mxfp6_e2m3 weights only     mxfp6-pack-       ``weight_packed`` uint8 ``(out, 3 in / 4)`` (four codes
                            quantized         in three bytes: quantkit's packing), ``weight_scale``
mxfp8, optionally mxfp8     mxfp8-quantized   ``weight`` float8_e4m3fn, ``weight_scale`` uint8 e8m0
activations
==========================  ================  ==============================================

The block formats are written exactly as stored (codes, e8m0 exponents, e4m3 bits, the fp32
per-tensor scale ``g``: compressed-tensors decodes an nvfp4 scale as ``value / g`` like quantkit),
so they decompress to quantkit's weights bit for bit. Their dynamic activation scales are again
the runtime's: compressed-tensors rounds an MX block's maximum to the nearest power of two before
taking its exponent (quantkit follows the OCP spec's floor), and its NVFP4 activations take a
static calibrated per-tensor scale, which quantkit's dynamic nvfp4 activations do not have (those
are refused). mxfp6_e3m2 (compressed-tensors' fp6 is e2m3), MX scales on other group sizes, e4m3
scales other than nvfp4's and fp4/fp6 with float scales have no format there.

compressed-tensors integer grids are always the signed ``[-2^(b-1), 2^(b-1) - 1]`` with
``x = (q - z) * s``; packed values carry a ``+2^(b-1)`` offset. quantkit's unsigned codes
``u`` (with zero ``z_u``, or none) become ``q = u - 2^(b-1)`` and ``z = z_u - 2^(b-1)`` (or
``-2^(b-1)``), so ``q - z`` and the dequantized weight are unchanged: writing unsigned codes
as if they were signed is the "corrupted signed weights" bug this module exists to avoid.
Scales are written as computed, so the export dequantizes to exactly quantkit's weights: the
default full symmetric grid (``amax / (qmax + 1/2)``) is compressed-tensors' own (its
``calculate_qparams`` gives the same scales, its ``quantize`` the same codes), and a
``symmetric_range=restricted`` grid exports too (its codes simply never reach ``-2^(b-1)``).
Dynamic activation scales are not stored: the runtime computes them (compressed-tensors:
``amax / 127.5``, the full grid; vLLM's int8 kernels: ``amax / 127``, the restricted grid that
quantkit's activations use by default).
Schemes without an equivalent (int2/int3, fp4, fp8_e5m2, a short last group, per_tensor
weights, asymmetric or unsigned activations, output quantization, any QuantLinear buffer or
argument this module does not know) raise :class:`ExportError` naming the scheme.

Per-layer schemes (``layers`` rules): one config group per distinct scheme, its ``targets`` the
full names of its layers (one group for the whole model targets ``Linear``). Layers of different
formats (e.g. W4A16 pack-quantized and W8A8 int-quantized) make the ``mixed-precision`` format,
each group stating its own ``format``. (vLLM fuses q/k/v and gate/up into one matmul: there
those must share a scheme; transformers loads any mix.)

Rotated models (:mod:`quantkit.rotation`): the offline rotation is in the weights. An online
Hadamard in front of a layer's input (``online_hadamard``) is compressed-tensors' transform
``x -> (x @ W) / sqrt(n)`` at ``location: input`` (``TransformScheme``, in
``quantization_config.transform_config``): one config group per width ``n``, its ``targets`` the
layers, and per layer the +-1 matrix ``W = A_K kron H_P`` as ``<layer>.<group>_input.weight
(n, n)``, applied before the activation quantization as in quantkit. ``type`` is ``hadamard``
for powers of two (Sylvester's matrix: vLLM's hadacore kernel computes it without reading the
weight) and ``random-hadamard`` otherwise (with ``randomize: false``: vLLM and compressed-
tensors then multiply by the stored weight). vLLM applies it (not with tensor parallelism, and
only to layers without a bias: others are refused); transformers 5 ignores ``transform_config``
when loading, so such an export computes the rotated function only in vLLM or after
compressed-tensors' ``apply_transform_config``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.hadamard import HadamardLinear, input_transform, is_power_of_two
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme
from quantkit.serialization import atomic_dir, layer_to_dict, state_tensors

PACK_BITS = (4, 8)
_WORD_BITS = 32
# QuantLinear buffers and constructor arguments this exporter translates; any other buffer, or
# argument with a value (e.g. an output scheme), has no equivalent here and is an error
_KNOWN_BUFFERS = {"qweight", "scales", "qzeros", "bias", "act_scale", "global_scale",
                  "input_transform.hadamard_k"}
# block formats: (element dtype, scale format, group) -> compressed-tensors format
_BLOCK_FORMATS = {
    ("fp4", "e8m0", 32): "mxfp4-pack-quantized",
    ("fp4", "e4m3", 16): "nvfp4-pack-quantized",
    ("fp6_e2m3", "e8m0", 32): "mxfp6-pack-quantized",
    ("fp8", "e8m0", 32): "mxfp8-quantized",
}
# activations each block format exports with (besides none): same element grid and groups
_BLOCK_ACTIVATIONS = {"mxfp4-pack-quantized": ("fp4", "e8m0", 32), "mxfp8-quantized": ("fp8", "e8m0", 32)}
_KNOWN_ARGS = {"in_features", "out_features", "bias", "w_scheme", "a_scheme", "a_static", "online_hadamard"}


class ExportError(ValueError):
    """A model or scheme that the compressed-tensors format cannot express."""


def export_format(w: QuantScheme | None, a: QuantScheme | None, a_static: bool = False,
                  in_features: Iterable[int] = (), o: QuantScheme | None = None) -> str:
    """The compressed-tensors format for these schemes; raise :class:`ExportError` if none.

    ``in_features`` are the input widths of the layers (a group must divide each of them);
    ``o`` is an output scheme (none can be exported).
    """
    def fail(why: str) -> ExportError:
        act = f" / act {a.describe()}{' static' if a_static else ''}" if a else ""
        return ExportError(f"compressed-tensors cannot express weights {w.describe() if w else 'float16'}{act}: {why}")

    if w is None:
        raise fail("nothing is quantized")
    if o is not None:
        raise fail(f"output quantization ({o.describe()}) is not exported")
    if a is not None and a.clip_ratio != 1.0:
        raise fail(f"activation clip_ratio={a.clip_ratio} has no equivalent (its quantization args hold no clip "
                   "ratio: a runtime would compute unclipped scales); save with quantkit.save_quantized instead")
    if w.granularity not in ("per_channel", "per_group"):
        raise fail("weights must be per_channel or per_group")
    if w.block_rows > 1:
        return _block_format(w, a, a_static, fail)
    for cols in in_features:
        if w.granularity == "per_group" and cols % w.groupsize:
            raise fail(f"groupsize {w.groupsize} does not divide the input dim {cols} "
                       "(no short last group in this format)")
    if w.scale_format in ("e8m0", "e4m3"):
        return _mx_format(w, a, a_static, fail)
    if w.scale_format != "float16":
        raise fail(f"{w.scale_format} scales have no compressed-tensors format (float16 scales only)")
    if w.dtype.name == "fp8":
        if w.granularity != "per_channel":
            raise fail("fp8 weights must be per_channel")
        if a is not None and a.dtype.name != "fp8":
            raise fail("fp8 weights export with fp8 activations or none")
        return "float-quantized" + _check_activation(a, a_static, fail)
    if not w.dtype.is_int or w.bits not in PACK_BITS:
        raise fail(f"weights must be int4, int8 or fp8 (e4m3); {w.dtype.name} has no equivalent")
    if a is None:
        return "pack-quantized"
    if a.dtype.name != "int8" or w.bits != 8 or w.has_zero or w.unsigned or w.granularity != "per_channel":
        raise fail("activation quantization exports as W8A8 only: symmetric signed int8 per_channel "
                   "weights, int8 activations")
    return "int-quantized" + _check_activation(a, a_static, fail)


def _mx_format(w: QuantScheme, a: QuantScheme | None, a_static: bool, fail: Any) -> str:
    """The MX / NVFP4 formats (groups along the input dim with e8m0 or e4m3 scales)."""
    key = (w.dtype.element_name, w.scale_format, w.groupsize if w.granularity == "per_group" else -1)
    fmt = _BLOCK_FORMATS.get(key)
    if fmt is None:
        raise fail("block-scaled weights export as mxfp4 / mxfp6_e2m3 / mxfp8 (e8m0 scales, groups of 32) or "
                   "nvfp4 (e4m3 scales, groups of 16); this element grid, scale format and group have none")
    if a is None:
        return fmt
    if _BLOCK_ACTIVATIONS.get(fmt) != (a.dtype.element_name, a.scale_format, a.groupsize):
        expected = _BLOCK_ACTIVATIONS.get(fmt)
        allowed = (f"none or {expected[0]} with {expected[1]} scales in groups of {expected[2]}" if expected
                   else "none (weight-only)")
        raise fail(f"activations with {fmt} weights must be {allowed}"
                   + ("; nvfp4 activations would need a static calibrated per-tensor scale" if "nvfp4" in fmt else ""))
    if a_static or a.granularity != "per_group":
        raise fail("block-scaled activations are dynamic, per group of a token")
    return fmt


def _block_format(w: QuantScheme, a: QuantScheme | None, a_static: bool, fail: Any) -> str:
    """fp8 in 2-D weight blocks (compressed-tensors' block strategy), optionally with fp8
    activations in dynamic 1 x N groups."""
    if w.dtype.element_name != "fp8" or w.scale_format not in ("float32", "float16"):
        raise fail("2-D weight blocks export as fp8 e4m3 with float scales only")
    if a is None:
        return "float-quantized"
    if (a.dtype.element_name != "fp8" or a_static or a.granularity != "per_group"
            or a.scale_format not in ("float32", "float16")):
        raise fail("activations with fp8 block weights must be none or fp8 in dynamic 1 x N groups")
    return "float-quantized"


def _check_activation(a: QuantScheme | None, a_static: bool, fail: Any) -> str:
    if a is not None and (a.has_zero or a.unsigned):
        raise fail("activations must be symmetric and signed")
    if a is not None and a.granularity != ("per_tensor" if a_static else "per_token"):
        raise fail("activations must be static per_tensor or dynamic per_token")
    return ""


def _args(scheme: QuantScheme, symmetric: bool, **extra: Any) -> dict[str, Any]:
    """QuantizationArgs of compressed-tensors as JSON (block formats: their strategy, block
    structure and scale dtype)."""
    strategy = {"per_channel": "channel", "per_group": "group", "per_token": "token", "per_tensor": "tensor"}
    args = {
        "num_bits": scheme.bits, "type": "int" if scheme.dtype.is_int else "float", "symmetric": symmetric,
        "group_size": scheme.groupsize if scheme.granularity == "per_group" else None,
        "strategy": strategy[scheme.granularity], "block_structure": None, "dynamic": False,
        "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }
    if scheme.block_rows > 1:
        args.update(strategy="block", group_size=None, block_structure=[scheme.block_rows, scheme.groupsize])
    if scheme.scale_format == "e8m0":
        args.update(scale_dtype="torch.uint8", zp_dtype="torch.uint8")
    elif scheme.scale_format == "e4m3":
        args.update(strategy="tensor_group", scale_dtype="torch.float8_e4m3fn", zp_dtype="torch.float8_e4m3fn")
    return {**args, **extra}


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``q (rows, cols)`` -> int32 ``(rows, ceil(cols*bits/32))``: value ``j`` of a row
    (offset by ``+2^(bits-1)``) at bits ``[j*bits, (j+1)*bits)`` of the row's little-endian bit stream."""
    per_word = _WORD_BITS // bits
    rows, cols = q.shape
    words = -(-cols // per_word)
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    u = torch.nn.functional.pad(u, (0, words * per_word - cols)).reshape(rows, words, per_word)
    shifts = torch.arange(per_word, device=q.device) * bits
    word = (u << shifts).sum(dim=-1)  # (rows, words) int64 in [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _signed(
    codes: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """quantkit codes/zeros -> compressed-tensors signed codes/zeros with the same ``q - z``."""
    shift = -(1 << (scheme.bits - 1)) - scheme.qmin  # 0 for signed grids, -2^(b-1) for unsigned
    q = codes.to(torch.int32) + shift
    if zero is None and shift == 0:
        return q, None
    z = (zero if zero is not None else torch.zeros_like(q[:, :1])) + shift
    return q, z


def _layer_tensors(module: QuantLinear, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compressed-tensors tensors of one layer (local names) and its scheme as JSON."""
    w, a = module.w_scheme, module.a_scheme
    codes, zero = module.weight_codes(), module.zeros()  # (out, in), (out, G) | None
    out: dict[str, torch.Tensor] = {"weight_scale": module.scales.clone()}
    if fmt.endswith("-pack-quantized") and fmt != "pack-quantized":  # mxfp4 / nvfp4 / mxfp6: our packing
        nbytes = module.in_features * w.bits // 8  # theirs has no padding to runs of 8 codes
        out["weight_packed"] = module.qweight[:, :nbytes].clone()
        if w.scale_format == "e4m3":
            out["weight_scale"] = module.scales.view(torch.float8_e4m3fn).clone()
            out["weight_global_scale"] = module.global_scale.reshape(1).clone()
        weights = _args(w, symmetric=True)
    elif fmt == "pack-quantized":
        q, z = _signed(codes, zero, w)
        out["weight_packed"] = pack_int32(q, w.bits)
        out["weight_shape"] = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
        if z is not None:
            z = z.expand(module.out_features, module.scales.shape[1])
            out["weight_zero_point"] = pack_int32(z.t(), w.bits).t().contiguous()
        weights = _args(w, symmetric=z is None)
    elif w.dtype.is_int:
        out["weight"] = codes.to(torch.int8)
        weights = _args(w, symmetric=True)
    else:
        out["weight"] = codes.view(w.dtype.torch_dtype)
        weights = _args(w, symmetric=True)
    if module.act_scale is not None:
        out["input_scale"] = module.act_scale.reshape(1).float().clone()
    inputs = None
    if a is not None:  # dynamic scales need no observer
        inputs = _args(a, symmetric=True, dynamic=not module.a_static, observer="minmax" if module.a_static else None)
        if inputs["strategy"] == "tensor_group":  # never exported (nvfp4 activations are refused)
            raise ExportError(f"{a.describe()} activations have no compressed-tensors equivalent")
    return out, {"weights": weights, "input_activations": inputs, "output_activations": None}


def _quant_layers(model: nn.Module) -> dict[str, tuple[QuantLinear, str]]:
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        extra = sorted(set(m.state_dict()) - _KNOWN_BUFFERS)
        extra += sorted(k for k, v in layer_to_dict(m).items() if k not in _KNOWN_ARGS and v not in (None, False))
        try:
            if extra:
                raise ExportError(f"no compressed-tensors equivalent for {', '.join(extra)}")
            fmt = export_format(m.w_scheme, m.a_scheme, m.a_static, (m.in_features,))
        except ExportError as exc:
            raise ExportError(f"layer {name}: {exc}") from None
        layers[name] = (m, fmt)
    if not layers:
        raise ExportError("the model has no quantized layers to export")
    return layers


def compressed_tensors_state(
    model: nn.Module, float_dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors in compressed-tensors layout and the ``quantization_config`` for config.json."""
    layers = _quant_layers(model)
    formats = {fmt for _, fmt in layers.values()}
    mixed = len(formats) > 1
    tensors, _aliases = state_tensors(model, float_dtype)  # tied aliases are re-tied by the loader
    groups: dict[str, dict[str, Any]] = {}
    for name, (module, fmt) in layers.items():
        for key in module.state_dict():
            tensors.pop(f"{name}.{key}", None)
        layer, scheme = _layer_tensors(module, fmt)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in layer.items()})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.to(float_dtype or module.bias.dtype).clone()
        if mixed:  # "mixed-precision": each group names its own format
            scheme["format"] = fmt
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(name)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(groups) == 1:  # the usual case: one scheme for all linears, the rest listed as ignored
        next(iter(groups.values()))["targets"] = ["Linear"]
    config = {
        "quant_method": "compressed-tensors", "format": "mixed-precision" if mixed else formats.pop(),
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
    }
    transforms = _online_transforms(model, tensors, float_dtype)
    if transforms:
        config["transform_config"] = transforms
    return tensors, config


def _online_transforms(model: nn.Module, tensors: dict[str, torch.Tensor],
                       float_dtype: torch.dtype | None) -> dict[str, Any] | None:
    """The ``transform_config`` of the online Hadamards (see the module doc); replaces each
    layer's ``input_transform.hadamard_k`` in ``tensors`` by its ``<group>_input.weight``."""
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        transform = input_transform(module)
        if transform is None or not isinstance(module, (QuantLinear, HadamardLinear)):
            continue
        if module.bias is not None:
            raise ExportError(f"layer {name}: an online Hadamard in front of a layer with a bias has no "
                              "compressed-tensors runtime (vLLM applies input transforms to bias-free layers only)")
        n = transform.size
        group = f"hadamard_{n}"
        tensors.pop(f"{name}.input_transform.hadamard_k", None)
        tensors[f"{name}.{group}_input.weight"] = transform.matrix().to(float_dtype or torch.float32).contiguous()
        scheme = groups.setdefault(group, {
            "type": "hadamard" if is_power_of_two(n) else "random-hadamard",
            "apply": [{"targets": [], "location": "input", "inverse": False, "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": None, "precision": "float32",
        })
        scheme["apply"][0]["targets"].append(name)
    return {"config_groups": groups} if groups else None


def export_compressed_tensors(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike,
                              float_dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint (``model.safetensors``, ``config.json``
    with ``quantization_config``, tokenizer) into ``out_dir``, atomically. Unquantized tensors are
    cast to ``float_dtype`` (None: as in memory). Returns ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors, qconfig = compressed_tensors_state(model, float_dtype)
    with atomic_dir(out_dir, "config.json") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = qconfig
        if float_dtype is not None:
            config["dtype"] = str(float_dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir

"""Architecture knowledge as data: where the decoder blocks live and how linears are grouped.

One :class:`ArchSpec` per Hugging Face ``model_type``. Inside a block, linears come in
:class:`LinearGroup` s in dataflow order; the linears of a group read the same input, and
``prev`` names the module that produces that input (a norm or a linear) where a per-channel
scale can be folded into it exactly (used by AWQ and SmoothQuant). Adding an architecture
is adding a row to :data:`ARCHS`.

A row is a claim about a model, and a wrong claim would fold scales into the wrong place
without any error (a Gemma norm computes ``normalize(x) * (1 + weight)``: scaling its weight
does not scale its output). :func:`verify_layout` therefore checks a loaded model against its
row before anything is changed: every named module exists with the declared type and widths,
every linear of a block belongs to a group, and every norm a scale is folded into computes
``normalize(x) * (norm_offset + weight) (+ bias)``, by a numeric probe (scale the weight, the
output must scale alike). The pipeline adds a probe of each fold on the real block
(:func:`quantkit.pipeline.verify_folds`).

Rotation (:mod:`quantkit.rotation`) needs what the groups do not say: where the residual stream
is written (token embeddings, the linears whose outputs are added to it), where it is read
(the norms feeding each group, the final norm and LM head), where the values of the attention
heads are produced and consumed, and which linears can take an online Hadamard. That is the
row's :class:`RotationSpec`; rows without one carry the reason rotation is refused.

Mixture-of-experts rows name the fused expert tensors (:class:`ExpertsSpec`); the pipeline
turns them into ``gate_proj``/``up_proj``/``down_proj`` linears per expert
(:mod:`quantkit.experts`), and a ``*`` in a group's names stands for every expert index.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.config import ConfigError
from quantkit.experts import UnfusedExperts
from quantkit.quant_linear import QuantLinear

EXPERT = "*"  # in a LinearGroup name: every expert index of the block's experts module


@dataclass(frozen=True)
class LinearGroup:
    """Linears (names relative to the block) that share one input, fed by ``prev``.

    ``prev_parts``: ``prev`` (a linear) writes ``prev_parts`` equal chunks of output channels
    and the group reads a per-channel function of the last one (fused ``gate_up_proj`` ->
    ``down_proj`` reads ``act(gate) * up``: 2; fused ``qkv_proj`` -> ``o_proj`` reads ``v``,
    a third only without grouped-query attention: 3, and where the widths say otherwise no
    fold happens). ``readers``: other modules that read the same input and stay in full
    precision (a MoE router); a fold scales their input columns too, so they compute the same.
    ``optional``: a block may lack all of the group's linears (Qwen3-MoE mixes dense and
    sparse MLP layers). ``per_expert``: a ``*`` group becomes one group per expert (each
    expert's ``down_proj`` reads its own input) instead of one group of every expert.
    ``heads``: the attention module whose ``num_key_value_groups`` and ``head_dim`` say how
    many query heads read each of ``prev``'s value heads (grouped-query attention: ``o_proj``
    reads each ``v_proj`` head that many times, and a fold shares one scale over the copies).
    """

    linears: tuple[str, ...]
    prev: str | None
    prev_parts: int = 1
    readers: tuple[str, ...] = ()
    optional: bool = False
    per_expert: bool = False
    heads: str | None = None


@dataclass(frozen=True)
class ExpertsSpec:
    """Experts stored as 3D parameters (transformers 5): ``gate_up (E, 2 * I, H)`` holding
    ``[gate; up]`` and ``down (E, H, I)`` in the module at ``path`` (relative to the block);
    the expert computes ``down(act(gate(x)) * up(x))`` with the module's ``act_fn``."""

    path: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class RotationSpec:
    """What a rotation of the residual stream by an orthogonal ``Q`` touches (names relative to
    the model for ``embeddings``/``final_norm``/``head``, to a block otherwise; ``*`` = every
    expert). The residual readers are the linears (and full-precision ``readers``) of the
    groups whose ``prev`` is one of ``norms``, and ``head`` after ``final_norm``.

    ``writers``: linears whose output is added to the stream (``W <- Q^T W``, ``b <- Q^T b``).
    ``values``: the linear whose output rows are the attention values, ``head_dim`` rows per
    KV head (the last ``num_key_value_heads * head_dim`` rows with ``values_tail``, a fused
    ``qkv_proj``); ``attn_out``: the linear reading the heads' outputs (per-head rotation).
    ``online``: per role (``down_proj``, ``o_proj``) the linears whose input can get an online
    Hadamard (optional ones may be absent from a block).
    """

    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    values: str = "self_attn.v_proj"
    values_tail: bool = False
    attn_out: str = "self_attn.o_proj"
    online: tuple[tuple[str, tuple[str, ...]], ...] = (("down_proj", ("mlp.down_proj",)),
                                                       ("o_proj", ("self_attn.o_proj",)))
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    final_norm: str = "model.norm"
    head: str = "lm_head"

    def online_linears(self, role: str) -> tuple[str, ...]:
        return dict(self.online)[role]



@dataclass(frozen=True)
class ArchSpec:
    """Where the blocks are (``blocks``, a ModuleList path), their linear groups, and the HF
    config attributes that give the input widths of those linears (for early groupsize
    checks; ``a*b`` multiplies two attributes). ``norm_offset``: the norms compute
    ``normalize(x) * (norm_offset + weight)`` (Gemma: 1). ``layout`` names the row in
    messages. ``rotation``: what rotating the residual stream touches, or None with the reason
    in ``no_rotation``."""

    layout: str
    blocks: str
    groups: tuple[LinearGroup, ...]
    input_dims: tuple[str, ...]
    norm_offset: float = 0.0
    experts: ExpertsSpec | None = None
    rotation: RotationSpec | None = RotationSpec()
    no_rotation: str = ""


_ATTENTION = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", heads="self_attn"),
)
_LLAMA = ArchSpec(
    layout="llama",
    blocks="model.layers",
    groups=_ATTENTION + (
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        LinearGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
    input_dims=("hidden_size", "intermediate_size", "num_attention_heads*head_dim"),
)
# Gemma 2/3: "sandwich" norms (post_attention_layernorm and post_feedforward_layernorm act on
# the sublayer outputs, so they feed no linear); the MLP reads pre_feedforward_layernorm.
# Soft-capping (attention logits, final logits) lives in code this table does not touch.
_GEMMA2 = ArchSpec(
    layout="gemma2",
    blocks="model.layers",
    groups=_ATTENTION + (
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
        LinearGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
    input_dims=_LLAMA.input_dims,
    norm_offset=1.0,
    rotation=None,
    no_rotation=("its post-attention and post-feedforward norms scale the sublayer outputs per channel before "
                 "they join the residual stream, and a per-channel weight there does not commute with a rotation"),
)
_PHI3 = ArchSpec(
    layout="phi3",
    blocks="model.layers",
    groups=(
        LinearGroup(("self_attn.qkv_proj",), "input_layernorm"),
        LinearGroup(("self_attn.o_proj",), "self_attn.qkv_proj", prev_parts=3),  # [q; k; v]
        LinearGroup(("mlp.gate_up_proj",), "post_attention_layernorm"),
        LinearGroup(("mlp.down_proj",), "mlp.gate_up_proj", prev_parts=2),  # [gate; up]
    ),
    input_dims=_LLAMA.input_dims,
    rotation=RotationSpec(values="self_attn.qkv_proj", values_tail=True),  # [q; k; v]
)
# Mixtral, Qwen3-MoE: the router (mlp.gate) reads the MLP's input and stays in full precision.
_MOE = ArchSpec(
    layout="moe",
    blocks="model.layers",
    groups=_ATTENTION + (
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", optional=True),  # dense layers
        LinearGroup(("mlp.down_proj",), "mlp.up_proj", optional=True),
        LinearGroup(("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), "post_attention_layernorm",
                    readers=("mlp.gate",), optional=True),
        LinearGroup(("mlp.experts.*.down_proj",), "mlp.experts.*.up_proj", optional=True, per_expert=True),
    ),
    input_dims=_LLAMA.input_dims + ("moe_intermediate_size",),
    experts=ExpertsSpec("mlp.experts"),
    rotation=RotationSpec(writers=("self_attn.o_proj", "mlp.down_proj", "mlp.experts.*.down_proj"),
                          online=(("down_proj", ("mlp.down_proj", "mlp.experts.*.down_proj")),
                                  ("o_proj", ("self_attn.o_proj",)))),
)
_OPT = ArchSpec(
    layout="opt",
    blocks="model.decoder.layers",
    groups=(
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm"),
        LinearGroup(("self_attn.out_proj",), "self_attn.v_proj"),
        LinearGroup(("fc1",), "final_layer_norm"),
        LinearGroup(("fc2",), "fc1"),  # ReLU commutes with a positive per-channel scale
    ),
    input_dims=("hidden_size", "ffn_dim"),
    rotation=None,
    no_rotation=("its LayerNorms subtract the mean and add a bias, which do not commute with a rotation of the "
                 "residual stream (they would first have to become RMS norms, with the mean removed from every "
                 "writer and a bias added to the LM head)"),
)
_GPT_NEOX = ArchSpec(
    layout="gpt_neox",
    blocks="gpt_neox.layers",
    groups=(
        LinearGroup(("attention.query_key_value",), "input_layernorm"),
        LinearGroup(("attention.dense",), None),  # fused qkv, interleaved per head: no fold into v
        LinearGroup(("mlp.dense_h_to_4h",), "post_attention_layernorm"),
        LinearGroup(("mlp.dense_4h_to_h",), None),  # GELU does not commute with a scale
    ),
    input_dims=("hidden_size", "intermediate_size"),
    rotation=None,
    no_rotation=("its LayerNorms subtract the mean and add a bias (see opt), and its fused query_key_value "
                 "interleaves the heads"),
)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": dataclasses.replace(_LLAMA, layout="gemma", norm_offset=1.0),
    "gemma2": _GEMMA2,
    "gemma3_text": dataclasses.replace(_GEMMA2, layout="gemma3_text"),
    "phi3": _PHI3,
    "mixtral": dataclasses.replace(_MOE, layout="mixtral"),
    "qwen3_moe": dataclasses.replace(_MOE, layout="qwen3_moe"),
    "opt": _OPT,
    "gpt_neox": _GPT_NEOX,
}


def _advice() -> str:
    return (f"set model_type to the layout the model follows (supported: {', '.join(sorted(ARCHS))}) "
            "or add an ArchSpec row to quantkit.arch.ARCHS")


def get_arch(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; unknown types are an error naming what to add."""
    if model_type not in ARCHS:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{', '.join(sorted(ARCHS))}. Set model_type to a supported layout the model "
            "follows (the loaded model is checked against it, and refused before anything "
            "changes if it differs), or add an ArchSpec row to quantkit.arch.ARCHS"
        )
    return ARCHS[model_type]


def resolve_model_type(model_type: str, hf_model_type: str) -> str:
    """``model_type=auto`` takes the model's own ``config.model_type``.

    An explicit ``model_type`` whose layout differs from the one the model's own (supported)
    type selects is an error before loading: the model's config already says which it is.
    """
    if model_type == "auto":
        return hf_model_type
    own = ARCHS.get(hf_model_type)
    if own is not None and model_type in ARCHS and _unnamed(ARCHS[model_type]) != _unnamed(own):
        raise ConfigError(
            f"model_type={model_type!r} selects the {ARCHS[model_type].layout} layout, but the model's "
            f"config.json says model_type={hf_model_type!r} ({own.layout} layout, supported): "
            "use model_type=auto"
        )
    return model_type


def _unnamed(arch: ArchSpec) -> ArchSpec:
    return dataclasses.replace(arch, layout="")


def _config_dim(hf_config: object, attr: str) -> int | None:
    values = [getattr(hf_config, a, None) for a in attr.split("*")]
    if not all(isinstance(v, int) for v in values):
        return None
    return math.prod(values)


def min_input_dim(arch: ArchSpec, hf_config: object) -> int:
    """Smallest input width of the block linears, read from the HF config (no weights needed)."""
    dims = [d for d in (_config_dim(hf_config, attr) for attr in arch.input_dims) if d is not None]
    if not dims:
        raise ConfigError(f"cannot read input dims {arch.input_dims} from the model config")
    return min(dims)


def input_dims(arch: ArchSpec, hf_config: object) -> list[int]:
    """The input widths of the block linears that the HF config gives."""
    return [d for d in (_config_dim(hf_config, attr) for attr in arch.input_dims) if d is not None]


def get_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(arch.blocks)
    except AttributeError:
        raise ConfigError(
            f"model has no decoder blocks at {arch.blocks!r} (the {arch.layout} layout): {_advice()}"
        ) from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"{arch.blocks!r} is not a non-empty list of decoder blocks: {_advice()}")
    return blocks


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """True if ``name`` equals a pattern, ends with ``.pattern``, or fully matches it as a regex."""
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _module(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _expert_count(block: nn.Module, arch: ArchSpec) -> int | None:
    """Experts in ``block`` (None: the block has no unfused experts module)."""
    if arch.experts is None:
        return None
    module = _module(block, arch.experts.path)
    return len(module) if isinstance(module, UnfusedExperts) else None


def expand_groups(block: nn.Module, arch: ArchSpec) -> list[list[LinearGroup]]:
    """The row's groups with every ``*`` replaced by the block's expert indices: one list per
    row group (a ``per_expert`` group gives one group per expert, the others one group).
    Groups with ``*`` in a block without experts come out empty."""
    count = _expert_count(block, arch)
    out = []
    for group in arch.groups:
        if not any(EXPERT in n for n in group.linears):
            out.append([group])
            continue
        experts = range(count or 0)

        def sub(name: str | None, e: int) -> str | None:
            return None if name is None else name.replace(EXPERT, str(e))

        if group.per_expert:
            out.append([dataclasses.replace(group, linears=tuple(sub(n, e) for n in group.linears),
                                            prev=sub(group.prev, e), readers=tuple(sub(r, e) for r in group.readers))
                        for e in experts])
        else:
            names = tuple(n.replace(EXPERT, str(e)) for e in experts for n in group.linears)
            out.append([dataclasses.replace(group, linears=names)] if names else [])
    return out


def verify_layout(model: nn.Module, arch: ArchSpec) -> None:
    """Check that ``model`` (loaded, with experts unfused) follows ``arch``; a ConfigError
    naming the block, the module and what differs otherwise. Changes nothing."""
    blocks = get_blocks(model, arch)
    probed: dict[type, None] = {}  # norm classes already probed (one instance per class suffices)
    for index, block in enumerate(blocks):
        _verify_block(block, f"{arch.blocks}.{index}", arch, probed)


def _verify_block(block: nn.Module, prefix: str, arch: ArchSpec, probed: dict[type, None]) -> None:
    def fail(what: str) -> ConfigError:
        return ConfigError(f"the model does not follow the {arch.layout} layout: {what}; {_advice()}")

    if arch.experts is not None:
        experts = _module(block, arch.experts.path)
        if experts is not None and not isinstance(experts, UnfusedExperts):
            raise fail(f"{prefix}.{arch.experts.path} is a {type(experts).__name__}, not fused expert tensors "
                       f"{arch.experts.gate_up}/{arch.experts.down}")
    covered = set()
    for groups in expand_groups(block, arch):
        for group in groups:
            found = {n: _module(block, n) for n in group.linears}
            missing = [n for n, m in found.items() if m is None]
            if missing and (not group.optional or len(missing) < len(found)):
                raise fail(f"{prefix} has no {', '.join(missing)}")
            if missing:
                continue
            for name, module in found.items():
                if not isinstance(module, nn.Linear):
                    kind = "already quantized" if isinstance(module, QuantLinear) else "not an nn.Linear"
                    raise fail(f"{prefix}.{name} is a {type(module).__name__} ({kind})")
            covered.update(found)
            widths = {m.in_features for m in found.values()}
            if len(widths) != 1:
                raise fail(f"{prefix}: {', '.join(found)} should read one input but take widths {sorted(widths)}")
            (width,) = widths
            _verify_producer(block, prefix, group, width, arch, probed, fail)
    stray = [n for n in linear_names(block) if n not in covered]
    if stray:
        raise fail(f"{prefix} has linears the layout does not know: {', '.join(stray)}")


def _verify_producer(block: nn.Module, prefix: str, group: LinearGroup, width: int, arch: ArchSpec,
                     probed: dict[type, None], fail: Any) -> None:
    for name in group.readers:
        reader = _module(block, name)
        weight = getattr(reader, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != width:
            raise fail(f"{prefix}.{name} should read the {width}-wide input of {', '.join(group.linears)} "
                       f"through a 2-D weight (out, {width})")
    if group.prev is None:
        return
    prev = _module(block, group.prev)
    if prev is None:
        raise fail(f"{prefix} has no {group.prev} (feeds {', '.join(group.linears)})")
    if isinstance(prev, nn.Linear):
        return  # a width that does not fit (grouped-query attention) only means no fold
    if isinstance(prev, QuantLinear):
        raise fail(f"{prefix}.{group.prev} is already quantized")
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (width,):
        raise fail(f"{prefix}.{group.prev} ({type(prev).__name__}) should be a norm with a ({width},) weight "
                   f"feeding {', '.join(group.linears)}")
    if type(prev) not in probed:
        reason = norm_probe(prev, arch.norm_offset)
        if reason is not None:
            raise fail(f"{prefix}.{group.prev} ({type(prev).__name__}) {reason}")
        probed[type(prev)] = None


@torch.no_grad()
def norm_probe(norm: nn.Module, offset: float) -> str | None:
    """Why ``norm`` does not compute ``normalize(x) * (offset + weight) (+ bias)`` (None: it does).

    The test a fold relies on: with the weight replaced by ``(offset + weight) * c - offset``
    and the bias by ``bias * c`` for positive per-channel ``c``, the output must become
    ``output * c``. Run on a float32 copy, so the model is untouched and rounding is small.
    """
    probe = copy.deepcopy(norm).float()
    weight = probe.weight
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, weight.shape[0], generator=generator) * 3).to(weight.device)  # (2, 7, width)
    c = (torch.rand(weight.shape[0], generator=generator) * 1.5 + 0.5).to(weight.device)  # (width,)
    y = probe(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return "does not map a (..., width) input to an output of the same shape"
    weight.copy_((offset + weight) * c - offset)
    bias = getattr(probe, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.mul_(c)
    err = float((probe(x) - y * c).abs().max())
    tol = 1e-4 * max(float(y.abs().max()), 1e-6)
    if err > tol:
        kind = "normalize(x) * weight" if offset == 0 else f"normalize(x) * ({offset:g} + weight)"
        return (f"does not compute {kind}: scaling its weight per channel changed its output by {err:.3g} "
                "more than the scale explains, so scales cannot be folded into it")
    return None

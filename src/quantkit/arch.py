"""Architecture knowledge as data: where the decoder blocks live and how linears are grouped.

One :class:`ArchSpec` per Hugging Face ``model_type``. Inside a block, linears come in
:class:`LinearGroup` s in dataflow order; the linears of a group read the same input, and
``prev`` names the module that produces that input (a norm or a linear) where a per-channel
scale can be folded into it exactly (used by AWQ and SmoothQuant). Adding an architecture
is adding a row to :data:`ARCHS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from quantkit.config import ConfigError


@dataclass(frozen=True)
class LinearGroup:
    """Linears (names relative to the block) that share one input, fed by ``prev``."""

    linears: tuple[str, ...]
    prev: str | None


@dataclass(frozen=True)
class ArchSpec:
    """Where the blocks are (``blocks``, a ModuleList path), their linear groups, and the HF
    config attributes that give the input widths of those linears (for early groupsize checks)."""

    blocks: str
    groups: tuple[LinearGroup, ...]
    input_dims: tuple[str, ...]


_LLAMA = ArchSpec(
    blocks="model.layers",
    groups=(
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        LinearGroup(("self_attn.o_proj",), "self_attn.v_proj"),
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        LinearGroup(("mlp.down_proj",), "mlp.up_proj"),
    ),
    input_dims=("hidden_size", "intermediate_size"),
)
_OPT = ArchSpec(
    blocks="model.decoder.layers",
    groups=(
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm"),
        LinearGroup(("self_attn.out_proj",), "self_attn.v_proj"),
        LinearGroup(("fc1",), "final_layer_norm"),
        LinearGroup(("fc2",), "fc1"),  # ReLU commutes with a positive per-channel scale
    ),
    input_dims=("hidden_size", "ffn_dim"),
)
_GPT_NEOX = ArchSpec(
    blocks="gpt_neox.layers",
    groups=(
        LinearGroup(("attention.query_key_value",), "input_layernorm"),
        LinearGroup(("attention.dense",), None),  # fused qkv: no per-channel fold into v alone
        LinearGroup(("mlp.dense_h_to_4h",), "post_attention_layernorm"),
        LinearGroup(("mlp.dense_4h_to_h",), None),  # GELU does not commute with a scale
    ),
    input_dims=("hidden_size", "intermediate_size"),
)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "opt": _OPT,
    "gpt_neox": _GPT_NEOX,
}


def get_arch(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; unknown types are an error naming what to add."""
    if model_type not in ARCHS:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{', '.join(sorted(ARCHS))}. Set model_type to a supported layout the model "
            "follows, or add an ArchSpec row to quantkit.arch.ARCHS"
        )
    return ARCHS[model_type]


def resolve_model_type(model_type: str, hf_model_type: str) -> str:
    """``model_type=auto`` takes the model's own ``config.model_type``."""
    return hf_model_type if model_type == "auto" else model_type


def min_input_dim(arch: ArchSpec, hf_config: object) -> int:
    """Smallest input width of the block linears, read from the HF config (no weights needed)."""
    dims = [getattr(hf_config, attr, None) for attr in arch.input_dims]
    dims = [d for d in dims if isinstance(d, int)]
    if not dims:
        raise ConfigError(f"cannot read input dims {arch.input_dims} from the model config")
    return min(dims)


def get_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(arch.blocks)
    except AttributeError:
        raise ConfigError(
            f"model has no decoder blocks at {arch.blocks!r}; is model_type right?"
        ) from None
    return blocks


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """True if ``name`` equals a pattern, ends with ``.pattern``, or fully matches it as a regex."""
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

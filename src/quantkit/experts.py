"""Mixture-of-experts layers as one ``nn.Linear`` per expert and matrix, so each can be quantized.

transformers 5 keeps the experts of Mixtral, Qwen3-MoE and others as two 3D parameters,
``gate_up_proj (E, 2 * I, H)`` (``[gate; up]`` stacked) and ``down_proj (E, H, I)``.
:func:`unfuse_experts` replaces such a module by :class:`UnfusedExperts`, a list of
:class:`Expert` modules with ``gate_proj``, ``up_proj`` and ``down_proj`` linears holding the
same weights; it computes what the fused module computes, token for token (up to float
rounding: gate and up are two matmuls instead of one). Quantizing
``gate_proj`` and ``up_proj`` apart is quantizing the rows of ``[gate; up]`` (every weight
scheme but ``per_tensor`` is per row), and the names are those of per-expert checkpoints.

Calibration and experts. A router sends each token to ``top_k`` of ``E`` experts, so on a
few hundred calibration samples a rarely chosen expert sees few or no tokens, and its
statistics (a GPTQ Hessian, AWQ's activation scales, a static activation range) would be
missing or poor. With :attr:`UnfusedExperts.calibrate_all` set (the calibration pipeline sets
it during its passes) every expert computes on *every* token, so every expert's observers
see all calibration tokens, while the layer's output still combines only the routed experts'
results with the router's weights: the activations passed on are the model's own. This is
the choice of llm-compressor's ``calibrate_all_experts``; it costs ``E / top_k`` times the
expert FLOPs during calibration only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class Expert(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``; the per-expert module names
    of Qwen3-MoE checkpoints, and what llm-compressor quantizes."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (tokens, H)


class UnfusedExperts(nn.ModuleList):
    """The experts of one MoE layer as a list of :class:`Expert`; called like the fused module
    it replaces: ``(hidden (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k))``."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.calibrate_all = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (tokens, H)
        for e, expert in enumerate(self):
            # routed (slot, token) pairs in transformers' order (slot-major), so the sums match
            top_k_pos, token_idx = torch.where((top_k_index == e).T)  # (n,), (n,)
            if self.calibrate_all:
                y = expert(hidden_states)[token_idx]  # every token reaches the observers
            elif token_idx.numel():
                y = expert(hidden_states[token_idx])  # (n, H)
            else:
                continue
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def fused_layout_problem(module: nn.Module, gate_up: str, down: str) -> str | None:
    """Why ``module`` is not the fused layout :func:`unfuse_experts` handles (None: it is)."""
    w1, w2 = getattr(module, gate_up, None), getattr(module, down, None)
    if not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor) or w1.dim() != 3 or w2.dim() != 3:
        return f"has no 3-D {gate_up}/{down} expert tensors"
    experts, two_inter, hidden = w1.shape
    if two_inter % 2 or tuple(w2.shape) != (experts, hidden, two_inter // 2):
        return f"{gate_up} {tuple(w1.shape)} and {down} {tuple(w2.shape)} are not (E, 2I, H) and (E, H, I)"
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = [f"{k}={getattr(module, k)}" for k, v in flags.items() if getattr(module, k, v) != v]
    if odd:
        return f"uses an expert variant this module does not reproduce ({', '.join(odd)})"
    if not isinstance(getattr(module, "act_fn", None), nn.Module):
        return "has no act_fn module"
    return None


@torch.no_grad()
def unfuse_experts(module: nn.Module, gate_up: str = "gate_up_proj", down: str = "down_proj") -> UnfusedExperts:
    """An :class:`UnfusedExperts` with the weights of the fused ``module`` (copied: the fused
    tensors can be freed). Raises ValueError if ``module`` is not the fused layout."""
    problem = fused_layout_problem(module, gate_up, down)
    if problem is not None:
        raise ValueError(f"{type(module).__name__} {problem}")
    w1, w2 = getattr(module, gate_up), getattr(module, down)  # (E, 2I, H), (E, H, I)
    inter = w2.shape[2]
    experts = [Expert(_linear(w1[e, :inter]), _linear(w1[e, inter:]), _linear(w2[e]), module.act_fn)
               for e in range(w1.shape[0])]
    return UnfusedExperts(experts)


def unfuse_where_named(model: nn.Module, names: Iterable[str], gate_up: str = "gate_up_proj",
                       down: str = "down_proj") -> None:
    """Unfuse every fused experts module of ``model`` that one of ``names`` reaches into
    (``<path>.<expert>...``): a model built from its config before per-expert layers load."""
    names = list(names)
    for path, module in list(model.named_modules()):
        if fused_layout_problem(module, gate_up, down) is None and any(n.startswith(path + ".") for n in names):
            model.set_submodule(path, unfuse_experts(module, gate_up, down))


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free linear holding a copy of ``weight (out, in)`` (no random init)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


@contextlib.contextmanager
def calibrate_all_experts(module: nn.Module) -> Iterator[None]:
    """Every :class:`UnfusedExperts` inside ``module`` computes on every token while inside."""
    layers = [m for m in module.modules() if isinstance(m, UnfusedExperts)]
    for m in layers:
        m.calibrate_all = True
    try:
        yield
    finally:
        for m in layers:
            m.calibrate_all = False

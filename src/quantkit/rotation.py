"""Rotations of a float model before quantization (QuaRot): the same function, no outliers.

A transformer's residual stream ``h`` can be replaced by ``h Q`` for any orthogonal ``Q`` without
changing what the model computes, once every module that writes or reads the stream is rewritten
(row-vector convention, ``y = x W^T + b``):

* norms first: an RMS norm computes ``normalize(h) * (offset + g)``; ``normalize(h Q) =
  normalize(h) Q``, but the per-channel ``g`` does not commute with ``Q``, so it is folded into
  the linears the norm feeds (``W <- W diag(offset + g)``) and the norm's weight becomes the
  identity (``1 - offset``);
* readers (the linears a norm feeds, a MoE router, the LM head after the final norm):
  ``W <- W Q``; writers (the linears whose output is added to the stream): ``W <- Q^T W``,
  ``b <- Q^T b``; token embeddings: ``E <- E Q``. Tied input/output embeddings are untied
  (the head gets the final norm's weight, the embedding does not) and the config says so.

``Q`` is a randomized Hadamard matrix ``diag(+-1) H_d`` (``rotation=hadamard``; applied with the
fast transform of :mod:`quantkit.hadamard`) or a random orthogonal matrix (``rotation=random``).
Rotations that vanish inside a sublayer come on top:

* ``heads``: the values of every attention head (``head_dim`` rows of ``v_proj`` per KV head)
  are rotated by ``R`` and the output projection's matching input columns by ``R`` too
  (attention is linear in the values, so each head's output is rotated alike);
* ``online``: ``down_proj`` (and optionally ``o_proj``) get ``W <- W H_n`` and an
  :class:`~quantkit.hadamard.OnlineHadamard` multiplying their input by ``H_n`` at run time (the
  nonlinearity before ``down_proj`` leaves no offline place for it). It is what makes 4-bit
  activations work: the quantized input has no outlier channels left.

Which modules play which part is the row's :class:`~quantkit.arch.RotationSpec`; rows without
one are refused with their reason. Before anything changes, the model is checked against its
row (:func:`~quantkit.arch.verify_layout`) and every norm is probed (a norm that subtracts the
mean or adds a bias is refused); afterwards the logits of a probe batch must equal those of the
unrotated model up to float rounding, or the run stops with a :class:`ConfigError`. Weights are
rewritten in float32 (Hadamard rotations with the fast transform) and stored back in their dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.arch import ArchSpec, RotationSpec, expand_groups, get_blocks, linear_names, verify_layout
from quantkit.config import ConfigError, RotationConfig
from quantkit.experts import UnfusedExperts, unfuse_experts
from quantkit.hadamard import HadamardLinear, chunk_matrix, factor, hadamard_transform_reference, mix_chunks, sylvester
from quantkit.quant_linear import QuantLinear

log = logging.getLogger(__name__)

PROBE_TOKENS = 16
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}  # max |logit change| / max |logit|
_TOLERANCE_16BIT = 3e-2  # float16/bfloat16 weights: rounding the rotated weights moves logits


def unsupported(arch: ArchSpec) -> str | None:
    """Why ``arch`` cannot be rotated (None: it can)."""
    if arch.rotation is None:
        return f"rotation is unsupported for the {arch.layout} layout: {arch.no_rotation}"
    return None


def require_spec(arch: ArchSpec) -> RotationSpec:
    reason = unsupported(arch)
    if reason is not None:
        raise ConfigError(reason)
    return arch.rotation


def head_dim(hf_config: Any) -> int:
    """Width of one attention head (``head_dim`` or ``hidden_size / num_attention_heads``)."""
    dim = getattr(hf_config, "head_dim", None)
    return dim if isinstance(dim, int) and dim > 0 else hf_config.hidden_size // hf_config.num_attention_heads


def label(cfg: RotationConfig) -> str | None:
    """The rotation as reports prefix the algorithm (``hadamard+gptq``); None when inactive."""
    if not cfg.active:
        return None
    return cfg.name if cfg.name != "none" else "online"


class Orthogonal:
    """An orthogonal ``(n, n)`` matrix ``Q`` applied to weights in float32: a randomized Hadamard
    ``diag(s) H_n`` (kept as the signs and applied by the fast transform, ``O(n log n)`` per row)
    or a dense random one (drawn in float64)."""

    def __init__(self, n: int, kind: str, generator: torch.Generator) -> None:
        self.n, self.kind = n, kind
        if kind == "hadamard":
            self.signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1  # (n,)
            self.had_k = chunk_matrix(n)
        else:
            gauss = torch.randn(n, n, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gauss)
            self.matrix = q * torch.sign(torch.diagonal(r))[None, :]  # (n, n): Haar-distributed

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``w (..., n) @ Q`` in float32 (every entry of the result is a sum of ``n`` rounded terms:
        relative error ~1e-7, far below the float16 rounding of a stored weight)."""
        w = w.float()
        if self.kind == "hadamard":
            return hadamard_gemm(w * self.signs.to(w.device, w.dtype), self.had_k.to(w.device))
        return w @ self.matrix.to(w.device, torch.float32)

    def left_t(self, w: torch.Tensor) -> torch.Tensor:
        """``Q^T @ w (n, ...)`` in float32."""
        return self.right(w.t()).t()

    def dense(self) -> torch.Tensor:
        """``Q (n, n)`` float32 (tests)."""
        return self.right(torch.eye(self.n))


_GEMM_CHUNK = 512  # chunks up to this length are multiplied by H_P as a GEMM, longer ones by the FWHT


def hadamard_gemm(w: torch.Tensor, had_k: torch.Tensor) -> torch.Tensor:
    """``w (..., n) @ H_n`` (``H_n`` of :func:`~quantkit.hadamard.hadamard_matrix`) for rewriting
    weights: the chunk mix, then ``H_P`` as a GEMM (far faster on a CPU than the butterflies of
    :func:`~quantkit.hadamard.hadamard_transform_reference`, which define the online transform
    bit for bit; the two agree to float rounding)."""
    n = w.shape[-1]
    chunk = n // had_k.shape[0]
    if chunk > _GEMM_CHUNK:
        return hadamard_transform_reference(w, had_k)
    rows = mix_chunks(w.reshape(-1, n), had_k)  # (rows, n) float32
    h_p = (sylvester(chunk) / n**0.5).to(rows.device, rows.dtype)  # (P, P): H_P / sqrt(n)
    return (rows.reshape(-1, chunk) @ h_p).reshape(w.shape)


def online_hadamard_right(w: torch.Tensor) -> torch.Tensor:
    """``w (out, n) @ H_n`` in float32 with the :class:`~quantkit.hadamard.OnlineHadamard` matrix."""
    return hadamard_gemm(w.float(), chunk_matrix(w.shape[-1]).to(w.device))


@dataclass
class RotationReport:
    """What :func:`rotate_model` did (``results.json``: ``rotation``)."""

    name: str
    seed: int
    heads: bool
    online: dict[str, int] = field(default_factory=dict)  # role -> linears given an online Hadamard
    untied_embeddings: bool = False
    probe_error: float = 0.0  # max |logit change| / max |logit| on the probe batch
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _set(param: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _unfuse(model: nn.Module, arch: ArchSpec) -> None:
    """One linear per expert (the pipeline does the same later; it skips unfused experts)."""
    if arch.experts is None:
        return
    for index, block in enumerate(get_blocks(model, arch)):
        try:
            module = block.get_submodule(arch.experts.path)
        except AttributeError:
            continue
        if isinstance(module, UnfusedExperts):
            continue
        try:
            block.set_submodule(arch.experts.path, unfuse_experts(module, arch.experts.gate_up, arch.experts.down))
        except ValueError as exc:
            raise ConfigError(f"the model does not follow the {arch.layout} layout: "
                              f"{arch.blocks}.{index}.{arch.experts.path}: {exc}") from None


def _present(block: nn.Module, names: tuple[str, ...]) -> list[str]:
    """``names`` with ``*`` expanded to the block's experts, those the block has."""
    out = []
    for name in names:
        if "*" in name:
            prefix, _, rest = name.partition(".*.")
            try:
                experts = block.get_submodule(prefix)
            except AttributeError:
                continue
            out += [f"{prefix}.{e}.{rest}" for e in range(len(experts))]
        else:
            try:
                block.get_submodule(name)
            except AttributeError:
                continue
            out.append(name)
    return out


def _readers(block: nn.Module, arch: ArchSpec, norm: str) -> list[str]:
    """The linears (and full-precision readers) the block's ``norm`` feeds, per the groups."""
    names = []
    for groups in expand_groups(block, arch):
        for group in groups:
            if group.prev == norm:
                names += _present(block, group.linears + group.readers)
    return names


@torch.no_grad()
def rms_norm_problem(norm: nn.Module, offset: float) -> str | None:
    """Why ``norm`` with its weight folded away does not commute with a rotation (None: it does).

    Probe on a float32 copy: weight set to ``1 - offset`` (the identity scale), a random signed
    permutation ``S`` (orthogonal): ``norm(x S)`` must equal ``norm(x) S``. A LayerNorm's mean
    subtraction or bias breaks it.
    """
    probe = copy.deepcopy(norm).float()
    weight = probe.weight
    width = weight.shape[0]
    weight.fill_(1.0 - offset)
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, width, generator=generator) * 2 + 0.5).to(weight.device)  # (3, width)
    perm = torch.randperm(width, generator=generator).to(weight.device)
    signs = (torch.randint(0, 2, (width,), generator=generator) * 2 - 1).float().to(weight.device)
    got, want = probe((x * signs)[:, perm]), (probe(x) * signs)[:, perm]
    err = float((got - want).abs().max())
    if err > 1e-4 * max(float(want.abs().max()), 1e-6):
        return (f"does not commute with a rotation of its input (a signed permutation changed its output by "
                f"{err:.3g}): it subtracts the mean or adds a bias, as a LayerNorm does")
    return None


def check_model(model: nn.Module, arch: ArchSpec, cfg: RotationConfig) -> None:
    """Refuse, before any weight changes, a model this rotation would not leave exact."""
    spec = require_spec(arch)
    verify_layout(model, arch)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ConfigError("rotation applies to a float model; this one is already quantized")
    blocks = get_blocks(model, arch)
    probed: set[type] = set()
    for index, block in enumerate(blocks):
        prefix = f"{arch.blocks}.{index}"
        readers = {n for norm in spec.norms for n in _readers(block, arch, norm)}
        writers = set(_present(block, spec.writers))
        stray = [n for n in linear_names(block) if n not in readers | writers]
        if stray:
            raise ConfigError(f"rotation: {prefix} has linears the {arch.layout} row neither reads nor writes the "
                              f"residual stream with: {', '.join(stray)}")
        for name in spec.norms:
            norm = block.get_submodule(name)
            if type(norm) not in probed:
                problem = rms_norm_problem(norm, arch.norm_offset)
                if problem:
                    raise ConfigError(f"rotation: {prefix}.{name} ({type(norm).__name__}) {problem}")
                probed.add(type(norm))
    for name in (spec.final_norm, spec.head, *spec.embeddings):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"rotation: the model has no {name} (the {arch.layout} row's rotation data)") from None


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device), use_cache=False).logits.float()


@torch.no_grad()
def rotate_model(model: nn.Module, arch: ArchSpec, cfg: RotationConfig, hf_config: Any,
                 probe: torch.Tensor) -> RotationReport:
    """Rotate the float ``model`` in place as ``cfg`` asks (see the module doc) and check that its
    logits on ``probe (1, T)`` token ids did not change; return what was done."""
    t0 = time.perf_counter()
    spec = require_spec(arch)
    _unfuse(model, arch)
    check_model(model, arch, cfg)
    probe = probe[:, :PROBE_TOKENS]
    before = _logits(model, probe)
    generator = torch.Generator().manual_seed(cfg.seed)
    width = hf_config.hidden_size
    q = Orthogonal(width, cfg.name, generator) if cfg.name != "none" else None
    dim = head_dim(hf_config)
    r = Orthogonal(dim, "hadamard" if cfg.name == "none" else cfg.name, generator) if cfg.heads else None
    report = RotationReport(cfg.name, cfg.seed, cfg.heads, {role: 0 for role in cfg.online})
    offset = arch.norm_offset
    for block in get_blocks(model, arch):
        if q is not None:
            for name in spec.norms:
                norm = block.get_submodule(name)
                scale = norm.weight.float() + offset  # (width,)
                for reader in _readers(block, arch, name):
                    lin = block.get_submodule(reader)
                    _set(lin.weight, q.right(lin.weight.float() * scale.to(lin.weight.device)))
                norm.weight.fill_(1.0 - offset)
        if r is not None:
            _rotate_heads(block, spec, r, dim, hf_config)
        for role in cfg.online:
            for name in _present(block, spec.online_linears(role)):
                lin = block.get_submodule(name)
                _set(lin.weight, online_hadamard_right(lin.weight))
                block.set_submodule(name, HadamardLinear.from_linear(lin))
                report.online[role] += 1
        if q is not None:
            for name in _present(block, spec.writers):
                lin = block.get_submodule(name)
                _set(lin.weight, q.left_t(lin.weight))
                if lin.bias is not None:
                    _set(lin.bias, q.right(lin.bias[None, :])[0])
    if q is not None:
        report.untied_embeddings = _rotate_ends(model, spec, q, offset)
    after = _logits(model, probe)
    report.probe_error = float((after - before).abs().max()) / max(float(before.abs().max()), 1e-6)
    dtype = next(model.parameters()).dtype
    tolerance = _TOLERANCE.get(dtype, _TOLERANCE_16BIT)
    if not report.probe_error <= tolerance:
        raise ConfigError(
            f"rotation changed the model's logits by {report.probe_error:.3g} (relative, max) on a probe batch, more "
            f"than {dtype} rounding ({tolerance:g}): the {arch.layout} row's rotation data does not describe this "
            "model; set model_type to the layout it follows or fix its RotationSpec")
    report.seconds = time.perf_counter() - t0
    log.info("rotation=%s (heads=%s, online %s): logits change %.2e on the probe batch, %.1f s", cfg.name, cfg.heads,
             report.online or "none", report.probe_error, report.seconds)
    return report


def _rotate_heads(block: nn.Module, spec: RotationSpec, r: Orthogonal, dim: int, hf_config: Any) -> None:
    """Values ``V <- V R`` per KV head (rows of ``values``), head outputs likewise (columns of
    ``attn_out``): ``W_v <- blockdiag(R)^T W_v``, ``b_v <- b_v blockdiag(R)``, ``W_o <- W_o blockdiag(R)``."""
    values, out = block.get_submodule(spec.values), block.get_submodule(spec.attn_out)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    rows = slice(values.out_features - kv_heads * dim, values.out_features) if spec.values_tail else slice(None)
    w = values.weight[rows].float()  # (kv_heads * dim, in)
    heads = w.reshape(-1, dim, w.shape[1]).transpose(1, 2)  # (kv_heads, in, dim)
    values.weight[rows] = r.right(heads).transpose(1, 2).reshape(w.shape).to(values.weight.dtype)
    if values.bias is not None:
        b = values.bias[rows].float().reshape(-1, dim)  # (kv_heads, dim)
        values.bias[rows] = r.right(b).reshape(-1).to(values.bias.dtype)
    wo = out.weight.float()  # (out, heads * dim)
    _set(out.weight, r.right(wo.reshape(wo.shape[0], -1, dim)).reshape(wo.shape))


def _rotate_ends(model: nn.Module, spec: RotationSpec, q: Orthogonal, offset: float) -> bool:
    """The LM head (final norm folded in) and the embeddings; returns whether they were untied."""
    head, norm = model.get_submodule(spec.head), model.get_submodule(spec.final_norm)
    embeddings = [model.get_submodule(name) for name in spec.embeddings]
    untied = any(e.weight is head.weight for e in embeddings)
    if untied:  # the head gets the final norm's weight, the embedding does not: two tensors now
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        text.tie_word_embeddings = False
        log.info("rotation: %s untied from the input embeddings (the rotated head folds the final norm)", spec.head)
    scale = norm.weight.float() + offset  # (width,)
    _set(head.weight, q.right(head.weight.float() * scale.to(head.weight.device)))
    norm.weight.fill_(1.0 - offset)
    for embedding in embeddings:
        _set(embedding.weight, q.right(embedding.weight))
    return untied


def check_inputs(arch: ArchSpec, cfg: RotationConfig, hf_config: Any, skeleton: nn.Module) -> None:
    """What ``cfg`` needs, checked on the model's config and module tree on ``meta`` before any
    weight loads: the layout supports rotation, the modules its row names exist, and the
    Hadamard matrices of the needed orders exist; a ConfigError naming the key otherwise."""
    if not cfg.active:
        return
    try:
        spec = require_spec(arch)
    except ConfigError as exc:
        raise ConfigError(f"rotation={cfg.name} (heads={cfg.heads}, online={list(cfg.online)}): {exc}") from None
    blocks = skeleton.get_submodule(arch.blocks)
    missing = [n for n in (*spec.norms, spec.values, spec.attn_out) if not _present(blocks[0], (n,))]
    missing += [n for n in (spec.final_norm, spec.head, *spec.embeddings) if not _present(skeleton, (n,))]
    if missing:
        raise ConfigError(f"rotation={cfg.name}: the model has no {', '.join(missing)} (the {arch.layout} row's "
                          "rotation data): set model_type to the layout it follows")
    if cfg.name == "hadamard":
        _check_order(hf_config.hidden_size, "rotation=hadamard", "hidden_size", "use rotation=random")
    if cfg.heads:
        what = "rotation.heads=true" + ("" if cfg.name == "random" else f" with rotation={cfg.name}")
        if cfg.name != "random":
            _check_order(head_dim(hf_config), what, "head_dim", "set rotation.heads=false or use rotation=random")
    blocks = skeleton.get_submodule(arch.blocks)
    for role in cfg.online:
        names = _present(blocks[0], tuple(n for n in spec.online_linears(role) if "*" not in n))
        widths = {blocks[0].get_submodule(n).in_features for n in names}
        if "*" in "".join(spec.online_linears(role)) and isinstance(getattr(hf_config, "moe_intermediate_size", None), int):
            widths.add(hf_config.moe_intermediate_size)
        for width in sorted(widths):
            _check_order(width, f"rotation.online=[{role}]", f"the input width of {role}",
                         f"remove {role} from rotation.online")


def _check_order(n: int, key: str, what: str, advice: str) -> None:
    try:
        factor(n)
    except ValueError as exc:
        raise ConfigError(f"{key}: {what} {n}: {exc}; {advice}") from None

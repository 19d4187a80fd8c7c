"""The generic calibration pipeline: one block at a time, for every architecture in the table.

1. Capture the inputs of block 0 once (hidden states plus whatever keyword arguments the
   model passes its blocks: position embeddings, masks, cache positions).
2. For each block: move it to ``device``; for each phase (all linear groups at once, or one
   group after another with ``layer_sequential``) hook the algorithm's observers onto the
   phase's linears, run the calibration inputs through the block, and let the algorithm
   replace the linears; then compute the inputs of the next block (outputs of the quantized
   block with ``block_sequential``, else of the full-precision block, captured before any
   linear changed) and move the block back to ``offload``.

Peak memory on ``device``: one block plus one batch of activations; the captured activations
wait on ``offload``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.algorithms.base import Algorithm
from quantkit.arch import ArchSpec, LinearGroup, get_blocks, linear_names, matches_any

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once a forward has produced what is needed (block-0 inputs, observed inputs)."""


def _to(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside(model: nn.Module, blocks_path: str, device: torch.device | str) -> None:
    """Move every parameter/buffer that is not inside the decoder blocks to ``device``."""
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.device != torch.device(device):
                t.data = t.data.to(device)


@dataclass
class Calibration:
    """Activations entering the current block, one entry per batch, kept on ``offload``."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # each (batch, seq, hidden)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, blocks_path: str, samples: torch.Tensor,
    device: torch.device | str, offload: torch.device | str, batch_size: int,
) -> Calibration:
    """Run ``samples (N, L)`` through the model up to block 0 and keep what block 0 receives."""
    calib = Calibration()

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calib.hidden.append(hidden.to(offload))
        calib.kwargs.append(_to({k: v for k, v in kwargs.items() if k != "hidden_states"}, offload))
        raise _StopForward

    _move_outside(model, blocks_path, device)
    blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="capture", leave=False):
            try:
                model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        blocks[0].to(offload)
        _move_outside(model, blocks_path, offload)
    return calib


def _autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Matmuls in ``dtype`` (weights and statistics keep theirs); ``None``: no autocast."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.inference_mode()
def _run_block(block: nn.Module, calib: Calibration, device: torch.device | str, offload: torch.device | str,
               keep: bool, stop_after: list[nn.Module] | None = None,
               autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """Run every calibration batch through ``block``; return outputs (on offload) if ``keep``.

    ``autocast``: run the block's matmuls in that dtype (see :func:`quantize_model`).

    Without ``keep``, a batch's forward ends as soon as every module of ``stop_after`` has run
    (their forward hooks registered earlier, the observers, still run first): a phase that
    observes the attention projections does not pay for the MLP.
    """
    outs, handles = [], []
    if stop_after and not keep:
        pending: set[int] = set()

        def stop(module: nn.Module, _args: tuple, _out: Any) -> None:
            pending.discard(id(module))
            if not pending:
                raise _StopForward

        handles = [m.register_forward_hook(stop) for m in stop_after]
    try:
        for hidden, kwargs in zip(calib.hidden, calib.kwargs):
            if handles:
                pending.update(id(m) for m in stop_after)
            try:
                with _autocast(device, autocast):
                    out = block(hidden.to(device), **_to(kwargs, device))
            except _StopForward:
                continue
            out = out[0] if isinstance(out, (tuple, list)) else out
            if keep:
                outs.append(out.to(offload))
    finally:
        for h in handles:
            h.remove()
    return outs


def _observe(linears: dict[str, nn.Linear], observers: dict[str, Any]) -> list[Any]:
    """Forward hooks that feed each linear's input, flattened to (tokens, in), to its observer
    (an observer shared by several linears of a group is fed once, from the first of them)."""
    handles, hooked = [], set()
    for name, observer in observers.items():
        if id(observer) in hooked:
            continue
        hooked.add(id(observer))
        def hook(_m: nn.Module, args: tuple, _out: Any, observer: Any = observer) -> None:
            observer.update(args[0].reshape(-1, args[0].shape[-1]))
        handles.append(linears[name].register_forward_hook(hook))
    return handles


@dataclass
class PipelineReport:
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def plan_block(block: nn.Module, index: int, arch: ArchSpec, skip: tuple[str, ...],
               report: PipelineReport) -> list[tuple[LinearGroup, dict[str, nn.Linear]]]:
    """The groups of ``block`` with the linears to quantize (skipped ones filtered out)."""
    prefix = f"{arch.blocks}.{index}."
    planned = []
    grouped = set()
    for group in arch.groups:
        linears = {}
        for name in group.linears:
            grouped.add(name)
            module = block.get_submodule(name)
            if matches_any(prefix + name, skip):
                report.skipped.append(prefix + name)
            elif isinstance(module, nn.Linear):
                linears[name] = module
        if group.prev and len(linears) < len(group.linears):
            # a fold into prev would also rescale the input of the full-precision members
            log.debug("%s%s: group has skipped layers; no scale folding into %s", prefix, group.linears, group.prev)
            group = LinearGroup(group.linears, None)
        planned.append((group, linears))
    for name in linear_names(block):
        if name not in grouped:
            log.warning("%s%s is not in the %s layout table and stays in full precision", prefix, name, arch.blocks)
            report.skipped.append(prefix + name)
    return planned


def quantize_model(
    model: nn.Module,
    arch: ArchSpec,
    algorithm: Algorithm,
    samples: torch.Tensor | None,
    device: torch.device | str,
    offload: torch.device | str = "cpu",
    skip_layers: tuple[str, ...] = ("lm_head",),
    batch_size: int = 8,
    progress: bool = True,
    calibrate_dtype: torch.dtype | None = None,
) -> PipelineReport:
    """Quantize ``model`` in place with ``algorithm``; ``samples (N, L)`` are calibration tokens.

    ``calibrate_dtype`` (None: the model's own) runs the calibration forwards under autocast to
    that dtype: the linears' weights, the residual stream and every statistic the algorithm
    collects keep their precision; only the matmul inputs are rounded. On a CPU with native
    bfloat16 this makes the forwards several times faster.
    """
    report = PipelineReport()
    blocks = get_blocks(model, arch)
    plans = [plan_block(block, i, arch, skip_layers, report) for i, block in enumerate(blocks)]
    _quantize_outside_blocks(model, arch, algorithm, skip_layers, report)
    model.to(offload)
    calibrate = algorithm.needs_calibration
    if calibrate and samples is None:
        raise ValueError(f"algo={algorithm.name} needs calibration samples")
    calib = capture_block_inputs(model, blocks, arch.blocks, samples, device, offload, batch_size) if calibrate else None
    for i, (block, plan) in enumerate(tqdm(list(zip(blocks, plans)), desc=f"quantize ({algorithm.name})", disable=not progress)):
        block.to(device)
        phases = [[p] for p in plan] if algorithm.layer_sequential else [plan]
        fp_outputs = None
        for k, phase in enumerate(phases):
            observers = {}
            if calibrate:
                for _, linears in phase:
                    observers.update(algorithm.make_group_observers(linears))
                phase_linears = {n: lin for _, ls in phase for n, lin in ls.items()}
                # the first pass sees the full-precision block: its outputs feed the next block
                # unless block_sequential asks for the quantized block's outputs
                keep = k == 0 and not algorithm.block_sequential
                if observers or keep:
                    handles = _observe(phase_linears, observers)
                    try:
                        observed = [phase_linears[n] for n in observers]
                        outs = _run_block(block, calib, device, offload, keep, observed, calibrate_dtype)
                        fp_outputs = outs if keep else fp_outputs
                    finally:
                        for h in handles:
                            h.remove()
            prevs = [block.get_submodule(g.prev) if g.prev else None for g, _ in phase]
            for (group, linears), prev in zip(phase, prevs):
                algorithm.prepare_group(linears, observers, prev)
            for (group, linears), prev in zip(phase, prevs):
                replacements = algorithm.quantize_group(linears, observers, prev)
                for name, module in replacements.items():
                    block.set_submodule(name, module)
                    report.quantized.append(f"{arch.blocks}.{i}.{name}")
        if calibrate:
            calib.hidden = (fp_outputs if fp_outputs is not None
                            else _run_block(block, calib, device, offload, True, autocast=calibrate_dtype))
        block.to(offload)
    return report


def _quantize_outside_blocks(model: nn.Module, arch: ArchSpec, algorithm: Algorithm,
                             skip: tuple[str, ...], report: PipelineReport) -> None:
    for name in linear_names(model):
        if name.startswith(arch.blocks + "."):
            continue
        if matches_any(name, skip):
            report.skipped.append(name)
            continue
        model.set_submodule(name, algorithm.quantize_outside_block(name, model.get_submodule(name)))
        report.quantized.append(name)

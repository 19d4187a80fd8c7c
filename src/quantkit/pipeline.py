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

With ``layer_sequential`` every phase reruns the block from its input, but the parts of the
block whose linears are already quantized compute exactly what they computed in the previous
pass over the same batch. With ``reuse_outputs`` (:class:`_Replay`) such a part (the attention
during the MLP phases, ``gate_proj``/``up_proj`` in the final pass) hands back its stored output
when its inputs are equal to the stored ones; the results are identical, the forwards shorter
(GPTQ on SmolLM2: 23% less time), at the memory of those parts' inputs and outputs for all batches.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.algorithms.base import Algorithm
from quantkit.arch import ArchSpec, LinearGroup, get_blocks, linear_names, matches_any
from quantkit.quant_linear import QuantLinear

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once a forward has produced what is needed (block-0 inputs, observed inputs)."""


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    return _map_tensors(obj, lambda t: t.to(device))


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


_LEAF = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)


def _storable(obj: Any) -> bool:
    """Whether ``obj`` is made only of tensors, plain values and tuples/lists/dicts of them."""
    if isinstance(obj, _LEAF):
        return True
    if isinstance(obj, (tuple, list)):
        return all(_storable(o) for o in obj)
    if isinstance(obj, dict):
        return all(_storable(v) for v in obj.values())
    return False


def _copy(obj: Any) -> Any:
    """A copy that later in-place changes of ``obj``'s tensors (or of the copy's) do not reach."""
    return _map_tensors(obj, lambda t: t.detach().clone())


def _same(stored: Any, live: Any) -> bool:
    """Exact equality of two :func:`_storable` structures (tensors: shape, dtype and values)."""
    if isinstance(stored, torch.Tensor):
        return (isinstance(live, torch.Tensor) and stored.shape == live.shape and stored.dtype == live.dtype
                and stored.device == live.device and torch.equal(stored, live))
    if isinstance(stored, (tuple, list)):
        return (type(stored) is type(live) and len(stored) == len(live)
                and all(_same(a, b) for a, b in zip(stored, live)))
    if isinstance(stored, dict):
        return (isinstance(live, dict) and stored.keys() == live.keys()
                and all(_same(stored[k], live[k]) for k in stored))
    return type(stored) is type(live) and stored == live


def _snapshot(modules: list[nn.Module]) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """Copies of the parameters and buffers of ``modules`` (producers a fold may rescale)."""
    return [(m, _copy(list(m.state_dict().values()))) for m in modules]


def _unchanged(module: nn.Module, state: list[torch.Tensor]) -> bool:
    now = list(module.state_dict().values())
    return len(now) == len(state) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(state, now))


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, QuantLinear)) for m in module.modules())


class _Replay:
    """Stored outputs of the parts of one block whose weights are final, per calibration batch.

    A part is a module of the block that contains a linear and none of the ``pending`` ones (to
    be quantized in this pass or later), taken as high in the module tree as possible. Its output
    for a batch is stored (a copy, with its inputs) in a pass with ``store`` and given
    back, as a fresh copy, in any later pass whose inputs for that part are exactly equal: its
    weights have not changed since, so recomputing would give the same tensors. Parts whose
    inputs or outputs hold anything but tensors and plain values are always recomputed.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.entries: dict[str, dict[int, tuple[Any, Any]]] = {}
        self.batch = 0
        self.hits = 0

    def parts(self, pending: set[str]) -> list[str]:
        """The modules to route through the store in a pass with ``pending`` linears.

        Every module that contains a linear and no pending one is final; of those, the maximal
        ones (storing their outputs saves the most) and any that hold stored outputs while no
        final ancestor does (the final pass reaches ``gate_proj`` stored in the pass before
        through ``mlp``, which has nothing stored).
        """
        names = [n for n, m in self.block.named_modules() if n and _has_linear(m)]
        final = [n for n in names if not any(p == n or p.startswith(n + ".") for p in pending)]

        def ancestors(n: str, among: list[str]) -> list[str]:
            return [a for a in among if n.startswith(a + ".")]

        stored = [n for n in final if self.entries.get(n)]
        return [n for n in final
                if not ancestors(n, stored) and (n in stored or not ancestors(n, final))]

    @contextlib.contextmanager
    def active(self, pending: set[str], store: bool) -> Iterator[None]:
        """Route the final parts' forwards through the store while a pass runs."""
        parts = self.parts(pending)
        for name in list(self.entries):  # reached only through a stored ancestor from now on
            if name not in parts:
                del self.entries[name]
        patched = []
        for name in parts:
            module = self.block.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = self._wrap(name, module.forward, store)
        try:
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    def invalidate(self, changed: list[nn.Module]) -> None:
        """Forget the outputs of parts that contain (or are) one of the ``changed`` modules."""
        for name in list(self.entries):
            inside = set(map(id, self.block.get_submodule(name).modules()))
            if any(id(m) in inside for m in changed):
                del self.entries[name]

    def _wrap(self, name: str, forward: Callable[..., Any], store: bool) -> Callable[..., Any]:
        entries = self.entries.setdefault(name, {})

        def replay(*args: Any, **kwargs: Any) -> Any:
            entry = entries.get(self.batch)
            if entry is not None and _same(entry[0], (args, kwargs)):
                self.hits += 1
                return _copy(entry[1])
            out = forward(*args, **kwargs)
            if store and _storable((args, kwargs)) and _storable(out):
                # inputs by reference: a later in-place change to them can only turn a hit into
                # a miss; the output is copied, the caller may change it in place
                entries[self.batch] = ((args, kwargs), _copy(out))
            return out

        return replay


def _autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Matmuls in ``dtype`` (weights and statistics keep theirs); ``None``: no autocast."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.inference_mode()
def _run_block(block: nn.Module, calib: Calibration, device: torch.device | str, offload: torch.device | str,
               keep: bool, stop_after: list[nn.Module] | None = None,
               autocast: torch.dtype | None = None, replay: _Replay | None = None) -> list[torch.Tensor]:
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
        for index, (hidden, kwargs) in enumerate(zip(calib.hidden, calib.kwargs)):
            if replay is not None:
                replay.batch = index
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
    reuse_outputs: bool = False,
) -> PipelineReport:
    """Quantize ``model`` in place with ``algorithm``; ``samples (N, L)`` are calibration tokens.

    ``calibrate_dtype`` (None: the model's own) runs the calibration forwards under autocast to
    that dtype: the linears' weights, the residual stream and every statistic the algorithm
    collects keep their precision; only the matmul inputs are rounded. On a CPU with native
    bfloat16 this makes the forwards several times faster.

    ``reuse_outputs`` lets a pass over a block take the outputs of its already quantized parts
    from the previous pass (see :class:`_Replay`): same results, fewer FLOPs, more memory.
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
        replay = _Replay(block) if calibrate and reuse_outputs else None
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
                    pending = {n for later in phases[k:] for _, ls in later for n in ls}
                    store = k < len(phases) - 1 or algorithm.block_sequential  # a later pass will come
                    handles = _observe(phase_linears, observers)
                    try:
                        observed = [phase_linears[n] for n in observers]
                        with replay.active(pending, store) if replay else contextlib.nullcontext():
                            outs = _run_block(block, calib, device, offload, keep, observed, calibrate_dtype, replay)
                        fp_outputs = outs if keep else fp_outputs
                    finally:
                        for h in handles:
                            h.remove()
            prevs = [block.get_submodule(g.prev) if g.prev else None for g, _ in phase]
            before = _snapshot([p for p in prevs if p is not None]) if replay is not None else []
            for (group, linears), prev in zip(phase, prevs):
                algorithm.prepare_group(linears, observers, prev)
            for (group, linears), prev in zip(phase, prevs):
                replacements = algorithm.quantize_group(linears, observers, prev)
                for name, module in replacements.items():
                    block.set_submodule(name, module)
                    report.quantized.append(f"{arch.blocks}.{i}.{name}")
            if replay is not None:  # scales folded into a producer change what contains it
                replay.invalidate([m for m, state in before if not _unchanged(m, state)])
        if calibrate and fp_outputs is None:
            with replay.active(set(), store=False) if replay else contextlib.nullcontext():
                calib.hidden = _run_block(block, calib, device, offload, True, autocast=calibrate_dtype, replay=replay)
        elif calibrate:
            calib.hidden = fp_outputs
        if replay is not None:
            log.debug("block %d: %d part outputs reused", i, replay.hits)
        del replay
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

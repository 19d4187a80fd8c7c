"""The generic calibration pipeline: one block at a time, for every architecture in the table.

0. Check the loaded model against its :class:`~quantkit.arch.ArchSpec` row (mixture-of-experts
   layers are first split into one linear per expert, which computes the same): a model that
   does not follow the layout is refused before anything changes (:func:`~quantkit.arch.verify_layout`).
   Planning: every linear gets its scheme, once (:func:`plan_schemes`: the run's, ``skip_layers``,
   the ``layers`` rules and the ``sensitivity`` probe; :mod:`quantkit.layers`); from here on
   everything reads that table.
1. Capture the inputs of block 0 once (hidden states), and the keyword arguments every block
   receives (position embeddings, masks): :func:`~quantkit.calibration.capture_block_inputs`.
   An algorithm that folds scales has each fold probed on every full-precision block first
   (:func:`verify_folds`).
2. For each block: move it to ``device``; for each phase (all linear groups at once, or one
   group after another with ``layer_sequential``) hook the algorithm's observers onto the
   phase's linears, run the calibration inputs through the block, and let the algorithm
   replace the linears; then compute the inputs of the next block (outputs of the quantized
   block with ``block_sequential``, else of the full-precision block, captured before any
   linear changed) and move the block back to ``offload``.
3. An algorithm with a float target (GPTQ's ``float_target``) also gets, for every batch, the
   inputs its linears receive in the full-precision model: a copy of the block taken before any
   linear changed runs first on the full-precision stream (:func:`_float_inputs`), which then
   moves on to the next block next to the quantized one.

Peak memory on ``device``: one block plus one batch of activations; the captured activations
wait on ``offload``. With ``reuse_outputs`` a pass takes the outputs of already quantized block
parts from the previous one (:class:`~quantkit.calibration.Replay`). During the passes that
observe, every expert of a MoE layer computes on every token (:mod:`quantkit.experts`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.algorithms.base import Algorithm
from quantkit.algorithms.fold import FoldTarget, fold_blocker, fold_scales
from quantkit.arch import ArchSpec, LinearGroup, expand_groups, get_blocks, linear_names, verify_layout
from quantkit.calibration import (
    Calibration, Replay, StopForward, capture_block_inputs, map_tensors, snapshot, to_device, unchanged,
)
from quantkit.config import ConfigError, LayerRule, SensitivityConfig
from quantkit.experts import UnfusedExperts, calibrate_all_experts, unfuse_experts
from quantkit.hadamard import input_transform, transformed_input
from quantkit.layers import LayerScheme, SchemeTable, resolve, run_rules
from quantkit.quant_linear import QuantLinear, carry_input_transform

log = logging.getLogger(__name__)

_Replay = Replay  # the name the tests and earlier callers use
PROBE_TOKENS = 16  # sequence length of the batch that probes folds (one sample)

Planned = list[tuple[LinearGroup, dict[str, nn.Linear]]]


def return_free_memory() -> None:
    """Hand the heap memory that freed tensors leave behind back to the OS (glibc's
    ``malloc_trim``; a no-op where the C library has none).

    Calibration allocates and frees tensors of a few MB per linear (weights, Hessians, block
    activations). glibc raises its mmap threshold to the largest block freed so far, so such
    tensors soon come from the heap arenas, and freed arena memory stays in the process: on
    SmolLM2 GPTQ left ~0.7 GB of RSS that no tensor used. Trimming after each phase keeps the
    resident size near what is live; it changes no result.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Matmuls in ``dtype`` (weights and statistics keep theirs); ``None``: no autocast."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def _run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
               device: torch.device | str, offload: torch.device | str, keep: bool,
               stop_after: list[nn.Module] | None = None, autocast: torch.dtype | None = None,
               replay: Replay | None = None, in_place: bool = False,
               before_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Run every calibration batch ``hidden[b]`` (with ``kwargs[b]``) through ``block``; return
    the outputs (on offload) if ``keep``. ``in_place``: write each output over its input in
    ``hidden`` instead, so the inputs and outputs of all batches are never held at once.

    ``autocast``: run the block's matmuls in that dtype (see :func:`quantize_model`).

    Without ``keep``, a batch's forward ends as soon as every module of ``stop_after`` has run
    (their forward hooks registered earlier, the observers, still run first): a phase that
    observes the attention projections does not pay for the MLP.

    ``before_batch(b)`` runs before batch ``b`` enters the block (:func:`_float_inputs`).
    """
    outs, handles = [], []
    if stop_after and not keep:
        pending: set[int] = set()

        def stop(module: nn.Module, _args: tuple, _out: Any) -> None:
            pending.discard(id(module))
            if not pending:
                raise StopForward

        handles = [m.register_forward_hook(stop) for m in stop_after]
    try:
        for index in range(len(hidden)):
            if replay is not None:
                replay.batch = index
            if handles:
                pending.update(id(m) for m in stop_after)
            if before_batch is not None:
                before_batch(index)
            try:
                with _autocast(device, autocast):
                    out = _output(block(hidden[index].to(device), **to_device(kwargs[index], device)))
            except StopForward:
                continue
            if in_place:
                hidden[index] = out.to(offload)
            elif keep:
                outs.append(out.to(offload))
    finally:
        for h in handles:
            h.remove()
    return outs


def _observe(linears: dict[str, nn.Module], observers: dict[str, Any], feed: str = "update") -> list[Any]:
    """Forward hooks that feed each linear's input, flattened to (tokens, in), to its observer's
    ``feed`` method (an observer shared by several linears of a group is fed once, from the first
    of them). A linear with an online Hadamard (a rotated model) multiplies its weight by the
    transformed input: that is what its observer sees."""
    handles, hooked = [], set()
    for name, observer in observers.items():
        if id(observer) in hooked:
            continue
        hooked.add(id(observer))
        def hook(m: nn.Module, args: tuple, _out: Any, take: Any = getattr(observer, feed)) -> None:
            x = transformed_input(m, args[0])
            take(x.reshape(-1, x.shape[-1]))
        handles.append(linears[name].register_forward_hook(hook))
    return handles


@contextlib.contextmanager
def _float_inputs(twin: nn.Module, observers: dict[str, Any], calib: Calibration, kwargs: list[dict[str, Any]],
                  device: torch.device | str, offload: torch.device | str, keep: bool,
                  autocast: torch.dtype | None) -> Iterator[tuple[Callable[[int], None], list[torch.Tensor]]]:
    """``(before_batch, outs)`` for :func:`_run_block`: before each batch ``b`` of a pass over the
    block, ``twin`` (the block as it was before any linear changed) runs on the full-precision
    stream's batch ``b`` and each observer gets its linear's full-precision input of the same
    tokens (``stash_float``, hooked on the linear :func:`_observe` hooks); ``keep``: the twin runs
    to the end and ``outs`` collects its outputs (the full-precision inputs of the next block)."""
    modules = {name: twin.get_submodule(name) for name in observers}
    handles = _observe(modules, observers, feed="stash_float")
    observed = list(modules.values())  # the twin's pass may end once they have all run
    outs: list[torch.Tensor] = []

    def before_batch(index: int) -> None:
        outs.extend(_run_block(twin, calib.fp_hidden[index:index + 1], kwargs[index:index + 1], device, offload,
                               keep, observed, autocast))
    try:
        with calibrate_all_experts(twin):
            yield before_batch, outs
    finally:
        for h in handles:
            h.remove()


@dataclass
class PipelineReport:
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    schemes: SchemeTable | None = None  # every linear's scheme (plan_schemes)


def handled_linears(model: nn.Module, arch: ArchSpec) -> dict[str, int]:
    """Full name -> input width of every linear the pipeline quantizes unless skipped: those of
    the row's groups in every block (experts unfused), then every linear outside the blocks."""
    out = {}
    for index, block in enumerate(get_blocks(model, arch)):
        for groups in expand_groups(block, arch):
            for name in (n for group in groups for n in group.linears):
                module = _submodule(block, name)
                if isinstance(module, nn.Linear):
                    out[f"{arch.blocks}.{index}.{name}"] = module.in_features
    for name in linear_names(model):
        if not name.startswith(arch.blocks + "."):
            out[name] = model.get_submodule(name).in_features
    return out


def plan_schemes(model: nn.Module, arch: ArchSpec, algorithm: Algorithm, skip_layers: tuple[str, ...] = (),
                 layers: tuple[LayerRule, ...] = (), sensitivity: SensitivityConfig | None = None) -> SchemeTable:
    """The planning step: every handled linear's scheme (:func:`quantkit.layers.resolve`). Works on
    a ``meta`` skeleton too (:mod:`quantkit.inputs` checks the rules before any weight loads)."""
    rules = run_rules(layers, sensitivity or SensitivityConfig(), arch.blocks, len(get_blocks(model, arch)))
    return resolve(handled_linears(model, arch), rules, algorithm, skip_layers)


def plan_skeleton(skeleton: nn.Module, arch: ArchSpec, algorithm: Algorithm, skip_layers: tuple[str, ...] = (),
                  layers: tuple[LayerRule, ...] = (), sensitivity: SensitivityConfig | None = None) -> SchemeTable:
    """:func:`plan_schemes` on a model built on the ``meta`` device, before any weight loads: its
    fused experts are first split into linears (in place: the skeleton is a throwaway) so that
    the names are the ones the pipeline will see."""
    _unfuse(get_blocks(skeleton, arch), arch)
    return plan_schemes(skeleton, arch, algorithm, skip_layers, layers, sensitivity)


def plan_block(block: nn.Module, index: int, arch: ArchSpec, table: SchemeTable,
               report: PipelineReport) -> list[Planned]:
    """The groups of ``block`` with the linears to quantize (those ``table`` keeps in full
    precision filtered out), one list per row group of the table (a ``per_expert`` row group
    holds one group per expert). Groups absent from this block (optional ones) come out empty."""
    prefix = f"{arch.blocks}.{index}."
    planned = []
    for groups in expand_groups(block, arch):
        entry = []
        for group in groups:
            present = [n for n in group.linears if _submodule(block, n) is not None]
            if not present:
                continue
            linears = {}
            for name in group.linears:
                if not table[prefix + name].quantized:
                    report.skipped.append(prefix + name)
                else:
                    linears[name] = block.get_submodule(name)
            if group.prev and len(linears) < len(group.linears):
                # a fold into prev would also rescale the input of the full-precision members
                log.debug("%s%s: group has skipped layers; no scale folding into %s", prefix, group.linears, group.prev)
                group = dataclasses.replace(group, prev=None, readers=())
            entry.append((group, linears))
        planned.append(entry)
    return planned


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def fold_target(block: nn.Module, group: LinearGroup, arch: ArchSpec, gqa: bool = False) -> FoldTarget | None:
    """Where ``group``'s scales fold in ``block`` now (under ``layer_sequential`` a linear
    producer may already be a QuantLinear, which :func:`fold_blocker` then reports). None for
    linears with an online Hadamard: a scale folded upstream would act before the transform.
    ``gqa`` (``algo.gqa_fold``): a group with ``heads`` under grouped-query attention gets the
    heads layout, so its scales can be shared over the query heads and folded; without it such
    a group has no fold."""
    if group.prev is None or any(input_transform(block.get_submodule(n)) is not None for n in group.linears):
        return None
    module = block.get_submodule(group.prev)
    is_linear = isinstance(module, (nn.Linear, QuantLinear))
    return FoldTarget(module, 0.0 if is_linear else arch.norm_offset, group.prev_parts,
                      tuple(block.get_submodule(r) for r in group.readers), _kv_heads(block, group) if gqa else None)


def _kv_heads(block: nn.Module, group: LinearGroup) -> tuple[int, int] | None:
    """``(query heads per KV head, head_dim)`` of ``group.heads`` under grouped-query attention
    (None without it, or where the module does not say)."""
    if group.heads is None:
        return None
    attention = _submodule(block, group.heads)
    repeat, dim = getattr(attention, "num_key_value_groups", None), getattr(attention, "head_dim", None)
    if not (isinstance(repeat, int) and isinstance(dim, int)) or repeat <= 1:
        return None
    return repeat, dim


def _unfuse(blocks: nn.ModuleList, arch: ArchSpec) -> list[tuple[nn.Module, nn.Module]]:
    """Replace fused expert tensors by one linear per expert and matrix (same function);
    returns ``(block, fused module)`` pairs for :func:`_refuse`."""
    spec, done = arch.experts, []
    if spec is None:
        return done
    for index, block in enumerate(blocks):
        module = _submodule(block, spec.path)
        if module is None or isinstance(module, UnfusedExperts):
            continue
        try:
            block.set_submodule(spec.path, unfuse_experts(module, spec.gate_up, spec.down))
        except ValueError as exc:
            _refuse(done, spec.path)
            raise ConfigError(f"the model does not follow the {arch.layout} layout: "
                              f"{arch.blocks}.{index}.{spec.path}: {exc}") from None
        done.append((block, module))
    return done


def _refuse(unfused: list[tuple[nn.Module, nn.Module]], path: str) -> None:
    """Put the fused experts back: a refused model is left as it was given."""
    for block, module in unfused:
        block.set_submodule(path, module)


@torch.inference_mode()
def verify_folds(blocks: nn.ModuleList, plans: list[list[Planned]], arch: ArchSpec, probe: Calibration,
                 device: torch.device | str, gqa: bool = False) -> None:
    """Probe every fold the algorithm may make, on float32 copies of the full-precision blocks.

    For each group with a foldable producer, fold random scales ``s`` in ``[0.5, 2]`` into a
    copy of its block: the group's input must become ``x / s`` and the block's output must not
    change (beyond float32 rounding). A producer that is not what the table says (a norm
    computing ``normalize(x) * (1 + weight)`` under a row without ``norm_offset``, a "pre" norm
    whose output also feeds something else) fails one of the two: a ConfigError before any
    block is touched. ``probe`` holds one short batch; block ``i`` gets block ``i-1``'s output.
    """
    hidden = probe.hidden[0].to(device, torch.float32)
    as_float = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    for index, (block, plan) in enumerate(zip(blocks, plans)):
        kwargs = map_tensors(to_device(probe.kwargs[index][0], device), as_float)
        twin = copy.deepcopy(block).to(device, torch.float32)
        groups = [(g, list(ls)) for entry in plan for g, ls in entry
                  if ls and fold_blocker(fold_target(twin, g, arch, gqa), [twin.get_submodule(n) for n in ls]) is None]
        inputs: dict[int, torch.Tensor] = {}

        def run() -> torch.Tensor:
            handles = [twin.get_submodule(names[0]).register_forward_hook(
                lambda _m, args, _o, k=k: inputs.__setitem__(k, args[0].detach().clone()))
                for k, (_, names) in enumerate(groups)]
            try:
                with calibrate_all_experts(twin):
                    return _output(twin(hidden, **kwargs)).clone()
            finally:
                for h in handles:
                    h.remove()

        reference = run()
        before = dict(inputs)
        generator = torch.Generator().manual_seed(index)
        for k, (group, names) in enumerate(groups):
            target = fold_target(twin, group, arch, gqa)
            linears = [twin.get_submodule(n) for n in names]
            state = snapshot([target.module, *linears, *target.readers])
            s = target.share(torch.rand(linears[0].in_features, generator=generator) * 1.5 + 0.5).to(device)
            fold_scales(target, linears, s)
            out = run()
            for module, saved in state:
                module.load_state_dict(dict(zip(module.state_dict(), saved)))
            for what, got, want in (("the input of", inputs[k], before[k] / s), ("the block output for", out, reference)):
                err = float((got - want).abs().max())
                if not err <= 1e-3 * float(want.abs().max()) + 1e-6:
                    raise ConfigError(
                        f"the model does not follow the {arch.layout} layout: folding a scale into "
                        f"{arch.blocks}.{index}.{group.prev} changed {what} {', '.join(group.linears)} by {err:.3g} "
                        "(max abs) in float32, so that module does not produce (only) their input as the "
                        "layout says; set model_type to the layout the model follows or fix its ArchSpec row"
                    )
        hidden = reference
        del twin


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
    layers: tuple[LayerRule, ...] = (),
    sensitivity: SensitivityConfig | None = None,
) -> PipelineReport:
    """Quantize ``model`` in place with ``algorithm``; ``samples (N, L)`` are calibration tokens.

    ``calibrate_dtype`` (None: the model's own) runs the calibration forwards under autocast to
    that dtype: the linears' weights, the residual stream and every statistic the algorithm
    collects keep their precision; only the matmul inputs are rounded. On a CPU with native
    bfloat16 this makes the forwards several times faster.

    ``reuse_outputs`` lets a pass over a block take the outputs of its already quantized parts
    from the previous pass (see :class:`~quantkit.calibration.Replay`): same results, fewer
    FLOPs, more memory.

    ``layers`` (rules) and ``sensitivity`` give linears their own schemes (:func:`plan_schemes`);
    ``report.schemes`` holds the table.

    An algorithm with a float target (``algorithm.float_target > 0``) also keeps the
    full-precision model's activations (a second copy of the calibration activations on
    ``offload``) and runs each block once more in full precision (module doc, step 3).
    """
    report = PipelineReport()
    blocks = get_blocks(model, arch)
    unfused = _unfuse(blocks, arch)
    try:
        verify_layout(model, arch)
        report.schemes = table = plan_schemes(model, arch, algorithm, skip_layers, layers, sensitivity)
        calibrate = table.needs_calibration(algorithm)
        if calibrate and samples is None:
            raise ValueError(f"algo={algorithm.name} needs calibration samples")
        plans = [plan_block(block, i, arch, table, report) for i, block in enumerate(blocks)]
        model.to(offload)
        if calibrate and table.folds_scales(algorithm):
            probe = capture_block_inputs(model, blocks, arch.blocks, samples[:1, :PROBE_TOKENS], device, offload, 1,
                                         progress=False)
            verify_folds(blocks, plans, arch, probe, device, algorithm.gqa_fold)
            del probe
    except (ConfigError, ValueError):
        _refuse(unfused, arch.experts.path if arch.experts else "")
        raise
    del unfused
    calib = capture_block_inputs(model, blocks, arch.blocks, samples, device, offload, batch_size) if calibrate else None
    if calib is not None and algorithm.float_target > 0:
        calib.fp_hidden = list(calib.hidden)  # the two streams part after block 0
    for i, block in enumerate(tqdm(blocks, desc=f"quantize ({algorithm.name})", disable=not progress)):
        block.to(device)
        _quantize_block(block, i, plans[i], arch, algorithm, calib, device, offload, report, calibrate_dtype,
                        reuse_outputs, table)
        plans[i] = []  # it holds the replaced full-precision linears: let them go now, not after the last block
        block.to(offload)
        return_free_memory()
    _quantize_outside_blocks(model, arch, algorithm, table, report)
    return report


def _quantize_block(block: nn.Module, i: int, plan: list[Planned], arch: ArchSpec, algorithm: Algorithm,
                    calib: Calibration | None, device: torch.device | str, offload: torch.device | str,
                    report: PipelineReport, calibrate_dtype: torch.dtype | None, reuse_outputs: bool,
                    table: SchemeTable) -> None:
    """Calibrate and quantize one block (on ``device``); leave the next block's inputs in ``calib``."""
    prefix = f"{arch.blocks}.{i}."
    algorithm.start_block(prefix)

    def schemes(linears: dict[str, nn.Linear]) -> dict[str, LayerScheme]:
        return {n: table[prefix + n] for n in linears}

    entries = [entry for entry in plan if entry]
    phases = entries if algorithm.layer_sequential else [[g for entry in entries for g in entry]]
    kwargs = calib.kwargs[i] if calib is not None else []
    fp_outputs = None
    # the full-precision block, taken before the replay's hooks or any change (float target)
    twin = copy.deepcopy(block) if calib is not None and calib.fp_hidden is not None else None
    fp_next: list[torch.Tensor] | None = None  # the full-precision stream's next inputs
    replay = Replay(block) if calib is not None and reuse_outputs else None
    for k, phase in enumerate(phases):
        observers = {}
        if calib is not None:
            for _, linears in phase:
                observers.update(algorithm.make_group_observers(linears, schemes(linears)))
            phase_linears = {n: lin for _, ls in phase for n, lin in ls.items()}
            # the first pass sees the full-precision block: its outputs feed the next block
            # unless block_sequential asks for the quantized block's outputs
            keep = k == 0 and not algorithm.block_sequential
            if observers or keep:
                pending = {n for later in phases[k:] for _, ls in later for n in ls}
                store = k < len(phases) - 1 or algorithm.block_sequential  # a later pass will come
                handles = _observe(phase_linears, observers)
                paired = twin is not None and bool(observers)
                try:
                    observed = [phase_linears[n] for n in observers]
                    with replay.active(pending, store) if replay else contextlib.nullcontext(), \
                            calibrate_all_experts(block), \
                            _float_inputs(twin, observers, calib, kwargs, device, offload, fp_next is None,
                                          calibrate_dtype) if paired else contextlib.nullcontext((None, None)) \
                            as (before_batch, twin_outs):
                        outs = _run_block(block, calib.hidden, kwargs, device, offload, keep, observed,
                                          calibrate_dtype, replay, before_batch=before_batch)
                    fp_outputs = outs if keep else fp_outputs
                    fp_next = twin_outs if paired and fp_next is None else fp_next
                finally:
                    for h in handles:
                        h.remove()
        targets = [fold_target(block, g, arch, algorithm.gqa_fold) for g, _ in phase]
        producers = [m for t in targets if t is not None for m in (t.module, *t.readers)]
        before = snapshot(producers) if replay is not None else []
        for (group, linears), target in zip(phase, targets):
            algorithm.prepare_group(linears, observers, target, schemes(linears))
        for (group, linears), target in zip(phase, targets):
            replacements = algorithm.quantize_group(linears, observers, target, schemes(linears))
            for name, module in replacements.items():
                module = carry_input_transform(linears[name], module) if name in linears else module
                block.set_submodule(name, module)
                report.quantized.append(f"{arch.blocks}.{i}.{name}")
        if replay is not None:  # scales folded into a producer change what contains it
            replay.invalidate([m for m, state in before if not unchanged(m, state)])
        return_free_memory()
    if calib is not None and fp_outputs is None:
        with replay.active(set(), store=False) if replay else contextlib.nullcontext():
            _run_block(block, calib.hidden, kwargs, device, offload, False, autocast=calibrate_dtype,
                       replay=replay, in_place=True)
    elif calib is not None:
        calib.hidden = fp_outputs
    if twin is not None and fp_next is None:  # no pass ran the full-precision block to the end
        with calibrate_all_experts(twin):
            _run_block(twin, calib.fp_hidden, kwargs, device, offload, False, autocast=calibrate_dtype, in_place=True)
    elif twin is not None:
        calib.fp_hidden = fp_next
    if replay is not None:
        log.debug("block %d: %d part outputs reused", i, replay.hits)


def _quantize_outside_blocks(model: nn.Module, arch: ArchSpec, algorithm: Algorithm,
                             table: SchemeTable, report: PipelineReport) -> None:
    for name in linear_names(model):
        if name.startswith(arch.blocks + "."):
            continue
        if not table[name].quantized:
            report.skipped.append(name)
            continue
        model.set_submodule(name, algorithm.quantize_outside_block(name, model.get_submodule(name), table[name]))
        report.quantized.append(name)

"""Calibration activations for the block-wise pipeline: capturing what every block receives,
and the store that lets a pass reuse outputs of already quantized block parts.

:func:`capture_block_inputs` runs the calibration samples through the model with every decoder
block replaced by a pass-through recorder, so one cheap forward (embeddings only) yields the
hidden states entering block 0 and the keyword arguments *each* block receives (attention
masks and position embeddings may differ per block: sliding-window layers, Gemma 3's local and
global rotary bases). Arguments the model passes to several blocks are stored once.

:class:`Replay`: with ``layer_sequential`` every phase reruns the block from its input, but the
parts of the block whose linears are already quantized compute exactly what they computed in
the previous pass over the same batch. A part (the attention during the MLP phases,
``gate_proj``/``up_proj`` in the final pass) hands back its stored output when its inputs are
equal to the stored ones; the results are identical, the forwards shorter (GPTQ on SmolLM2: 23%
less time), at the memory of those parts' inputs and outputs for all batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.quant_linear import QuantLinear


class StopForward(Exception):
    """Raised by a hook once a forward has produced what is needed (block inputs, observed inputs)."""


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


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
    """Activations entering the current block, one entry per batch, kept on ``offload`` (and,
    for an algorithm with a float target, those of the full-precision model), and the keyword
    arguments of every block: ``kwargs[block][batch]``."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # each (batch, seq, hidden)
    # the same batches entering the current block of the full-precision model (kept only when an
    # algorithm asks for it: Algorithm.float_target)
    fp_hidden: list[torch.Tensor] | None = None
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)


@torch.inference_mode()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, blocks_path: str, samples: torch.Tensor,
    device: torch.device | str, offload: torch.device | str, batch_size: int, progress: bool = True,
) -> Calibration:
    """Run ``samples (N, L)`` through the model with pass-through blocks; keep what block 0
    receives and the keyword arguments of every block (see the module doc)."""
    calib = Calibration(kwargs=[[] for _ in blocks])
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, offloaded), one batch

    def offloaded(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:  # the original is kept in memo, so its id stays unique
            memo[id(t)] = (t, t.to(offload))
        return memo[id(t)][1]

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            stored = map_tensors({k: v for k, v in kwargs.items() if k != "hidden_states"}, offloaded)
            previous = calib.kwargs[index - 1][-1] if index else None
            calib.kwargs[index].append(previous if previous is not None and _identical(previous, stored)
                                       else stored)
            if index == 0:
                calib.hidden.append(hidden.to(offload))
            if index == len(blocks) - 1:
                raise StopForward
            return hidden  # the blocks are skipped; masks and positions do not depend on them

        return forward

    _move_outside(model, blocks_path, device)
    blocks[0].to(device)
    own = [block.__dict__.get("forward") for block in blocks]  # an instance-level forward, if any
    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc="capture", leave=False, disable=not progress):
            memo.clear()
            try:
                model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        memo.clear()
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        blocks[0].to(offload)
        _move_outside(model, blocks_path, offload)
    return calib


def _identical(a: Any, b: Any) -> bool:
    """The same structure holding the very same tensor objects (not merely equal values)."""
    if isinstance(a, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


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
    return map_tensors(obj, lambda t: t.detach().clone())


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


def snapshot(modules: list[nn.Module]) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """Copies of the parameters and buffers of ``modules`` (producers a fold may rescale)."""
    return [(m, _copy(list(m.state_dict().values()))) for m in modules]


def unchanged(module: nn.Module, state: list[torch.Tensor]) -> bool:
    now = list(module.state_dict().values())
    return len(now) == len(state) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(state, now))


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, QuantLinear)) for m in module.modules())


class Replay:
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

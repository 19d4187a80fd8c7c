"""What a launcher decides, as data: the target it plans for and the launches it makes.

Every launcher in :mod:`quantkit.kernels` is split in two: a *planner* that validates nothing
(the public launcher did that), picks tiles and grids for a :class:`Target` and returns the
:class:`Launch` records, and the launcher that runs them. The planner is what the static sm90
inspection (``scripts/inspect_kernels.py``) calls, with tensors on the ``meta`` device and
:data:`H200` as the target, so what it compiles is exactly what the dispatcher selects on a
GPU, with the runtime's specialization of the real arguments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Target:
    """Where the kernels will run.

    ``gpu=False`` is the Triton interpreter (few large block operations are fastest there);
    ``sm_count`` drives the grid heuristics on a GPU (split-K, programs per SM).
    """

    gpu: bool
    sm_count: int = 0
    name: str = "interpreter"

    @classmethod
    def of(cls, device: torch.device) -> Target:
        """The target of tensors on ``device`` (a CUDA GPU, or the interpreter)."""
        if device.type != "cuda":
            return INTERPRETER
        props = torch.cuda.get_device_properties(device)
        return cls(gpu=True, sm_count=props.multi_processor_count, name=props.name)


INTERPRETER = Target(gpu=False)
# Every compiled kernel contracts a * b + c into one FMA, stated rather than left to Triton's
# default (on in Triton 3.9, off from 3.10): the decode GEMV spends one FFMA per weight on it
# (two instructions without), and sm90.compile_spec inspects what this launches. The
# interpreter ignores the option.
FP_FUSION = True
H200 = Target(gpu=True, sm_count=132, name="H200 (sm90)")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``.

    ``info`` carries what the static inspection needs beyond the launch itself, e.g.
    ``weights_per_iter`` (weight elements one program consumes per iteration of its main
    loop) and ``weight_bits`` for the matmul kernels.
    """

    kernel: Any  # a triton JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    info: dict[str, Any] = field(default_factory=dict)

    def run(self) -> None:
        self.kernel[self.grid](
            *self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages,
            enable_fp_fusion=FP_FUSION,
        )


def run_all(launches: list[Launch], device: torch.device) -> None:
    """Run ``launches`` in order on ``device`` (Triton launches on the current CUDA device)."""
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for launch in launches:
            launch.run()

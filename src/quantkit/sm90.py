"""Compile planned kernel launches for an NVIDIA target without a GPU, and measure the code.

A :class:`quantkit.kernels._launch.Launch` (from a planner called with tensors on the
``meta`` device) becomes a :class:`CompileSpec`: the signature, constexprs and
specialization attributes that Triton's runtime would derive from its arguments when the
launch runs (``kernel[grid](*args)``). This reuses Triton's own code for it
(``create_function_from_signature``, the binder the runtime builds per kernel, and
``JITFunction._pack_args``): 16-byte aligned pointers and integers divisible by 16 get
``tt.divisibility = 16``, integers equal to 1 become constexprs. Without these attributes
the compiled code is less vectorized than what really runs.

:func:`inspect_spec` compiles a spec for the target (``triton.compile`` with
``GPUTarget("cuda", capability, 32)``), reruns Triton's ``ptxas`` with Triton's flags and
``-v`` for registers and spills, disassembles the cubin with the bundled ``cuobjdump`` and
returns the metrics of :func:`quantkit.sass.analyze`.

Planning and compiling need real ``JITFunction`` kernels: ``TRITON_INTERPRET`` must be unset
before ``quantkit.kernels`` is imported (run this in a subprocess when interpreting).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.sass import analyze, parse_ptxas_log

ArgPath = tuple[int, ...]  # a (possibly nested) argument index, as Triton keys them


@dataclass(frozen=True)
class CompileSpec:
    """What ``triton.compile`` needs for one kernel variant, as plain data (picklable)."""

    module: str
    name: str
    signature: dict[str, str]
    constexprs: dict[ArgPath, Any]
    attrs: dict[ArgPath, list]
    num_warps: int
    num_stages: int

    @property
    def key(self) -> tuple:
        """The compiled variant: equal keys compile to the same code."""
        attrs = tuple(sorted((k, repr(v)) for k, v in self.attrs.items() if v))
        return (self.module, self.name, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())), attrs,
                self.num_warps, self.num_stages)

    def jit_function(self) -> Any:
        import importlib

        fn = getattr(importlib.import_module(self.module), self.name)
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(
                f"{self.module}.{self.name} is a {type(fn).__name__}, not a JITFunction: unset "
                "TRITON_INTERPRET before quantkit.kernels is imported"
            )
        return fn


def _backend(capability: int) -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


class Specializer:
    """Turns launches into :class:`CompileSpec` as Triton's runtime would (see the module
    docstring), building Triton's argument binder once per kernel."""

    def __init__(self, capability: int = 90) -> None:
        self.capability = capability
        self._binders: dict[int, tuple[Any, Any]] = {}

    def __call__(self, launch: Any) -> CompileSpec:
        from triton.runtime.jit import create_function_from_signature

        fn = launch.kernel
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(
                f"{type(fn).__name__} cannot be compiled: unset TRITON_INTERPRET before "
                "quantkit.kernels is imported"
            )
        if id(fn) not in self._binders:
            backend = _backend(self.capability)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            self._binders[id(fn)] = backend, binder
        backend, binder = self._binders[id(fn)]
        kwargs = dict(launch.constexprs, num_warps=launch.num_warps,
                      num_stages=launch.num_stages)
        bound, specialization, options = binder(*launch.args, **kwargs)
        # the runtime's own packing of the binder output (JITFunction.run -> _pack_args)
        _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                        options)
        return CompileSpec(fn.fn.__module__, fn.fn.__name__, signature, constexprs, attrs,
                           launch.num_warps, launch.num_stages)


def specialize(launch: Any, capability: int = 90) -> CompileSpec:
    """The :class:`CompileSpec` Triton's runtime derives from ``launch``."""
    return Specializer(capability)(launch)


def signature_attrs(signature: dict[str, str], ints: dict[str, int] | None = None,
                    capability: int = 90) -> dict[ArgPath, list]:
    """Specialization attributes of a hand-written signature: every pointer 16-byte aligned
    (as every fresh torch allocation is) and the integers in ``ints`` at those values,
    through Triton's ``native_specialize_impl`` (an integer equal to 1 must be a constexpr of
    the signature instead)."""
    import torch
    from triton.runtime.jit import MockTensor, native_specialize_impl

    backend = _backend(capability)
    ints = ints or {}
    attrs: dict[ArgPath, list] = {}
    for i, (name, ty) in enumerate(signature.items()):
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            arg: Any = MockTensor(torch.uint8)  # data_ptr() == 0: aligned, the dtype is moot
        elif name in ints:
            if ints[name] == 1:
                raise ValueError(f"{name}=1 is specialized to a constexpr by the runtime")
            arg = ints[name]
        else:
            continue
        spec = native_specialize_impl(backend, arg, False, True, True)[1]  # as the binder
        attrs[(i,)] = backend.parse_attr(spec)
    return attrs


def compile_spec(spec: CompileSpec, capability: int = 90) -> Any:
    """``triton.compile`` of ``spec`` for ``sm_<capability>`` (a ``CompiledKernel``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.jit_function(), spec.signature, spec.constexprs, spec.attrs)
    from quantkit.kernels._launch import FP_FUSION

    options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages,
                   enable_fp_fusion=FP_FUSION)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def ptxas_and_sass(ptx: str, capability: int, fp_fusion: bool) -> tuple[str, bytes, str]:
    """``ptxas -v`` log, cubin and ``cuobjdump -sass`` of ``ptx`` with the flags Triton's
    ``make_cubin`` uses (so the cubin is the one Triton builds)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        src.write_text(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]),
               "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(capability)}",
               str(src), "-o", str(out)]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        cubin = out.read_bytes()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(out)], check=True,
                              capture_output=True, text=True).stdout
    return log, cubin, sass


def inspect_spec(spec: CompileSpec, capability: int = 90,
                 weights_per_iter: int | None = None) -> dict[str, Any]:
    """Compile ``spec`` and measure it: ``regs``, ``spill_stores``, ``spill_loads``,
    ``spills_bytes``, ``smem_bytes`` (the dynamic shared memory a launch requests),
    ``cubin_identical`` (our ptxas rerun reproduced Triton's cubin), ``compile_s`` (seconds
    to compile and measure, 0-ish when Triton's cache has the kernel) and the keys of
    :func:`quantkit.sass.analyze`."""
    start = time.perf_counter()
    kernel = compile_spec(spec, capability)
    ptx = kernel.asm["ptx"]
    fp_fusion = bool(getattr(kernel.metadata, "enable_fp_fusion", True))
    log, cubin, sass = ptxas_and_sass(ptx, capability, fp_fusion)
    usage = parse_ptxas_log(log)
    metrics: dict[str, Any] = dict(
        regs=usage["regs"], spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"],
        spills_bytes=usage["spill_stores"] + usage["spill_loads"],
        smem_bytes=int(kernel.metadata.shared), cubin_identical=cubin == kernel.asm["cubin"],
        compile_s=round(time.perf_counter() - start, 2),
    )
    metrics.update(analyze(sass, ptx, num_warps=spec.num_warps,
                           weights_per_iter=weights_per_iter))
    return metrics


def interpreter_unset_env() -> dict[str, str]:
    """This process's environment without ``TRITON_INTERPRET`` (for compile subprocesses),
    with Triton 3.9's default fp fusion made explicit (silences its deprecation warning)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env

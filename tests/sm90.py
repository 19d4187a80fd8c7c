"""Compile Triton kernels for an sm90 (Hopper) target on a machine without a GPU.

``triton.compile`` needs real ``JITFunction`` objects, which only exist when
``TRITON_INTERPRET`` is unset, so the compilation runs in a subprocess with the interpreter
off. A kernel that would not build on a Hopper GPU (bad types, unsupported ops, layout
errors) fails here.

A case is ``(module, kernel_name, signature, constexprs)`` with Triton's signature strings
(``"*fp32"``, ``"i32"``, ``"constexpr"``, ...), optionally followed by ``ints``: the runtime
values of integer arguments. Cases compile with the specialization Triton's runtime applies
to real launches (:func:`quantkit.sm90.signature_attrs`): every pointer is 16-byte aligned
(as every fresh torch allocation is) and the integers in ``ints`` that are multiples of 16 get
``tt.divisibility=16``; integers not given stay unspecialized. ``tests/test_inspect_kernels.py``
compiles the configurations the dispatchers really select, derived from their arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from quantkit.sm90 import interpreter_unset_env

Case = tuple  # (module, name, signature, constexprs[, ints])

_WORKER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantkit.sm90 import signature_attrs

capability = int(sys.argv[1])
target = GPUTarget("cuda", capability, 32)
failures = []
for module, name, signature, constexprs, ints in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), name)
    try:
        attrs = signature_attrs(signature, ints, capability)
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=target,
        )
        assert "cubin" in kernel.asm and len(kernel.asm["cubin"]) > 0
    except Exception as exc:  # report every failing case, not only the first
        failures.append(f"{module}.{name} {constexprs}: {type(exc).__name__}: {exc}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def _normalize(case: Case) -> list[Any]:
    if len(case) == 4:
        return [*case, {}]
    if len(case) == 5:
        return list(case)
    raise ValueError(f"a Case has 4 or 5 entries, got {len(case)}: {case!r}")


def compile_for_cuda(cases: list[Case], capability: int = 90) -> None:
    """Compile every case for ``sm_<capability>``; raise AssertionError listing failures."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(capability)],
        input=json.dumps([_normalize(c) for c in cases]),
        capture_output=True,
        text=True,
        env=interpreter_unset_env(),
        timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"sm{capability} compilation failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )

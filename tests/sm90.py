"""Compile Triton kernels for an sm90 (Hopper) target on a machine without a GPU.

``triton.compile`` needs real ``JITFunction`` objects, which only exist when
``TRITON_INTERPRET`` is unset, so the compilation runs in a subprocess with the interpreter
off. A kernel that would not build on a Hopper GPU (bad types, unsupported ops, layout
errors) fails here.

A case is ``(module, kernel_name, signature, constexprs)`` with Triton's signature strings
(``"*fp32"``, ``"i32"``, ``"constexpr"``, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

Case = tuple[str, str, dict[str, str], dict[str, Any]]

_WORKER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", int(sys.argv[1]), 32)
failures = []
for module, name, signature, constexprs in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), name)
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target
        )
        assert "cubin" in kernel.asm and len(kernel.asm["cubin"]) > 0
    except Exception as exc:  # report every failing case, not only the first
        failures.append(f"{module}.{name} {constexprs}: {type(exc).__name__}: {exc}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def compile_for_cuda(cases: list[Case], capability: int = 90) -> None:
    """Compile every case for ``sm_<capability>``; raise AssertionError listing failures."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(capability)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise AssertionError(f"sm{capability} compilation failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")

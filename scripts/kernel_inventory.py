"""What the Triton kernels a process actually launched compiled to: registers, spills, SASS.

:func:`loaded_kernels` walks the JIT caches of every ``@triton.jit`` function defined in the
imported ``quantkit.kernels`` modules (each holds the ``CompiledKernel`` of every
specialization this process launched) and describes each: launch parameters, the driver's
register and local-memory (spill) counts, shared memory, and a summary of its SASS
(:func:`summarize_sass`: instruction count, global-load widths, shuffles, barriers, MMA kind,
and the same for the loop that issues the most global loads, i.e. the main K loop).

The static inspection of *every* selectable config is ``scripts/inspect_kernels.py``; this is
the view of what really ran, with the runtime's own specialization.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`\((\.L_\w+)\)|(0x[0-9a-f]+))")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")


def cuobjdump_path() -> str | None:
    """The cuobjdump Triton ships (or one on PATH)."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older Triton: look in the package instead
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    from shutil import which

    return which("cuobjdump")


def sass_of_cubin(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (raw text, with addresses)."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], check=True, capture_output=True,
                              text=True, timeout=120).stdout
    finally:
        os.remove(path)


def _load_bits(op: str) -> int | None:
    """Width in bits of a global load opcode (LDG.E.128 -> 128), None if not a load."""
    if not op.startswith("LDG") or op.startswith("LDGSTS") or op.startswith("LDGDEPBAR"):
        return None
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16),
                         (".U8", 8), (".S8", 8)):
        if suffix in op:
            return bits
    return 32


def _mma_kind(ops: list[str]) -> str:
    if any(op.split(".")[0] in ("HGMMA", "QGMMA", "IGMMA") for op in ops):
        return "wgmma"
    if any(op.split(".")[0] in ("HMMA", "IMMA") for op in ops):
        return "mma.sync"
    return "none"


def _stats(ops: list[str]) -> dict[str, Any]:
    loads = Counter(b for b in map(_load_bits, ops) if b is not None)
    return {
        "instructions": len(ops),
        "ldg_bits": {str(k): v for k, v in sorted(loads.items())},
        "ldgsts": sum(op.startswith("LDGSTS") for op in ops),
        "tma": sum(op.startswith("UTMALDG") for op in ops),
        "shfl": sum(op.startswith("SHFL") for op in ops),
        "bar": sum(op.startswith("BAR") for op in ops),
        "mma": _mma_kind(ops),
    }


def summarize_sass(text: str) -> dict[str, Any]:
    """Instruction statistics of one kernel's SASS (first function in ``text``), plus those of
    its main loop: the backward-branch range that issues the most global loads."""
    instrs: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending.clear()
        instrs.append((addr, _PRED.sub("", m.group(2).strip())))
    ops = [ins.split()[0] if ins else "" for _, ins in instrs]
    summary = _stats(ops)
    loops = []
    for i, (addr, ins) in enumerate(instrs):
        b = _BRANCH.search(ins)
        if not b:
            continue
        target = labels.get(b.group(1), -1) if b.group(1) else int(b.group(2), 16)
        if 0 <= target <= addr:
            body = [op for (a, _), op in zip(instrs, ops) if target <= a <= addr]
            loops.append(_stats(body))
    summary["loops"] = len(loops)
    main = max(loops, key=lambda s: (sum(s["ldg_bits"].values()) + s["ldgsts"] + s["tma"],
                                     s["instructions"]), default=None)
    summary["main_loop"] = main
    return summary


def _constexprs(fn: Any, kernel: Any) -> dict[str, Any]:
    """The UPPER_CASE constexpr values this specialization was compiled with."""
    src = getattr(kernel, "src", None)
    consts = getattr(src, "constants", None) or {}
    names = list(getattr(fn, "arg_names", []))
    out = {}
    for key, value in consts.items():
        idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
        if name.isupper() or name.replace("_", "").isupper():
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def describe(fn: Any, kernel: Any, with_sass: bool = True) -> dict[str, Any]:
    """One record of a compiled kernel (see the module docstring)."""
    md = kernel.metadata
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        try:
            kernel._init_handles()  # normally done by its first launch; loads it on the GPU
        except Exception:  # noqa: BLE001 - no driver (CPU): registers stay unknown
            pass
    spills = getattr(kernel, "n_spills", None)
    rec: dict[str, Any] = {
        "kernel": getattr(fn, "__name__", str(fn)),
        "constexprs": _constexprs(fn, kernel),
        "num_warps": getattr(md, "num_warps", None),
        "num_stages": getattr(md, "num_stages", None),
        "regs": getattr(kernel, "n_regs", None),
        "spill_bytes": None if spills is None else 4 * spills,  # the driver reports words
        "smem_bytes": getattr(md, "shared", None),
    }
    if with_sass:
        try:
            rec["sass"] = summarize_sass(sass_of_cubin(kernel.asm["cubin"]))
        except Exception as exc:  # noqa: BLE001 - keep the record, say why SASS is missing
            rec["sass_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return rec


def loaded_kernels(prefix: str = "quantkit.kernels", with_sass: bool = True) -> list[dict[str, Any]]:
    """Records of every compiled specialization in the JIT caches of kernels under ``prefix``."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    seen: set[int] = set()
    records = []
    for name, module in sorted(sys.modules.items()):
        if module is None or not name.startswith(prefix):
            continue
        for obj in list(vars(module).values()):
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # autotune/heuristics
                fn = fn.fn
            if not isinstance(fn, JITFunction) or id(fn) in seen:
                continue
            seen.add(id(fn))
            for entry in list(getattr(fn, "device_caches", {}).values()):
                cache = entry[0] if isinstance(entry, tuple) else entry
                for kernel in list(cache.values()):
                    records.append(describe(fn, kernel, with_sass))
    return records


def inventory_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`loaded_kernels` records."""
    from benchlib import markdown_table

    rows = []
    for r in records:
        s = r.get("sass") or {}
        loop = s.get("main_loop") or {}
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                          if k.startswith(("BLOCK", "SPLIT", "BITS", "DOT", "GROUP", "HAS_ZERO",
                                           "IS_FLOAT", "ACC_INT", "SINGLE")))
        loads = " ".join(f"{b}b:{n}" for b, n in (loop.get("ldg_bits") or {}).items()) or "-"
        rows.append([
            r["kernel"], consts[:140] or "-", r["num_warps"], r["num_stages"],
            "n/a" if r["regs"] is None else r["regs"],
            "n/a" if r["spill_bytes"] is None else r["spill_bytes"],
            "n/a" if r["smem_bytes"] is None else r["smem_bytes"],
            s.get("mma", "n/a"), s.get("instructions", "n/a"), loop.get("instructions", "-"),
            loads, loop.get("shfl", "-"), loop.get("bar", "-"),
            r.get("sass_error", "")[:60],
        ])
    header = ["kernel", "constexprs", "warps", "stages", "regs", "spill bytes", "smem bytes",
              "mma", "SASS instrs", "main-loop instrs", "main-loop LDG (bits:count)",
              "loop SHFL", "loop BAR", "note"]
    return markdown_table(header, rows, [False, False] + [True] * 11 + [False])

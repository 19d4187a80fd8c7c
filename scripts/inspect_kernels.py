"""Static sm90 inspection: every kernel configuration the dispatchers select on an H200,
compiled for Hopper without a GPU, with registers, spills, shared memory and loop metrics.

Method:

1. **Enumerate.** Every launcher of ``quantkit.kernels`` has a *planner* that picks tiles and
   grids for a :class:`~quantkit.kernels._launch.Target` and returns its
   :class:`~quantkit.kernels._launch.Launch` records. This script calls the planners with
   tensors on the ``meta`` device and ``target=H200`` over a grid of problems that exercises
   every branch of each dispatcher. Per launcher the parameters are axes (M in 1..4096 across
   every tile bucket; Llama-7B/8B, 70B and SmolLM2 layer shapes and ragged ones; every weight
   grid int2/3/4/8 with and without zero point, signed and unsigned, fp4, fp8 e4m3/e5m2; per
   tensor / channel / token / group 32, 64, 128 and a ragged 100; x dtypes fp16/bf16/fp32;
   output dtypes, scale layouts, bias) and the problems cover *every pair* of axis values at
   least once (:func:`pairwise`), plus anchors: the W4A16 matmul at every (M, shape), the
   tensor-core paths in every dtype, and every block format at its own block in every M
   bucket and x dtype (:data:`BLOCK_FORMATS`). ``--quick`` varies one axis at a time around a base
   problem instead (:func:`one_at_a_time`): every kernel, every M bucket, every dtype (int4 in
   every zero-point/sign variant), x dtype and group size once, about 130 variants, which
   ``tests/test_inspect_kernels.py`` compiles.
2. **Specialize and deduplicate.** Each launch becomes the signature, constexprs and
   specialization attributes that Triton's runtime derives from its arguments (Triton's own
   binder: aligned pointers and integers divisible by 16 get ``tt.divisibility=16``, integers
   equal to 1 become constexprs; :func:`quantkit.sm90.specialize`). Launches with the same
   compiled key (kernel, signature, constexprs, attributes, warps, stages) are one variant.
3. **Compile and measure** each variant in a pool of worker processes (``TRITON_INTERPRET``
   unset): ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, Triton's ptxas rerun with
   ``-v`` (registers, spill bytes), ``cuobjdump -sass`` of the cubin
   (:func:`quantkit.sm90.inspect_spec`, metrics of :mod:`quantkit.sass`).

Columns:

* ``regs``; ``spills`` = spill store + spill load bytes (``ptxas -v``); ``smem`` = the
  dynamic shared memory the launch requests (bytes).
* ``mma``: ``wgmma`` (HGMMA/IGMMA/QGMMA in the SASS), ``mma.sync`` (HMMA/IMMA) or ``none``.
* ``loads``: bit widths of the global loads (``LDG``, ``LDGSTS`` = cp.async) in the main
  loop, or in the whole kernel when it has no loop. 128 = 16-byte vector loads.
* ``SHFL`` / ``BAR``: shuffles and barriers in one pass of the main loop. The main loop is
  the largest innermost SASS loop (backward ``BRA``) that issues global loads.
* ``SASS/w``: matmul kernels only: SASS instructions per weight element. One pass of the
  main loop has ``loop_insts`` instructions per thread; ptxas may have unrolled it, so the
  unroll factor ``u`` is estimated by comparing the global loads of the PTX loop (which Triton
  emits once per K-tile and ptxas never unrolls) with those of the SASS loop, in the load
  width that moves the most bytes; one PTX iteration consumes ``weights_per_iter`` weight
  elements (``BLOCK_N * BLOCK_K``) over ``32 * num_warps`` threads, so
  ``SASS/w = loop_insts / u / (weights_per_iter / (32 * num_warps))``. Budget: a 4-bit
  weight stream at H200 bandwidth (4.8 TB/s, 132 SMs at ~1.98 GHz issuing 4 warp-instructions
  per clock) leaves about 3.5 thread-instructions per weight element.

Usage::

    python scripts/inspect_kernels.py                   # every selectable config (make inspect)
    python scripts/inspect_kernels.py --quick --json out.json
    python scripts/inspect_kernels.py --kernel dequant_matmul --match "M=1 " --jobs 2
    python scripts/inspect_kernels.py --plan-only       # count problems and variants, no compile
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# every GEMV / tensor-core tile bucket and edge, and the dequantize-then-cuBLAS threshold
MS = (1, 2, 3, 4, 5, 8, 16, 17, 64, 65, 128, 511, 512, 4096)
MS_QUICK = (1, 2, 4, 8, 16, 64, 128, 4096)  # one M per tile bucket (M=1 is a constexpr)
LLAMA_NK = ((4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096))  # Llama-7B/8B
SMOL_NK = ((576, 576), (1536, 576), (576, 1536))  # SmolLM2-135M
RAGGED_NK = ((1000, 1000), (8192, 28672))  # K % 8 != 0; Llama-70B down_proj (rows > 16384)
INT_VARIANTS = ((False, False), (True, True), (True, False), (False, True))  # has_zero, unsigned
# block formats at their own blocks: (kind, gran); gran "b128" is a 2-D block of 128 x 128
BLOCK_FORMATS = ((("mxfp4", False, False), "g32"), (("nvfp4", False, False), "g16"),
                 (("mxfp6_e3m2", False, False), "g32"), (("mxfp6_e2m3", False, False), "g32"),
                 (("mxfp8", False, False), "g32"), (("fp8_block", False, False), "b128"))
METRICS = ("regs", "spills_bytes", "spill_stores", "spill_loads", "smem_bytes", "mma",
           "load_bits", "load_counts", "loop_shuffles", "loop_barriers", "loop_insts", "unroll",
           "sass_per_weight", "total_insts", "cubin_identical", "compile_s")


@dataclass
class Variant:
    """One compiled kernel configuration and every problem that selects it."""

    launcher: str
    spec: Any  # quantkit.sm90.CompileSpec
    info: dict
    problems: list[str] = field(default_factory=list)
    metrics: dict | None = None
    error: str | None = None

    @property
    def kernel(self) -> str:
        return self.spec.name

    def constexprs(self) -> dict[str, Any]:
        names = list(self.spec.signature)
        return {names[p[0]]: v for p, v in self.spec.constexprs.items()}

    def tiles(self) -> str:
        consts = self.constexprs()
        blocks = [f"{k}={v}" for k, v in consts.items() if k.startswith(("BLOCK_", "SPLIT_K"))]
        return " ".join(blocks + [f"warps={self.spec.num_warps}", f"stages={self.spec.num_stages}"])

    def record(self) -> dict[str, Any]:
        """The JSON record: identification, every metric (None when compilation failed)."""
        m = self.metrics or {}
        return dict(
            kernel=self.kernel, launcher=self.launcher,
            config=f"{self.launcher}: {self.problems[0]} [{self.tiles()}]",
            problems=self.problems, **{k: m.get(k) for k in METRICS},
            num_warps=self.spec.num_warps, num_stages=self.spec.num_stages,
            weights_per_iter=self.info.get("weights_per_iter"),
            weight_bits=self.info.get("weight_bits"), constexprs=self.constexprs(),
            error=self.error,
        )


# ------------------------------------------------------------------------------------------
# the problem grid
# ------------------------------------------------------------------------------------------


def pairwise(axes: dict[str, tuple]) -> list[dict[str, Any]]:
    """Problems in which every pair of values of any two axes occurs at least once (greedy
    all-pairs: start from the first uncovered pair, fill each other axis with the value that
    covers the most uncovered pairs). Far fewer than the full product, every interaction of
    two parameters (e.g. each weight grid with each M bucket, each x dtype with each group
    size) still compiled."""
    names = list(axes)
    todo = [((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
            for va in axes[a] for vb in axes[b]]
    uncovered = set(todo)
    used = {(name, v): 0 for name in names for v in axes[name]}
    rows = []
    for first in todo:
        if first not in uncovered:
            continue
        row = dict(first)
        for name in names:
            if name not in row:  # ties: the value used least so far (an even spread)
                row[name] = max(axes[name], key=lambda v: (sum(
                    ((a, row[a]), (name, v)) in uncovered or ((name, v), (a, row[a])) in uncovered
                    for a in row), -used[name, v]))
        uncovered -= {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}
        for name in names:
            used[name, row[name]] += 1
        rows.append({n: row[n] for n in names})
    return rows


def one_at_a_time(base: dict[str, Any], axes: dict[str, tuple]) -> list[dict[str, Any]]:
    """``base`` and every problem that changes one axis of it to another value."""
    rows = [dict(base)]
    for name, values in axes.items():
        rows += [dict(base, **{name: v}) for v in values if v != base[name]]
    return rows


def _kinds(quick: bool) -> tuple[tuple[str, bool, bool], ...]:
    """(dtype, has_zero, unsigned): every dtype and integer variant (``--quick``: int4 in
    every variant, one of each other dtype)."""
    ints = [(name, z, u) for name in ("int2", "int3", "int4", "int8") for z, u in INT_VARIANTS]
    if quick:
        ints = [k for k in ints if k[0] == "int4"] + [("int2", False, False),
                                                     ("int3", True, True), ("int8", False, False)]
    floats = (("fp4", False, False), ("fp8", False, False), ("fp8_e5m2", False, False),
              ("fp6_e3m2", False, False))
    blocks = tuple(kind for kind, _ in BLOCK_FORMATS)
    return tuple(ints) + floats + (blocks[:2] if quick else blocks)


def _scheme(kind: tuple[str, bool, bool], gran: str) -> Any:
    """``gran``: ``per_tensor``, ``per_channel``, ``per_token``, ``g<size>`` or ``b<size>`` (2-D
    blocks of size x size)."""
    from quantkit.scheme import QuantScheme

    name, zero, unsigned = kind
    if gran.startswith("g"):
        return QuantScheme(name, "per_group", int(gran[1:]), zero, unsigned)
    if gran.startswith("b"):
        return QuantScheme(name, "per_group", int(gran[1:]), zero, unsigned, block_rows=int(gran[1:]))
    return QuantScheme(name, gran, -1, zero, unsigned)


def _valid(p: dict[str, Any]) -> bool:
    """Whether a problem's grid and granularity make a scheme (2-D blocks have no zero point)."""
    if "kind" not in p:
        return True
    try:
        _scheme(p["kind"], p["gran"])
    except ValueError:
        return False
    return True


W4 = ("int4", True, True)  # the GPTQ/AWQ weight grid (asymmetric, unsigned codes), group 128
X_DTYPES = ("fp16", "bf16", "fp32")
W_GRANS = ("per_tensor", "per_channel", "g16", "g32", "g64", "g128", "g100", "b128")
ROWS = (1, 3, 16, 17, 128, 4096, 14336)
COLS = (576, 1000, 1536, 4096, 11008, 14336, 28672)


def grid(quick: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(launcher, problem parameters) of the whole grid: all pairs of parameter values per
    launcher (one parameter at a time around a base with ``quick``), plus anchors."""
    kinds = _kinds(quick)
    ms = MS_QUICK if quick else MS
    nks = (LLAMA_NK[:2] + SMOL_NK[:1] + RAGGED_NK[:1]) if quick else (LLAMA_NK + SMOL_NK
                                                                       + RAGGED_NK)
    cover = (lambda base, axes: one_at_a_time(base, axes)) if quick else \
        (lambda base, axes: pairwise(axes))

    mm = dict(kind=kinds, gran=W_GRANS, x=X_DTYPES, M=ms, nk=nks, bias=(False, True))
    mm_base = dict(kind=W4, gran="g128", x="fp16", M=1, nk=LLAMA_NK[0], bias=False)
    anchors = [dict(mm_base, M=M, nk=nk) for nk in (nks if not quick else LLAMA_NK[:2])
               for M in (ms if not quick else (1,))]
    anchors += [dict(mm_base, x=x, M=M) for x in X_DTYPES for M in (16, 128, 4096)]  # dots
    anchors += [dict(mm_base, kind=kind, gran=gran, x=x, M=M, nk=nk)  # block formats, own blocks
                for kind, gran in BLOCK_FORMATS for x in (X_DTYPES[:2] if not quick else ("fp16",))
                for M in ((1, 4, 16, 128, 4096) if not quick else (1, 16, 128))
                for nk in ((LLAMA_NK[0], SMOL_NK[0]) if not quick else (LLAMA_NK[0],))]
    for p in filter(_valid, cover(mm_base, mm) + anchors):
        yield "quant_linear_matmul", p

    sm = dict(code=("int8", "fp8"), out=X_DTYPES, M=ms, nk=nks, x_scale=("token", "tensor"),
              w_scale=("channel", "tensor"), bias=(False, True))
    sm_base = dict(code="int8", out="fp16", M=1, nk=LLAMA_NK[0], x_scale="token",
                   w_scale="channel", bias=False)
    anchors = [dict(sm_base, code=c, M=M) for c in ("int8", "fp8") for M in (16, 64, 4096)]
    anchors += [dict(sm_base, out="int32", M=M) for M in (1, 4096)]  # int8's raw accumulator
    anchors.append(dict(sm_base, M=64, nk=RAGGED_NK[0], out="bf16"))  # K % 16 != 0, GEMM tile
    for p in cover(sm_base, sm) + anchors:
        yield "scaled_mm", p

    rows = (1, 16, 4096, 14336) if quick else ROWS
    cols = (576, 4096, 14336, 28672) if quick else COLS
    q = dict(kind=kinds, gran=("per_token", "per_tensor") + W_GRANS[1:], given=(False, True),
             x=X_DTYPES, rows=rows, cols=cols)
    q_base = dict(kind=("int8", False, False), gran="per_token", given=False, x="fp16",
                  rows=16, cols=4096)
    q_anchors = [dict(q_base, kind=kind, gran=gran, given=given, rows=r)
                 for kind, gran in BLOCK_FORMATS for given in ((False, True) if not quick else (False,))
                 for r in ((16, 4096) if not quick else (4096,))]
    for p in filter(_valid, cover(q_base, q) + q_anchors):
        yield "quantize_with_qparams" if p["given"] else "quantize", p
    dq = dict(kind=kinds, gran=q["gran"], out=X_DTYPES, rows=rows, cols=cols)
    dq_anchors = [dict(q_base, out="bf16", kind=kind, gran=gran) for kind, gran in BLOCK_FORMATS]
    for p in filter(_valid, cover(dict(q_base, out="fp16"), dq) + dq_anchors):
        yield "dequantize", p
    pk = dict(bits=(2, 3, 4, 6, 8), signed=(False, True), rows=(1, 16, 17, 4096, 14336),
              cols=(32, 41, 72, 576, 1000, 4096, 14336, 28672))
    for p in cover(dict(bits=4, signed=False, rows=4096, cols=4096), pk):
        yield "pack_codes", p
        yield "unpack_codes", p
    # SmoothQuant's per-token kernel takes float scales only (no block formats)
    sq_kinds = tuple(k for k in kinds if k not in dict(BLOCK_FORMATS))
    sq = dict(kind=sq_kinds, x=X_DTYPES, smooth=X_DTYPES, M=(1, 2, 3, 8, 16, 17, 4096), K=cols)
    for p in cover(dict(kind=("int8", False, False), x="fp16", smooth="fp16", M=16, K=4096), sq):
        yield "smooth_quantize_per_token", p
    # the online Hadamard: power-of-two widths and K x 2^j ones (SmolLM2 576 = 36 x 16, 1536 =
    # 12 x 128; Llama-2 11008 = 172 x 64; Llama-3 14336 = 28 x 512; 2^15 = 2 x 16384), alone or
    # fused with a per-token quantization (int4/int8 W4A4/W8A8 grids)
    hq = dict(quant=("none", "int8", "int4", "int4-asym", "fp8"), x=X_DTYPES,
              M=(1, 16, 4096) if quick else (1, 2, 16, 17, 4096),
              n=(576, 1536, 4096, 14336) if quick else (576, 1536, 4096, 11008, 14336, 32768))
    for p in cover(dict(quant="none", x="fp16", M=16, n=4096), hq):
        yield "hadamard", p


def _dt(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            "int32": torch.int32}[name]


def plan(launcher: str, p: dict[str, Any]) -> tuple[str, list]:
    """The problem's label and the launches its planner returns for an H200 (meta tensors)."""
    import torch

    from quantkit.kernels import dequantize, int8_matmul, matmul, pack, quantize, smooth_quant
    from quantkit.kernels._launch import H200
    from quantkit.packing import packed_cols

    def empty(*shape: int, dtype: Any) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    if launcher == "quant_linear_matmul":
        from quantkit.quant_linear import SCALE_STORAGE

        w, (N, K), M = _scheme(p["kind"], p["gran"]), p["nk"], p["M"]
        rows, groups = w.scale_shape(N, K)
        qzeros = empty(rows, packed_cols(groups, w.bits), dtype=torch.uint8) if w.has_zero \
            else None
        qweight = empty(N, packed_cols(K, w.bits), dtype=torch.uint8)
        scales = empty(rows, groups, dtype=SCALE_STORAGE[w.scale_format])  # as QuantLinear stores them
        glob = empty(1, 1, dtype=torch.float32) if w.has_global_scale else None
        if matmul.dequantizes_first(M, H200):  # the weight dequantized once, then cuBLAS
            _, launches = matmul.plan_dequantize_packed(qweight, scales, qzeros, w, K,
                                                        _dt(p["x"]), H200, glob)
        else:
            _, launches = matmul.plan_quant_linear_matmul(
                empty(M, K, dtype=_dt(p["x"])), qweight, scales, qzeros,
                empty(N, dtype=torch.float16) if p["bias"] else None, w, H200, global_scale=glob)
        return (f"M={M} N={N} K={K} w={w.describe()} x={p['x']}{' bias' if p['bias'] else ''}",
                launches)
    if launcher == "scaled_mm":
        (N, K), M = p["nk"], p["M"]
        code = torch.int8 if p["code"] == "int8" else torch.float8_e4m3fn
        _, launches = int8_matmul.plan_scaled_mm(
            empty(M, K, dtype=code), empty(M if p["x_scale"] == "token" else 1, 1,
                                           dtype=torch.float32),
            empty(N, K, dtype=code), empty(N if p["w_scale"] == "channel" else 1, 1,
                                           dtype=torch.float16),  # QuantLinear's fp16 scales
            empty(N, dtype=torch.float16) if p["bias"] else None, _dt(p["out"]), H200)
        return (f"M={M} N={N} K={K} {p['code']} out={p['out']} x_scale={p['x_scale']} "
                f"w_scale={p['w_scale']}{' bias' if p['bias'] else ''}", launches)
    if launcher in ("quantize", "quantize_with_qparams", "dequantize"):
        s, (rows, cols) = _scheme(p["kind"], p["gran"]), (p["rows"], p["cols"])
        shape = s.scale_shape(rows, cols)
        scale = empty(*shape, dtype=torch.float32)
        zero = empty(*shape, dtype=torch.int32) if s.has_zero else None
        if launcher == "dequantize":
            codes = empty(rows, cols, dtype=quantize.codes_dtype(s))
            _, launches = dequantize.plan_dequantize(codes, scale, zero, s, _dt(p["out"]), H200)
            return f"({rows}, {cols}) {s.describe()} out={p['out']}", launches
        x = empty(rows, cols, dtype=_dt(p["x"]))
        if launcher == "quantize":
            launches = quantize.plan_quantize(x, s, H200)[-1]
        else:
            launches = quantize.plan_quantize_with_qparams(x, scale, zero, s, H200)[-1]
        return f"({rows}, {cols}) {s.describe()} x={p['x']}", launches
    if launcher in ("pack_codes", "unpack_codes"):
        rows, cols, bits, signed = p["rows"], p["cols"], p["bits"], p["signed"]
        label = f"({rows}, {cols}) int{bits} {'signed' if signed else 'unsigned'}"
        if launcher == "pack_codes":
            codes = empty(rows, cols, dtype=torch.int8 if signed else torch.uint8)
            return label, pack.plan_pack_codes(codes, bits, H200)[1]
        packed = empty(rows, packed_cols(cols, bits), dtype=torch.uint8)
        return label, pack.plan_unpack_codes(packed, bits, cols, signed, H200)[1]
    if launcher == "hadamard":
        from quantkit.hadamard import factor
        from quantkit.kernels import hadamard

        M, n = p["M"], p["n"]
        chunks, _ = factor(n)
        x = empty(M, n, dtype=torch.float32 if chunks > 1 else _dt(p["x"]))  # mixed rows: fp32
        kinds = {"int8": ("int8", False, False), "int4": ("int4", False, False),
                 "int4-asym": ("int4", True, False), "fp8": ("fp8", False, False)}
        s = None if p["quant"] == "none" else _scheme(kinds[p["quant"]], "per_token")
        _, launches = hadamard.plan_hadamard(x, chunks, _dt(p["x"]), H200, s)
        return (f"M={M} n={n} x={p['x']} {'transform' if s is None else s.describe()}",
                launches)
    s, M, K = _scheme(p["kind"], "per_token"), p["M"], p["K"]
    launches = smooth_quant.plan_smooth_quantize_per_token(
        empty(M, K, dtype=_dt(p["x"])), empty(K, dtype=_dt(p["smooth"])), s, H200)[-1]
    return f"M={M} K={K} {s.describe()} x={p['x']} smooth={p['smooth']}", launches


def collect(quick: bool, kernel: list[str], match: str | None) -> tuple[list[Variant], int]:
    """Unique variants of the grid (filtered by kernel/launcher name and label substring) and
    the number of (problem, launch) pairs they stand for."""
    from quantkit.sm90 import Specializer

    specialize = Specializer(90)
    variants: dict[tuple, Variant] = {}
    n = 0
    for launcher, params in grid(quick):
        label, launches = plan(launcher, params)
        if match is not None and match not in label:
            continue
        for launch in launches:
            name = launch.kernel.fn.__name__
            if kernel and not any(k in name or k in launcher for k in kernel):
                continue
            spec = specialize(launch)
            v = variants.setdefault(spec.key, Variant(launcher, spec, dict(launch.info)))
            v.problems.append(label)
            n += 1
    return list(variants.values()), n


# ------------------------------------------------------------------------------------------
# compile, measure, report
# ------------------------------------------------------------------------------------------


def inspect_all(variants: list[Variant], jobs: int) -> None:
    """Compile and measure every variant in ``jobs`` worker processes (errors recorded)."""
    from quantkit.sm90 import inspect_spec

    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(inspect_spec, v.spec, 90, v.info.get("weights_per_iter"))
                   for v in variants]
        for v, fut in zip(variants, futures):
            try:
                v.metrics = fut.result()
            except Exception as exc:  # report every failing variant, not only the first
                v.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(records: list[dict]) -> str:
    """The markdown table of ``records`` (one row per compiled configuration)."""
    head = ("| kernel | config | regs | spills | smem | mma | loads | SHFL | BAR | SASS/w |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        if r["error"]:
            rows.append(f"| {r['kernel']} | {r['config']} | FAILED: {r['error'][:200]} |"
                        " | | | | | | |")
            continue
        more = len(r["problems"]) - 1
        config = r["config"] + (f" (+{more} problems)" if more else "")
        cells = [r["kernel"], config, r["regs"], r["spills_bytes"], r["smem_bytes"], r["mma"],
                 r["load_bits"], r["loop_shuffles"], r["loop_barriers"], r["sass_per_weight"]]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join([head, *rows])


def _problem(r: dict) -> str:
    return r["problems"][0]


def summary(records: list[dict]) -> str:
    """Markdown: one row per kernel (configs, worst registers, spills, shared memory, MMA kinds,
    load widths, loop shuffles/barriers, SASS per weight element), then the decode GEMV's SASS
    per weight element on 4096 x 4096 float16 problems, one row per weight grid and M."""
    ok = [r for r in records if not r["error"]]
    head = ("| kernel | configs | max regs | configs spilling | max smem B | mma | load bits "
            "| max loop SHFL | max loop BAR | SASS/w min-max |\n|---|---:|---:|---:|---:|---|---|---:|---:|---|")
    rows = []
    for kernel in sorted({r["kernel"] for r in records}):
        rs = [r for r in ok if r["kernel"] == kernel]
        failed = sum(1 for r in records if r["kernel"] == kernel and r["error"])
        if not rs:
            rows.append(f"| {kernel} | {failed} failed | | | | | | | | |")
            continue
        sass = [r["sass_per_weight"] for r in rs if r["sass_per_weight"] is not None]
        cells = [kernel, f"{len(rs)}" + (f" (+{failed} failed)" if failed else ""), max(r["regs"] for r in rs),
                 sum(1 for r in rs if r["spills_bytes"]), max(r["smem_bytes"] for r in rs),
                 ",".join(sorted({r["mma"] for r in rs})), sorted({b for r in rs for b in r["load_bits"]}),
                 max((r["loop_shuffles"] or 0) for r in rs), max((r["loop_barriers"] or 0) for r in rs),
                 f"{min(sass):.2f}-{max(sass):.2f}" if sass else None]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    gemv = sorted((r for r in ok if r["kernel"] == "_dequant_gemv_kernel" and "N=4096 K=4096" in _problem(r)
                   and "x=fp16" in _problem(r)), key=lambda r: (r["constexprs"].get("BLOCK_M", 0), _problem(r)))
    lines = ["| problem | regs | loads | loop SHFL | SASS/w |", "|---|---:|---|---:|---:|"]
    lines += [f"| {_problem(r)} | {r['regs']} | {_cell(r['load_bits'])} | {_cell(r['loop_shuffles'])} "
              f"| {_cell(r['sass_per_weight'])} |" for r in gemv]
    return "\n".join([head, *rows, "", "Decode GEMV, 4096 x 4096, float16 activations:", "", *lines]) + "\n"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write one record per kernel config here")
    parser.add_argument("--quick", action="store_true", help="the representative subset (tests)")
    parser.add_argument("--kernel", action="append", default=[],
                        help="only kernels or launchers whose name contains this (repeatable)")
    parser.add_argument("--match", help="only problems whose label contains this text")
    parser.add_argument("--jobs", type=_positive, default=os.cpu_count() or 1,
                        help="compile processes (default: all CPUs)")
    parser.add_argument("--summary", type=Path, help="write the per-kernel summary (markdown) here")
    parser.add_argument("--plan-only", action="store_true",
                        help="count problems and unique configs per kernel, compile nothing")
    args = parser.parse_args(argv)

    # planners must return real JITFunctions: the interpreter stays off in this process
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if "quantkit.kernels" in sys.modules:
        raise RuntimeError("quantkit.kernels was imported before TRITON_INTERPRET was unset")

    t0 = time.perf_counter()
    variants, n = collect(args.quick, args.kernel, args.match)
    variants.sort(key=lambda v: (v.kernel, v.problems[0]))
    per_kernel: dict[str, int] = {}
    for v in variants:
        per_kernel[v.kernel] = per_kernel.get(v.kernel, 0) + 1
    counts = ", ".join(f"{k} {c}" for k, c in sorted(per_kernel.items()))
    print(f"{n} launches of the grid -> {len(variants)} unique sm90 configs ({counts}); "
          f"planned in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.plan_only:
        return 0
    t1 = time.perf_counter()
    inspect_all(variants, args.jobs)
    elapsed = time.perf_counter() - t1
    records = [v.record() for v in variants]
    failed = [r for r in records if r["error"]]
    print(table(records))
    print(f"\n{len(records)} configs compiled for sm90 in {elapsed:.0f} s with {args.jobs} "
          f"processes; {len(failed)} failed; "
          f"{sum(1 for r in records if r['spills_bytes'])} spill", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    if args.summary:
        args.summary.write_text(summary(records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Static metrics of compiled GPU code: SASS (``cuobjdump -sass``), PTX and ``ptxas -v`` text.

Pure text parsing, no GPU and no Triton needed: :mod:`quantkit.sm90` produces the texts and
``scripts/inspect_kernels.py`` tabulates the metrics. What is measured (see that script's
docstring for how to read the numbers):

* registers and spill bytes (stores + loads) from the ``ptxas -v`` log;
* the MMA kind: ``wgmma`` (Hopper warpgroup MMA: ``HGMMA``/``IGMMA``/``QGMMA``), ``mma.sync``
  (``HMMA``/``IMMA``/``QMMA``/``DMMA``) or ``none``;
* the *main loop*: loops are backward branches (``BRA`` to an earlier address) of the SASS;
  among the innermost ones, the main loop is the largest that issues global loads (the
  K-loop that streams the weight), else the largest; its instruction count, the bit widths of
  its global loads (``LDG``, and ``LDGSTS``: cp.async), its shuffles (``SHFL``) and barriers
  (``BAR``);
* the *unroll factor* of that loop: ptxas may unroll a loop, PTX never is (Triton emits one
  loop iteration per K-tile). The same rule picks the PTX main loop; per load width the SASS
  loop has ``unroll`` times as many global loads as the PTX loop, and the width class that
  moves the most bytes in PTX (the operand streams, which ptxas cannot merge; narrow
  duplicate loads of one address can be merged) gives ``unroll = round(sass / ptx)``;
* instructions per weight element: ``loop instructions / unroll`` is one PTX iteration per
  thread; one iteration consumes ``weights_per_iter`` weight elements over
  ``32 * num_warps`` threads, so ``sass_per_weight = loop_insts / unroll /
  (weights_per_iter / (32 * num_warps))``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_SASS_LINE = re.compile(
    r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)"
    r"(?P<rest>[^;]*);"
)
_HEX = re.compile(r"0x([0-9a-f]+)")
_PTX_LABEL = re.compile(r"^\s*(\$?[A-Za-z_][\w$]*):")
_PTX_BRANCH = re.compile(r"^\s*(?:@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$?[\w$]+)\s*;")
_PTX_LOAD = re.compile(r"\bld\.global\S*")
_PTX_CP_ASYNC = re.compile(  # cp.async.cg.shared.global [dst], [src], <bytes>
    r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],"
    r"\s*(0x[0-9a-f]+|\d+)"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_WGMMA = ("HGMMA", "IGMMA", "QGMMA", "GMMA")
_MMA_SYNC = ("HMMA", "IMMA", "QMMA", "DMMA", "BMMA")
_GLOBAL_LOADS = ("LDG", "LDGSTS")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: ``addr`` in bytes, ``op`` with its modifiers (``LDG.E.128``)."""

    addr: int
    op: str
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        """The opcode without modifiers (``LDG``)."""
        return self.op.split(".", 1)[0]


@dataclass(frozen=True)
class Loop:
    """Instructions ``[start, end]`` (indices into the instruction list; ``end`` branches back
    to ``start``)."""

    start: int
    end: int

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    def __len__(self) -> int:
        return self.end - self.start + 1


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output (one kernel), in address order."""
    insts = []
    for m in _SASS_LINE.finditer(text):
        pred = (m.group("pred") or "").strip()
        insts.append(Instruction(int(m.group("addr"), 16), m.group("op"), m.group("rest").strip(),
                                 pred))
    return insts


def find_loops(insts: list[Instruction]) -> list[Loop]:
    """Loops of the SASS: a branch to an earlier address closes one (a branch to itself is the
    trap at the end of a kernel, not a loop). Back edges to one header are one loop."""
    index = {inst.addr: i for i, inst in enumerate(insts)}
    ends: dict[int, int] = {}
    for i, inst in enumerate(insts):
        if inst.base not in ("BRA", "JMP"):
            continue
        m = _HEX.search(inst.operands)
        if m is None:
            continue
        target = int(m.group(1), 16)
        if target < inst.addr and target in index:
            start = index[target]
            ends[start] = max(ends.get(start, i), i)
    return [Loop(s, e) for s, e in sorted(ends.items())]


def innermost(loops: list[Loop]) -> list[Loop]:
    """The loops that contain no other loop."""
    return [lp for lp in loops if not any(lp.contains(other) for other in loops)]


def global_load_bits(inst: Instruction) -> int | None:
    """Bits one thread moves with a global load (``LDG``/``LDGSTS``), else None."""
    if inst.base not in _GLOBAL_LOADS:
        return None
    mods = inst.op.split(".")[1:]
    for mod in mods:
        if mod in ("64", "128"):
            return int(mod)
        if mod in ("U8", "S8"):
            return 8
        if mod in ("U16", "S16"):
            return 16
    return 32


def main_loop(insts: list[Instruction]) -> Loop | None:
    """The innermost loop with global loads and the most instructions (else the largest
    innermost loop; None without loops)."""
    loops = innermost(find_loops(insts))
    if not loops:
        return None

    def key(lp: Loop) -> tuple[bool, int]:
        body = insts[lp.start:lp.end + 1]
        return any(global_load_bits(i) is not None for i in body), _count(body)

    return max(loops, key=key)


def _count(body: list[Instruction]) -> int:
    """Issued instructions (``NOP`` padding excluded)."""
    return sum(1 for inst in body if inst.base != "NOP")


def mma_kind(insts: list[Instruction]) -> str:
    """``wgmma``, ``mma.sync`` or ``none``: the tensor-core instructions the kernel uses."""
    bases = {inst.base for inst in insts}
    if bases.intersection(_WGMMA):
        return "wgmma"
    if bases.intersection(_MMA_SYNC):
        return "mma.sync"
    return "none"


# ------------------------------------------------------------------------------------------
# PTX
# ------------------------------------------------------------------------------------------


def ptx_load_bits(line: str) -> int | None:
    """Bits of a PTX global load (``ld.global[.v2|.v4].<type>`` or ``cp.async ... , N``)."""
    m = _PTX_CP_ASYNC.search(line)
    if m is not None:
        return int(m.group(1), 0) * 8  # the copy size in bytes (Triton writes 0x10)
    m = _PTX_LOAD.search(line)
    if m is None:
        return None
    mods = m.group(0).split(".")
    vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d", x)), 1)
    bits = next((int(x[1:]) for x in mods if re.fullmatch(r"[bsuf]\d+", x)), 32)
    return vec * bits


def ptx_loop_loads(ptx: str) -> Counter[int]:
    """Global loads per width (bits) in the PTX main loop (the innermost ``bra``-back loop
    with loads and the most lines); empty without loops."""
    lines = [ln.split("//", 1)[0] for ln in ptx.splitlines()]
    labels = {}
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    ends: dict[int, int] = {}
    for i, line in enumerate(lines):
        m = _PTX_BRANCH.match(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            start = labels[m.group(1)]
            ends[start] = max(ends.get(start, i), i)
    loops = innermost([Loop(s, e) for s, e in ends.items()])
    if not loops:
        return Counter()

    def loads(lp: Loop) -> Counter[int]:
        widths = (ptx_load_bits(line) for line in lines[lp.start:lp.end + 1])
        return Counter(w for w in widths if w is not None)

    best = max(loops, key=lambda lp: (sum(loads(lp).values()) > 0, len(lp)))
    return loads(best)


def unroll_factor(sass_loads: Counter[int], ptx_loads: Counter[int]) -> int:
    """How many PTX iterations one pass of the SASS loop executes (see the module docstring):
    the ratio of loads in the width class that moves the most bytes in the PTX loop."""
    if not ptx_loads:
        return 1
    width = max(ptx_loads, key=lambda w: (w * ptx_loads[w], w))
    return max(1, round(sass_loads.get(width, 0) / ptx_loads[width]))


# ------------------------------------------------------------------------------------------
# ptxas -v and the summary
# ------------------------------------------------------------------------------------------


def parse_ptxas_log(log: str) -> dict[str, int]:
    """``regs``, ``stack_bytes``, ``spill_stores``, ``spill_loads`` from ``ptxas -v`` output."""
    regs = _PTXAS_REGS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if regs is None or spills is None:
        raise ValueError(f"no register/spill report in the ptxas log:\n{log}")
    stack, stores, loads = (int(g) for g in spills.groups())
    return dict(regs=int(regs.group(1)), stack_bytes=stack, spill_stores=stores,
                spill_loads=loads)


def analyze(
    sass: str, ptx: str, *, num_warps: int, weights_per_iter: int | None = None
) -> dict[str, object]:
    """Metrics of one kernel's SASS (see the module docstring).

    Keys: ``mma``, ``has_loop``, ``loop_insts`` (one pass of the SASS main loop), ``unroll``,
    ``load_bits`` (sorted widths of the global loads in the main loop, or in the whole kernel
    when it has no loop), ``load_counts`` (``{"bits": count}`` of those loads),
    ``loop_shuffles``, ``loop_barriers`` (None without a loop),
    ``sass_per_weight`` (None without a loop or without ``weights_per_iter``), ``total_insts``.
    """
    insts = parse_sass(sass)
    if not insts:
        raise ValueError("no SASS instructions found")
    loop = main_loop(insts)
    body = insts if loop is None else insts[loop.start:loop.end + 1]
    widths = Counter(w for w in map(global_load_bits, body) if w is not None)
    out: dict[str, object] = dict(
        mma=mma_kind(insts), has_loop=loop is not None, total_insts=_count(insts),
        load_bits=sorted(widths), load_counts={str(w): widths[w] for w in sorted(widths)},
        loop_insts=None, unroll=None, loop_shuffles=None, loop_barriers=None,
        sass_per_weight=None,
    )
    if loop is None:
        return out
    unroll = unroll_factor(widths, ptx_loop_loads(ptx))
    n = _count(body)
    out.update(
        loop_insts=n, unroll=unroll,
        loop_shuffles=sum(1 for i in body if i.base == "SHFL"),
        loop_barriers=sum(1 for i in body if i.base == "BAR"),
    )
    if weights_per_iter:
        per_thread = weights_per_iter / (32 * num_warps)
        out["sass_per_weight"] = round(n / unroll / per_thread, 3)
    return out

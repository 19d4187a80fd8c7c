"""quantkit.sass: SASS / PTX / ptxas-log parsing on small handwritten snippets (no GPU, no
Triton). The layout is that of ``cuobjdump -sass`` (one instruction per ``/*addr*/`` line,
encodings in trailing comments) and of Triton's PTX."""

from __future__ import annotations

from collections import Counter

import pytest

from quantkit import sass


def _sass(*lines: str) -> str:
    """cuobjdump layout: header, then ``/*addr*/ inst ; /* encoding */`` and an encoding line."""
    out = ["\n\tcode for sm_90a\n\t\tFunction : _k\n"]
    for i, line in enumerate(lines):
        out.append(f"        /*{16 * i:04x}*/ {line:>40} ;   /* 0x000fe20000000f00 */\n")
        out.append("                                                 /* 0x000fca0008000f00 */\n")
    return "".join(out)


# a 2x unrolled main loop (0x30..0xa0) streaming 128-bit loads, a small loop without loads
# (0xc0..0xd0) and the trap loop at the end that branches to itself
KERNEL = _sass(
    "MOV R1, c[0x0][0x28]",                       # 0x00
    "S2R R0, SR_TID.X",                           # 0x10
    "@!P0 BRA 0xb0",                              # 0x20
    "LDG.E.128 R4, desc[UR4][R2.64]",             # 0x30 loop head
    "LDG.E.128 R8, desc[UR4][R2.64+0x10]",        # 0x40
    "@P2 LDG.E.U16 R12, desc[UR4][R14.64]",       # 0x50
    "SHFL.BFLY PT, R3, R2, 0x1, 0x1f",            # 0x60
    "BAR.SYNC.DEFER_BLOCKING 0x0",                # 0x70
    "HFMA2 R16, R4, R8, R16",                     # 0x80
    "NOP",                                        # 0x90
    "@P1 BRA 0x30",                               # 0xa0 back edge
    "MOV R2, RZ",                                 # 0xb0
    "IADD3 R2, R2, 0x1, RZ",                      # 0xc0 second loop head
    "@P3 BRA 0xc0",                               # 0xd0
    "EXIT",                                       # 0xe0
    "BRA 0xf0",                                   # 0xf0 trap
)

PTX = """
.visible .entry _k(
)
{
\tmov.u32 \t%r1, %tid.x;
$L__BB0_1:                              // =>This Inner Loop Header: Depth=1
\t// begin inline asm
\t@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];
\t// end inline asm
\t@%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
\t@%p2 ld.global.b16 { %rs2 }, [ %rd2 + 0 ];
\tadd.s32 \t%r6, %r6, 1;
\t@%p3 bra \t$L__BB0_1;
$L__BB0_2:
\tadd.s32 \t%r7, %r7, 1;
\t@%p4 bra \t$L__BB0_2;
\tret;
}
"""


def test_parse_sass_reads_address_predicate_opcode_and_operands() -> None:
    insts = sass.parse_sass(KERNEL)
    assert len(insts) == 16
    assert [i.addr for i in insts[:3]] == [0x0, 0x10, 0x20]
    bra = insts[2]
    assert (bra.predicate, bra.op, bra.base, bra.operands) == ("@!P0", "BRA", "BRA", "0xb0")
    assert insts[3].op == "LDG.E.128" and insts[3].predicate == ""
    assert insts[5].predicate == "@P2" and insts[5].base == "LDG"


def test_loops_are_backward_branches_without_the_trap() -> None:
    insts = sass.parse_sass(KERNEL)
    loops = sass.find_loops(insts)
    assert [(insts[lp.start].addr, insts[lp.end].addr) for lp in loops] == [(0x30, 0xa0),
                                                                            (0xc0, 0xd0)]


def test_innermost_drops_loops_that_contain_others_and_merges_back_edges() -> None:
    insts = sass.parse_sass(_sass(
        "MOV R0, RZ",            # 0x00 outer head
        "LDG.E R1, desc[UR4][R2.64]",  # 0x10 inner head
        "@P0 BRA 0x10",          # 0x20 inner back edge
        "@P1 BRA 0x10",          # 0x30 second back edge to the inner head: same loop
        "@P2 BRA 0x0",           # 0x40 outer back edge
        "EXIT",
    ))
    loops = sass.find_loops(insts)
    assert loops == [sass.Loop(0, 4), sass.Loop(1, 3)]
    assert sass.innermost(loops) == [sass.Loop(1, 3)]


def test_main_loop_is_the_largest_innermost_loop_with_global_loads() -> None:
    insts = sass.parse_sass(KERNEL)
    assert sass.main_loop(insts) == sass.Loop(3, 10)
    # without loads anywhere the largest innermost loop is the main loop
    no_loads = sass.parse_sass(_sass("MOV R0, RZ", "IADD3 R0, R0, 0x1, RZ", "@P0 BRA 0x0",
                                     "IADD3 R1, R1, 0x1, RZ", "@P0 BRA 0x30", "EXIT"))
    assert sass.main_loop(no_loads) == sass.Loop(0, 2)
    assert sass.main_loop(sass.parse_sass(_sass("MOV R0, RZ", "EXIT"))) is None


@pytest.mark.parametrize(
    "op, bits",
    [("LDG.E.128", 128), ("LDG.E.64", 64), ("LDG.E", 32), ("LDG.E.U8", 8), ("LDG.E.S16", 16),
     ("LDG.E.EF.128.CONSTANT", 128), ("LDGSTS.E.BYPASS.LTC128B.128", 128),
     ("LDGSTS.E.LTC128B", 32), ("LDS.128", None), ("STG.E.128", None)],
)
def test_global_load_bits(op: str, bits: int | None) -> None:
    assert sass.global_load_bits(sass.Instruction(0, op, "R0, desc[UR4][R2.64]")) == bits


@pytest.mark.parametrize(
    "ops, kind",
    [(["HGMMA.64x128x16.F32", "LDG.E"], "wgmma"), (["IGMMA.64x64x32.S8.S8"], "wgmma"),
     (["HMMA.16816.F32"], "mma.sync"), (["IMMA.16832.S8.S8"], "mma.sync"),
     (["FFMA", "LDG.E.128"], "none")],
)
def test_mma_kind(ops: list[str], kind: str) -> None:
    assert sass.mma_kind([sass.Instruction(16 * i, op, "") for i, op in enumerate(ops)]) == kind


@pytest.mark.parametrize(
    "line, bits",
    [("@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd1 + 0 ];", 128),
     ("ld.global.b16 { %rs1 }, [ %rd2 + 0 ];", 16),
     ("@%p1 ld.global.L1::evict_last.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];", 64),
     ("ld.global.nc.u8 %rs1, [%rd1];", 8),
     ("cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;", 128),
     ("cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 16, %r2;", 128),
     ("cp.async.ca.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 4, %r2;", 32),
     ("cp.async.commit_group;", None), ("st.global.v4.b32 [ %rd1 + 0 ], { %r1 };", None)],
)
def test_ptx_load_bits(line: str, bits: int | None) -> None:
    assert sass.ptx_load_bits(line) == bits


def test_ptx_loop_loads_counts_the_loop_with_loads_per_width() -> None:
    assert sass.ptx_loop_loads(PTX) == Counter({128: 1, 16: 2})
    assert sass.ptx_loop_loads("ld.global.b32 { %r1 }, [ %rd1 + 0 ];") == Counter()


def test_unroll_factor_uses_the_width_that_moves_the_most_bytes() -> None:
    # ptxas merged the two identical 16-bit loads of the PTX loop (same address) but kept
    # both 128-bit loads of two unrolled iterations: the 128-bit class says 2
    assert sass.unroll_factor(Counter({128: 2, 16: 1}), Counter({128: 1, 16: 2})) == 2
    assert sass.unroll_factor(Counter({32: 8}), Counter({32: 8, 8: 16})) == 1
    assert sass.unroll_factor(Counter({32: 4}), Counter()) == 1


def test_parse_ptxas_log() -> None:
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    1096 bytes stack frame, 1100 bytes spill stores, 1096 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1096 bytes cumulative stack size
"""
    assert sass.parse_ptxas_log(log) == dict(regs=255, stack_bytes=1096, spill_stores=1100,
                                             spill_loads=1096)
    with pytest.raises(ValueError, match="no register/spill report"):
        sass.parse_ptxas_log("ptxas fatal : Unsupported .version 9.4")


def test_analyze_counts_one_pass_of_the_main_loop_per_weight_element() -> None:
    m = sass.analyze(KERNEL, PTX, num_warps=4, weights_per_iter=2048)
    assert m["mma"] == "none" and m["has_loop"]
    assert m["loop_insts"] == 7  # 0x30..0xa0 without the NOP
    assert m["unroll"] == 2
    assert m["load_bits"] == [16, 128] and m["load_counts"] == {"16": 1, "128": 2}
    assert (m["loop_shuffles"], m["loop_barriers"]) == (1, 1)
    # 2048 weights over 128 threads = 16 per thread per PTX iteration; 7 / 2 / 16
    assert m["sass_per_weight"] == pytest.approx(7 / 2 / 16, abs=1e-3)
    assert sass.analyze(KERNEL, PTX, num_warps=4)["sass_per_weight"] is None


def test_analyze_without_loops_reports_the_kernels_loads() -> None:
    m = sass.analyze(_sass("LDG.E.128 R4, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R6.64], R4",
                           "EXIT"), "", num_warps=8, weights_per_iter=1024)
    assert not m["has_loop"] and m["load_bits"] == [128]
    assert m["loop_insts"] is m["loop_shuffles"] is m["sass_per_weight"] is None
    with pytest.raises(ValueError, match="no SASS instructions"):
        sass.analyze("code for sm_90a", "", num_warps=4)

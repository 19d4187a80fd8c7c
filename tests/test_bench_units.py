"""Unit tests of the helpers behind the benchmark scripts (``scripts/`` is not a package: each
test puts it on ``sys.path`` for its own duration only)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script_module(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module(name)


def test_quantiles_and_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _script_module(monkeypatch, "benchlib")
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert lib.quantile(values, 0.5) == 3.0
    assert lib.quantile(values, 0.2) == pytest.approx(1.8)
    assert lib.quantile(values, 1.0) == 5.0
    stats = lib.summary_stats(values)
    assert stats == {"mean": 3.0, "p10": pytest.approx(1.4), "p50": 3.0, "p90": pytest.approx(4.6)}
    with pytest.raises(ValueError, match="no values"):
        lib.quantile([], 0.5)


def test_peaks_are_data_keyed_by_device_name(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _script_module(monkeypatch, "benchlib")
    assert lib.peak_tflops("NVIDIA H200", "fp16") == lib.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert lib.peak_tflops("NVIDIA H200", "fp8") == lib.peak_tflops("NVIDIA H200", "int8") == 1979.0
    assert lib.peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") is None  # printed as n/a
    assert lib.fmt(None) == lib.fmt(float("nan")) == "n/a"


def test_graph_copies_cover_more_than_the_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _script_module(monkeypatch, "benchlib")
    for nbytes in (8 << 20, 33 << 20, 117 << 20):  # int4, fp16 4096^2, fp16 14336x4096 weights
        assert lib.graph_copies(nbytes) * nbytes >= lib.ROTATE_BYTES
    assert lib.graph_copies(1) == lib.GRAPH_MAX_COPIES
    assert lib.graph_copies(1 << 30) == 1


def test_config_and_table_formatting(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _script_module(monkeypatch, "benchlib")
    from quantkit.kernels.matmul import MatmulConfig

    assert lib.format_config(MatmulConfig(16, 64, 128, split_k=4)) == "bm16 bn64 bk128 sk4 gm8 w4 s3"
    assert lib.format_config(None) == "-"

    @dataclasses.dataclass
    class Other:
        block_m: int
        swizzle: bool

    assert lib.format_config(Other(16, True)) == "bm16 swizzle=True"
    table = lib.markdown_table(["a", "b"], [["x|y", 1]], [False, True])
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| x/y | 1 |"]


def test_report_rewrites_its_files_after_every_update(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    lib = _script_module(monkeypatch, "benchlib")
    report = lib.Report(tmp_path / "r.md", tmp_path / "r.json")
    report.set("head", "# title")
    report.set("table", "| a |")
    report.add_row("t", {"x": 1})
    report.set("table", "| a |\n| b |")  # replaced in place, not appended
    assert (tmp_path / "r.md").read_text() == "# title\n| a |\n| b |\n"
    assert json.loads((tmp_path / "r.json").read_text())["tables"] == {"t": [{"x": 1}]}


def test_check_preset_covers_every_grid_and_target(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _script_module(monkeypatch, "bench_kernels")
    op_shapes, blocks = bench.plan(bench.parse_args(["--preset", "check"]), on_gpu=True)
    assert op_shapes == [(4096, 4096)]
    assert {g for _, _, _, grids, _ in blocks for g in grids} == set(bench.ALL_GRIDS)
    assert all(ms == (1, 16, 128, 4096) for _, _, ms, _, _ in blocks)
    first_shape, first_dtype, _, first_grids, first_extras = blocks[0]  # what the targets need
    assert (first_shape, first_dtype) == ((4096, 4096), "fp16") and "int4-g128-asym" in first_grids
    assert set(first_extras) == set(bench.cases.EXTRAS)
    assert {(s, d) for s, d, *_ in blocks} >= {((14336, 4096), "fp16"), ((4096, 4096), "bf16"),
                                                ((4096, 14336), "fp16")}
    # a filter replaces the preset by the cartesian product it names
    _, custom = bench.plan(bench.parse_args(["--preset", "check", "--m", "1", "--dtypes", "bf16",
                                             "--grids", "fp4-g32", "--extras", ""]), on_gpu=True)
    assert custom == [(s, "bf16", (1,), ("fp4-g32",), ()) for s in bench.GPU_SHAPES]


def test_call_with_known_passes_only_named_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _script_module(monkeypatch, "bench_matmul_cases")

    def planner(x, target, *, config=None):
        return x, target, config

    assert cases.call_with_known(planner, {"x": 1, "target": 2, "extra": 3}) == (1, 2, None)
    with pytest.raises(TypeError, match="needs 'target'"):
        cases.call_with_known(planner, {"x": 1})


SASS = """
        Function : _dequant_matmul_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
.L_x_1:
        /*0030*/                   LDG.E.128 R12, desc[UR4][R6.64] ;
        /*0040*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0050*/                   HMMA.16816.F32 R16, R8, R12, R16 ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_summarize_sass_finds_the_main_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    inv = _script_module(monkeypatch, "kernel_inventory")
    s = inv.summarize_sass(SASS)
    assert s["instructions"] == 10 and s["mma"] == "mma.sync"
    assert s["ldg_bits"] == {"32": 1, "128": 2} and s["shfl"] == 1 and s["bar"] == 1
    assert s["loops"] == 2  # the K loop and the trailing self-branch
    assert s["main_loop"] == {"instructions": 4, "ldg_bits": {"128": 1}, "ldgsts": 0, "tma": 0,
                              "shfl": 1, "bar": 0, "mma": "mma.sync"}


_COMPILE = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
import kernel_inventory as inv
from quantkit.kernels.matmul import _dequant_matmul_kernel  # noqa: F401 - a real module loads

@triton.jit
def dot_loop_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(a_ptr + offs[:, None] * K + (k + offs)[None, :])
        b = tl.load(b_ptr + (k + offs)[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32", "BLOCK": "constexpr"}
attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
kernel = triton.compile(ASTSource(dot_loop_kernel, sig, {"BLOCK": 64}, attrs),
                        target=GPUTarget("cuda", 90, 32))
print(json.dumps(inv.describe(dot_loop_kernel, kernel)))
"""


def test_describe_a_kernel_compiled_for_sm90(tmp_path: Path) -> None:
    """The SASS parser on real cuobjdump output (compiled on the CPU, no GPU needed)."""
    script = tmp_path / "compile_probe.py"  # jit needs the kernel's source in a file
    script.write_text(_COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), str(SCRIPTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["kernel"] == "dot_loop_kernel" and rec["constexprs"] == {"BLOCK": 64}
    assert rec["regs"] is None  # no driver here: registers come from the GPU at load time
    sass = rec["sass"]
    assert sass["mma"] == "wgmma" and sass["loops"] >= 1
    assert sass["main_loop"]["mma"] == "wgmma" and sass["main_loop"]["instructions"] > 10


def _gpu_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[ModuleType, object]:
    gc = _script_module(monkeypatch, "gpu_check")
    ck = gc.Check(gc.parse_args(["--smoke", "--out", str(tmp_path / "r.md"),
                                 "--workdir", str(tmp_path)]))
    return gc, ck


def test_targets_read_the_benchmark_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gc, ck = _gpu_check(monkeypatch, tmp_path)
    w4 = dict(kernel="quantkit int4 g128 asym", m=1, dtype="fp16")
    mm = [dict(w4, shape=[4096, 4096], pct_copy=85.0), dict(w4, shape=[14336, 4096], pct_copy=60.0),
          dict(kernel="quantkit w8a8 int8 GEMM (codes given)", m=4096, shape=[4096, 4096],
               dtype="fp16", speedup_vs_cublas=1.7, tflops=1000.0),
          dict(kernel="quantkit fp8 GEMM (codes given)", m=4096, shape=[4096, 4096], dtype="fp16",
               tflops=900.0)]
    ops = [dict(op="quantize", scheme="int8 channel", pct_copy=75.0),
           dict(op="pack_codes", scheme="int3", pct_copy=71.0)]
    (tmp_path / "bench.json").write_text(json.dumps({"tables": {"matmul": mm, "ops": ops}}))
    (tmp_path / "decode.json").write_text(json.dumps({"tables": {"decode": [
        dict(model="llama-7b", variant="w4a16", batch=1, speedup_vs_dense=2.7)]}}))
    body = gc.targets(ck).body
    assert "- MET: W4A16 M=1 4096x4096 % of copy bandwidth: 85.00%" in body
    assert "- MISSED: W4A16 M=1 14336x4096 % of copy bandwidth: 60.00%" in body
    assert "- MET: W8A8 int8 GEMM M=4096 4096x4096 speed-up vs fp16 cuBLAS: 1.70x" in body
    assert "- MISSED: fp8 GEMM throughput / int8 GEMM throughput, M=4096 4096x4096: 0.90x" in body
    assert "lowest % of copy bandwidth (pack_codes int3): 71.00%" in body
    assert "- MET: decode batch 1, 7B-shaped, W4A16 tokens/s vs float16: 2.70x" in body


def test_bench_problems_flag_contract_violations(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    gc, _ = _gpu_check(monkeypatch, tmp_path)
    data = {"tables": {
        "ops": [dict(op="quantize", scheme="int4", shape=[8, 8], exact=True),
                dict(op="pack_codes", scheme="int3", shape=[8, 8], exact=False)],
        "matmul": [dict(kernel="a", m=1, shape=[8, 8], dtype="fp16", err=1e-3, exact=None),
                   dict(kernel="b", m=1, shape=[8, 8], dtype="fp16", err=0.5, exact=None),
                   dict(kernel="c", m=1, shape=[8, 8], dtype="fp16", err=None, exact=False)]}}
    problems = gc._bench_problems(data)
    assert len(problems) == 3
    assert problems[0].startswith("pack_codes int3") and problems[1].startswith("b M=1")


def test_parse_junit_counts_and_messages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gc, _ = _gpu_check(monkeypatch, tmp_path)
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="t.m" name="ok"/>'
        '<testcase classname="t.m" name="bad"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="t.m" name="skip"><skipped/></testcase>'
        '</testsuite></testsuites>')
    counts, failures = gc.parse_junit(xml)
    assert counts == "1 passed, 1 failed, 0 errors, 1 skipped"
    assert failures == ["t.m::bad: assert 1 == 2"]
    assert gc.parse_junit(tmp_path / "missing.xml")[0].startswith("no junit report")


def test_parse_verbose_log_of_a_killed_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A time-out kills pytest before its junit report: the verbose lines still count."""
    gc, _ = _gpu_check(monkeypatch, tmp_path)
    log = tmp_path / "tests.log"
    log.write_text(
        "[gw0] [  1%] PASSED tests/test_kernels_matmul.py::test_a[M1-gemv] \n"
        "[gw1] [  2%] FAILED tests/test_kernels_matmul.py::test_b[M17-gemm] \n"
        "tests/test_kernels_pack.py::test_c PASSED                 [  3%]\n"
        "tests/test_kernels_pack.py::test_d SKIPPED (no cuda)      [  4%]\n"
        "collecting ... PASSED is a word here but no test id\n")
    counts, failed = gc.parse_verbose_log(log)
    assert counts == "2 passed, 1 failed, 0 errors, 1 skipped"
    assert failed == ["tests/test_kernels_matmul.py::test_b[M17-gemm]"]


def test_link_package_mirrors_the_installed_layout(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """What a GPU machine without the package installed imports: the links come first on
    PYTHONPATH, so the modules load from them (not from this worktree's editable install)."""
    gc, _ = _gpu_check(monkeypatch, tmp_path)
    site = gc.link_package(tmp_path / "w")
    probe = ("import quantkit, quantkit.kernels.matmul as m, quantkit.ops as o; "
             "print(quantkit.__file__); print(m.__file__); print(o.__name__)")
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    init, matmul, ops = proc.stdout.split()
    assert init == str(site / "quantkit" / "__init__.py")
    assert matmul == str(site / "quantkit" / "kernels" / "matmul.py") and ops == "quantkit.ops"
    assert (site / "quantkit" / "kernels").resolve() == (SCRIPTS.parent / "kernels").resolve()

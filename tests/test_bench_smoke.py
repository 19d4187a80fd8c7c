"""CPU smoke runs of the benchmark scripts and the GPU check (Triton interpreter, tiny shapes).

Each runs the script as a user would, in a subprocess, and checks the report it writes: the
same code paths run on a GPU with bigger shapes, timers and vendor kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS = ("quantize", "dequantize", "pack_codes", "unpack_codes")


def _run(args: list[str], interpret: bool = True, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    # one thread: on a busy 2-core machine torch's thread pool waits for the scheduler
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", **env}
    if interpret:
        full_env["TRITON_INTERPRET"] = "1"
    else:
        full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the rows of the first markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_kernels_smoke_writes_markdown_and_json(tmp_path: Path) -> None:
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = _run(["scripts/bench_kernels.py", "--quick", "--markdown", str(md), "--json", str(js)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = md.read_text()
    assert report.strip() == proc.stdout.strip()
    assert "Triton interpreter" in report and "copy bandwidth" in report
    ops = _table_rows(report, "| op | shape | scheme |")
    assert {row[0] for row in ops} == set(OPS)
    assert all(row[-1] == "yes" for row in ops), "triton and torch backends disagree"

    mm = _table_rows(report, "| kernel | M | config |")
    kernels = {row[0] for row in mm}
    grids = ("int4 g128 asym", "int4 g128", "int3 g128 asym", "int2 g128 asym", "int8 channel",
             "fp4 g32", "fp8 channel")
    assert {f"quantkit {g}" for g in grids} <= kernels
    for label in ("cuBLAS (dense)",
                  "quantkit w8a8 int8 GEMM (codes given)",
                  "quantkit w8a8 int8 + per-token quant (QuantLinear)",
                  "quantkit fp8 + per-token quant (QuantLinear)",
                  "quantkit smooth_quantize int8 per-token", "quantkit smooth_quantize + int8 GEMM",
                  "torch._int_mm (int32 out, no scales)", "torch._weight_int4pack_mm (tinygemm)",
                  "quantkit int4 g128 asym GEMV block_n=4", "quantkit int4 g128 asym GEMV block_n=16"):
        assert label in kernels, label
    # the GEMV variants time the decode kernel only (M <= 4) with the rows per program they name
    variants = [row for row in mm if " GEMV block_n=" in row[0]]
    assert {row[1] for row in variants} == {"1"}
    assert all(row[2] == f"bm1 bn{row[0].rsplit('=', 1)[1]} w1" for row in variants), variants
    assert {row[1] for row in mm} == {"1", "16"}
    # the dispatcher's config is printed: GEMV tiles at M=1, 16-row tensor-core tiles at M=16
    w4 = {row[1]: row[2] for row in mm if row[0] == "quantkit int4 g128 asym"}
    assert w4["1"].startswith("bm1 ") and w4["16"].startswith("bm16 "), w4
    skipped = [row for row in mm if row[4] == "skipped"]
    assert skipped and all(row[-1] for row in skipped), "a skipped row must say why"

    rows = json.loads(js.read_text())["tables"]
    assert len(rows["ops"]) == len(ops) and len(rows["matmul"]) == len(mm)
    for r in rows["matmul"]:
        if r["kind"] == "quantkit" and r.get("err") is not None:
            assert r["err"] < 2e-2, r  # the interpreter computes the same values as the reference
        if r["kernel"].startswith("cuBLAS"):
            assert r["speedup_vs_cublas"] == pytest.approx(1.0)


def test_bench_kernels_rejects_unknown_grid() -> None:
    proc = _run(["scripts/bench_kernels.py", "--grids", "int5-g128"])
    assert proc.returncode == 2
    assert "grid 'int5-g128' unknown; valid: int4-g128-asym" in proc.stderr


def test_bench_decode_smoke(tmp_path: Path) -> None:
    md, js = tmp_path / "decode.md", tmp_path / "decode.json"
    proc = _run(["scripts/bench_decode.py", "--batches", "1,3", "--steps", "3", "--prompt-len", "5",
                 "--markdown", str(md), "--json", str(js)], interpret=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(js.read_text())["tables"]["decode"]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for v in ("dense", "w4a16", "w8a8") for b in (1, 3)]
    for r in rows:
        d = r["decode_ms"]
        assert 0 < d["p10"] <= d["p50"] <= d["p90"] and r["prefill_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(1e3 * r["batch"] / d["mean"])
        assert r["mode"] == "eager" and r["speedup_vs_dense"] > 0
    assert rows[2]["scheme"] == "int4 g32 asym unsigned"  # tiny-llama is narrower than 128
    table = _table_rows(md.read_text(), "| model | weights | variant |")
    assert len(table) == 6 and all(row[0] == "tiny-llama" for row in table)


def test_bench_decode_rejects_unknown_variant() -> None:
    proc = _run(["scripts/bench_decode.py", "--variants", "dense,w3a16"], interpret=False)
    assert proc.returncode == 2
    assert "variant ['w3a16'] unknown; valid: dense, w4a16, w8a8" in proc.stderr


def test_gpu_check_smoke_writes_one_report(tmp_path: Path) -> None:
    """Every section in its CPU form except the two benchmarks (smoke-tested above); the
    inspection is a stand-in script writing two records, one of which spills."""
    fake = tmp_path / "inspect.py"
    fake.write_text(
        "import json, sys\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump([{'kernel': 'k', 'config': {'block_m': 1}, 'regs': 40, 'spills_bytes': 0},\n"
        "           {'kernel': 'k', 'config': {'block_m': 16}, 'regs': 255, 'spills_bytes': 8}],\n"
        "          open(path, 'w'))\n"
    )
    out = tmp_path / "report.md"
    proc = _run(["scripts/gpu_check.py", "--smoke", "--skip", "bench,decode", "--out", str(out),
                 "--workdir", str(tmp_path / "work"), "--inspect-script", str(fake)], interpret=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = out.read_text()
    assert report.startswith("# quantkit GPU check (CPU smoke): PASS")
    status = {row[0]: row[1] for row in _table_rows(report, "| section | status |")}
    assert status["Environment"] == "**PASS**"
    assert status["Kernel tests, compiled on CUDA, against the torch references"] == "**PASS**"
    assert status["Numerics: accumulation errors against float64, M-invariance, determinism"] == "**PASS**"
    assert status["Static sm90 inspection (scripts/inspect_kernels.py)"] == "**PASS**"
    assert status["bench"] == status["decode"] == "**SKIPPED**"
    assert "2 kernel configs, 1 with spills" in report
    assert "4 passed, 0 failed" in report  # the selected pack tests ran
    assert "| fp8 accumulator error < 2^-10, K=264 | PASS |" in report


def test_gpu_check_reports_a_failing_section(tmp_path: Path) -> None:
    """A section that crashes is recorded (status and log) and the exit code says so."""
    fake = tmp_path / "inspect.py"
    fake.write_text("raise SystemExit('inspection broke')\n")
    out = tmp_path / "report.md"
    proc = _run(["scripts/gpu_check.py", "--smoke", "--skip", "tests,numerics,bench,decode",
                 "--out", str(out), "--inspect-script", str(fake)], interpret=False)
    assert proc.returncode == 1
    report = out.read_text()
    assert report.startswith("# quantkit GPU check (CPU smoke): FAIL")
    assert "## 4. Static sm90 inspection (scripts/inspect_kernels.py): FAIL" in report
    assert "inspection broke" in report


def test_cuda_test_mode_refuses_the_interpreter() -> None:
    """QUANTKIT_TEST_DEVICE=cuda means compiled kernels: TRITON_INTERPRET=1 is a usage error."""
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_scheme.py"],
                QUANTKIT_TEST_DEVICE="cuda")
    assert proc.returncode != 0
    assert "QUANTKIT_TEST_DEVICE=cuda runs compiled kernels: unset TRITON_INTERPRET" in (
        proc.stdout + proc.stderr)

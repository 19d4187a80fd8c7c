"""The CPU smoke run of ``scripts/bench_kernels.py`` (Triton interpreter, tiny shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OPS = ("quantize", "dequantize", "pack_codes", "unpack_codes")


def test_bench_smoke_run_writes_a_markdown_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "scripts/bench_kernels.py", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    assert report.strip() == proc.stdout.strip()
    assert "Triton interpreter" in report and "copy bandwidth" in report
    header = "| op | shape | scheme | triton ms | torch ms | speedup | GB/s | % of copy bw |"
    assert header in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "ms |" not in line]
    assert {row.split(" | ")[0].lstrip("| ") for row in rows} == set(OPS)
    assert all(row.endswith("| yes |") for row in rows), "triton and torch backends disagree"

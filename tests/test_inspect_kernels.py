"""The static sm90 inspection tier: ``scripts/inspect_kernels.py --quick`` compiles a
representative subset of the configurations the dispatchers select on an H200 (every kernel,
every M bucket, every weight-grid kind, x dtype and group size one at a time; about 210
variants, a few CPU-minutes) and the tests read its JSON records. The full grid (~1480 variants)
is ``make inspect``.

Budget of the W4A16 decode GEMV (ENVIRONMENT.md): an H200 streams 4.8 TB/s, i.e. 9.6e12
4-bit weights/s, while its 132 SMs at ~1.98 GHz issue 4 warp-instructions per clock = 3.3e13
thread-instructions/s: ~3.5 thread-instructions per weight element at full bandwidth. The
tier allows 6 (the loop may run at ~60% of its issue rate and still not be the bottleneck),
with 0 shuffles in the loop and the packed weight arriving in 128-bit loads.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from filelock import FileLock

from quantkit.sm90 import interpreter_unset_env, signature_attrs

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "inspect_kernels.py"
# W4A16 decode at M=1: ~3.5 thread-instructions per weight element keep up with an H200's
# bandwidth at 4 bits; the loop measures 3.86 (benchmarks/RESULTS.md, "GPU kernels")
SASS_PER_WEIGHT_BUDGET = 4.0


def _script() -> ModuleType:
    """The script as a module (its top level imports no kernels)."""
    spec = importlib.util.spec_from_file_location("inspect_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _quick_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``--quick`` writes its JSON (its summary beside it, ``.md``): one per test session,
    shared by the xdist workers."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp/.. is this session's, shared by workers
        shared = shared.parent
    return shared / "inspect_quick.json"


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Records of ``--quick``, computed once per test session even across xdist workers."""
    out = _quick_json(tmp_path_factory)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            proc = subprocess.run(
                [sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--json", str(out),
                 "--summary", str(out.with_suffix(".md"))],
                cwd=REPO_ROOT, env=interpreter_unset_env(), capture_output=True, text=True,
                timeout=3600,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _jit_kernels() -> set[str]:
    """Every ``*_kernel`` Triton function of quantkit.kernels."""
    from quantkit.kernels import (
        dequantize,
        gemv,
        hadamard,
        int8_matmul,
        matmul,
        pack,
        quantize,
        smooth_quant,
    )

    names = set()
    for module in (dequantize, gemv, hadamard, int8_matmul, matmul, pack, quantize, smooth_quant):
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction",
                                                                   "InterpretedFunction"):
                names.add(name)
    return names


def _gemv_record(records: list[dict], n: int, k: int) -> dict:
    problem = f"M=1 N={n} K={k} w=int4 g128 asym unsigned x=fp16"
    found = [r for r in records
             if r["launcher"] == "quant_linear_matmul" and problem in r["problems"]]
    assert len(found) == 1, f"{problem}: {len(found)} records"
    return found[0]


# --------------------------------------------------------------------------------------------
# cheap: the grid helpers and the specialization of hand-written signatures
# --------------------------------------------------------------------------------------------


def test_pairwise_covers_every_pair_of_values_with_few_problems() -> None:
    axes = dict(kind=tuple(range(7)), gran=tuple("abcdef"), x=(16, 32), M=(1, 2, 3, 4))
    rows = _script().pairwise(axes)
    for a, b in itertools.combinations(axes, 2):
        for va, vb in itertools.product(axes[a], axes[b]):
            assert any(r[a] == va and r[b] == vb for r in rows), (a, va, b, vb)
    assert len(rows) < 7 * 6 + 7  # far below the 336 of the full product


def test_one_at_a_time_varies_each_axis_around_the_base() -> None:
    rows = _script().one_at_a_time(dict(a=1, b="x"), dict(a=(1, 2, 3), b=("x", "y")))
    assert rows == [dict(a=1, b="x"), dict(a=2, b="x"), dict(a=3, b="x"), dict(a=1, b="y")]


def test_signature_attrs_specialize_like_the_runtime() -> None:
    sig = {"x_ptr": "*fp16", "M": "i32", "K": "i32", "stride": "i32", "BLOCK": "constexpr"}
    attrs = signature_attrs(sig, {"K": 4096, "stride": 4100})
    div16 = [["tt.divisibility", 16]]
    assert attrs == {(0,): div16, (2,): div16, (3,): []}  # M unknown: not specialized
    with pytest.raises(ValueError, match="M=1 is specialized to a constexpr"):
        signature_attrs(sig, {"M": 1})


# --------------------------------------------------------------------------------------------
# the inspection of the quick grid
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_grid_covers_every_kernel_and_tile_bucket(records: list[dict]) -> None:
    assert {r["kernel"] for r in records} == _jit_kernels()
    blocks = {(r["kernel"], r["constexprs"]["BLOCK_M"]) for r in records
              if "BLOCK_M" in r["constexprs"]}
    assert {m for k, m in blocks if k == "_dequant_gemv_kernel"} == {1, 2, 4}
    assert {m for k, m in blocks if k == "_dequant_matmul_kernel"} == {16, 64, 128}
    assert {m for k, m in blocks if k == "_scaled_mm_kernel"} >= {16, 64, 128}
    mma = {(r["kernel"], r["constexprs"]["BLOCK_M"]): r["mma"] for r in records
           if r["kernel"] in ("_dequant_gemv_kernel", "_dequant_matmul_kernel")
           and "x=fp16" in r["config"]}
    assert mma[("_dequant_gemv_kernel", 1)] == "none"  # GEMV: no tensor cores
    assert mma[("_dequant_matmul_kernel", 128)] == "wgmma"


@pytest.mark.slow
def test_every_config_compiles_and_the_ptxas_rerun_is_tritons_cubin(records: list[dict]) -> None:
    assert [r["config"] for r in records if r["error"]] == []
    assert all(r["cubin_identical"] for r in records)
    assert all(r["regs"] > 0 and r["smem_bytes"] >= 0 for r in records)


@pytest.mark.slow
def test_no_selectable_config_spills_outside_the_matmuls(records: list[dict]) -> None:
    spills = [(r["config"], r["spills_bytes"]) for r in records
              if r["kernel"] not in ("_dequant_matmul_kernel", "_scaled_mm_kernel")
              and r["spills_bytes"]]
    assert spills == []


@pytest.mark.slow
def test_no_selectable_dequant_matmul_config_spills(records: list[dict]) -> None:
    spills = [(r["config"], r["spills_bytes"]) for r in records
              if r["kernel"] == "_dequant_matmul_kernel" and r["spills_bytes"]]
    assert spills == []


@pytest.mark.slow
def test_no_selectable_scaled_mm_config_spills(records: list[dict]) -> None:
    spills = [(r["config"], r["spills_bytes"]) for r in records
              if r["kernel"] == "_scaled_mm_kernel" and r["spills_bytes"]]
    assert spills == []


@pytest.mark.slow
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096)], ids=["4096x4096", "14336x4096"])
def test_w4a16_decode_gemv_within_instruction_budget(records: list[dict], n: int, k: int) -> None:
    r = _gemv_record(records, n, k)
    assert r["spills_bytes"] == 0
    assert r["loop_shuffles"] == 0
    assert r["sass_per_weight"] <= SASS_PER_WEIGHT_BUDGET
    # one pass of the loop: the packed weight bytes per thread arrive in 16-byte loads
    weight_bytes = (r["weights_per_iter"] * r["weight_bits"] / 8 / (32 * r["num_warps"])
                    * r["unroll"])
    assert 16 * r["load_counts"].get("128", 0) >= weight_bytes


def test_the_script_writes_its_summary(records: list[dict], tmp_path_factory: pytest.TempPathFactory) -> None:
    text = _quick_json(tmp_path_factory).with_suffix(".md").read_text()
    assert text == _script().summary(records)
    assert "_dequant_gemv_kernel" in text and "Decode" in text


def test_summary_has_a_row_per_kernel_and_the_decode_gemv_table() -> None:
    def rec(kernel: str, problem: str, regs: int, spills: int, sass: float | None, error: str | None = None) -> dict:
        return dict(kernel=kernel, config=problem, problems=[problem], regs=regs, spills_bytes=spills,
                    smem_bytes=512, mma="none", load_bits=[8, 128], loop_shuffles=0, loop_barriers=0,
                    sass_per_weight=sass, constexprs=dict(BLOCK_M=1), error=error)

    records = [rec("_dequant_gemv_kernel", "M=1 N=4096 K=4096 w=int4 g128 x=fp16", 90, 0, 4.0),
               rec("_dequant_gemv_kernel", "M=1 N=576 K=576 w=int4 g128 x=fp16", 100, 16, 9.5),
               rec("_pack_kernel", "pack", 40, 0, None), rec("_pack_kernel", "pack2", 0, 0, None, "boom")]
    text = _script().summary(records)
    assert "| _dequant_gemv_kernel | 2 | 100 | 1 | 512 | none | 8,128 | 0 | 0 | 4.00-9.50 |" in text
    assert "| _pack_kernel | 1 (+1 failed) | 40 | 0 | 512 | none | 8,128 | 0 | 0 | - |" in text
    assert "| M=1 N=4096 K=4096 w=int4 g128 x=fp16 | 90 | 8,128 | 0 | 4.0 |" in text and "N=576" not in text.split("Decode")[1]

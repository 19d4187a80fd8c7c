"""The 8-bit scaled GEMMs (int8 W8A8, fp8 e4m3): configs the hardware runs, fp8 numerics.

* Config validation: every 8-bit dot needs ``block_k >= 32`` on sm90; fp8 also needs the
  wgmma tile (``block_m >= 64``), 128-deep K-tiles and no split-K (its summation order).
  The default configs, interpreter included, pass the same checks.
* fp8 numerics in the interpreter: bit-exact against the reference where every 128-deep tile
  sum fits fp32 (integer-valued codes), within fp32 summation error over all e4m3 codes, and
  identical rows for every ``M`` with the tiles the dispatcher picks on an H200.
* sm90 machine code (compiled here, no GPU) of the configs the dispatcher picks for
  ``M in {1, 8, 16, 17, 64, 128, 4096}``, with the runtime's argument specialization: fp8 runs
  wgmma (QGMMA) on fp8 operands read from shared memory (no conversion, no register round
  trip of a tile inside the K loop) with a fresh partial sum every 128 K (promotion), and no
  config spills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from quantkit.kernels._launch import H200, INTERPRETER
from quantkit.kernels.fp8_matmul import fp8_matmul
from quantkit.kernels.int8_matmul import (
    check_scaled_mm_config,
    fp8_mm_config,
    int8_matmul,
    scaled_mm_config,
)
from quantkit.kernels.matmul import MatmulConfig
from quantkit.matmul_reference import (
    FP8_PROMOTE_K,
    fp8_matmul_reference,
    int8_matmul_reference,
)

pytestmark = pytest.mark.interpreter

FP8 = torch.float8_e4m3fn
DISPATCH_M = (1, 8, 16, 17, 64, 128, 4096)
# ragged shapes: K spans two full 128-deep tiles and a partial one, N is no multiple of 16
N, K = 37, 300


# --------------------------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------------------------


def _operands(m: int, code_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    if code_dtype == torch.int8:
        xq = torch.randint(-128, 128, (m, K), dtype=torch.int8)
        wq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    else:
        xq = (torch.randn(m, K) * 40).to(FP8)
        wq = (torch.randn(N, K) * 40).to(FP8)
    return xq, torch.rand(m, 1) / 500 + 1e-4, wq, torch.rand(N, 1) / 500 + 1e-4


@pytest.mark.parametrize(
    "fn, code_dtype, config, match",
    [
        pytest.param(int8_matmul, torch.int8, MatmulConfig(16, 16, 16),
                     r"config.block_k must be >= 32 .*allowed 32, 64, 128", id="int8-block_k-16"),
        pytest.param(fp8_matmul, FP8, MatmulConfig(64, 16, 16),
                     r"config.block_k must be >= 32 .*allowed 32, 64, 128", id="fp8-block_k-16"),
        pytest.param(fp8_matmul, FP8, MatmulConfig(16, 64, 128),
                     r"config.block_m must be >= 64 for fp8 \(64, 128", id="fp8-block_m-16"),
        pytest.param(fp8_matmul, FP8, MatmulConfig(64, 64, 64),
                     r"config.block_k must be a multiple of 128 for fp8 .*allowed 128, 256",
                     id="fp8-block_k-64"),
        pytest.param(fp8_matmul, FP8, MatmulConfig(64, 64, 128, split_k=2),
                     r"config.split_k must be 1 for fp8", id="fp8-split_k-2"),
    ],
)
def test_configs_the_tensor_cores_cannot_run_are_rejected(fn, code_dtype: torch.dtype,
                                                          config: MatmulConfig, match: str) -> None:
    xq, sx, wq, sw = _operands(3, code_dtype)
    with pytest.raises(ValueError, match=match):
        fn(xq, sx, wq, sw, config=config)


def test_config_type_is_checked() -> None:
    xq, sx, wq, sw = _operands(3, torch.int8)
    with pytest.raises(TypeError, match="config must be a MatmulConfig or None, got dict"):
        int8_matmul(xq, sx, wq, sw, config={"block_k": 32})


@pytest.mark.parametrize("code_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("target", [INTERPRETER, H200], ids=["interpreter", "h200"])
def test_default_configs_are_valid(code_dtype: torch.dtype, target) -> None:
    """Every tile the dispatcher can choose passes the hardware checks, down to K = 1."""
    for m in DISPATCH_M + (2, 33, 65, 1000):
        for n, k in [(1, 1), (5, 16), (37, 300), (4096, 4096), (14336, 4096), (4096, 14336)]:
            config = scaled_mm_config(m, n, k, target, code_dtype)
            assert check_scaled_mm_config(config, code_dtype) is config


@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)])
def test_fp8_configs_sum_every_row_the_same_way(n: int, k: int) -> None:
    """Only the output tiling follows M: K-tile depth, no split, the wgmma-sized block_m."""
    configs = [fp8_mm_config(m, n, H200) for m in DISPATCH_M]
    assert {(c.block_k, c.split_k) for c in configs} == {(FP8_PROMOTE_K, 1)}
    assert min(c.block_m for c in configs) >= 64
    assert configs == [scaled_mm_config(m, n, k, H200, FP8) for m in DISPATCH_M]


@pytest.mark.parametrize("m", [1, 16, 128, 4096])
@pytest.mark.parametrize("n", [4096, 14336])
def test_fp8_configs_give_every_sm_a_program(m: int, n: int) -> None:
    """Without split-K, narrow column tiles fill the GPU for decode-sized M."""
    config = fp8_mm_config(m, n, H200)
    programs = -(-m // config.block_m) * -(-n // config.block_n)
    assert programs >= H200.sm_count, config


# --------------------------------------------------------------------------------------------
# numerics in the interpreter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("target", [INTERPRETER, H200], ids=["interpreter-tiles", "h200-tiles"])
def test_int8_matmul_bit_exact_on_ragged_k(m: int, target) -> None:
    xq, sx, wq, sw = _operands(m, torch.int8)
    bias = torch.randn(N)
    config = scaled_mm_config(m, N, K, target)
    assert torch.equal(int8_matmul(xq, sx, wq, sw, None, torch.int32, config=config),
                       int8_matmul_reference(xq, sx, wq, sw, None, torch.int32))
    if config.split_k == 1:  # fp32 epilogue in the reference's order
        for out_dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(int8_matmul(xq, sx, wq, sw, bias, out_dtype, config=config),
                               int8_matmul_reference(xq, sx, wq, sw, bias, out_dtype))


def _integer_fp8(rows: int, cols: int) -> torch.Tensor:
    """e4m3 codes of integers in [-16, 16] (all exact in e4m3): a 128-deep tile sums to at
    most 128 * 256 and the whole row to at most 300 * 256, exact in fp32 in any order."""
    return torch.randint(-16, 17, (rows, cols)).float().to(FP8)


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("target", [INTERPRETER, H200], ids=["interpreter-tiles", "h200-tiles"])
def test_fp8_matmul_bit_exact_where_tile_sums_are_exact(m: int, target) -> None:
    xq, wq = _integer_fp8(m, K), _integer_fp8(N, K)
    sx, sw, bias = torch.rand(m, 1) / 100, torch.rand(N, 1) / 100, torch.randn(N)
    config = scaled_mm_config(m, N, K, target, FP8)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = fp8_matmul_reference(xq, sx, wq, sw, bias, out_dtype)
        assert torch.equal(fp8_matmul(xq, sx, wq, sw, bias, out_dtype, config=config), want)
        got = fp8_matmul(xq.view(torch.uint8), sx[:1], wq.view(torch.uint8), sw[:1], None,
                         out_dtype, config=config)  # bit patterns and per-tensor scales
        assert torch.equal(got, fp8_matmul_reference(xq, sx[:1], wq, sw[:1], None, out_dtype))


def test_fp8_matmul_every_code() -> None:
    """Every finite e4m3 value (subnormals, +-0, +-448) in both operands: within the fp32
    rounding of 128-term sums, ``128 * 2**-24`` of the sum of |products| per tile."""
    finite = torch.arange(256, dtype=torch.uint8)
    finite = finite[(finite & 0x7F) != 0x7F]  # (254,) drop the two NaN patterns
    x = torch.stack([finite[torch.randperm(254)] for _ in range(4)])  # (4, 254) uint8
    w = torch.stack([finite[torch.randperm(254)] for _ in range(9)])  # (9, 254)
    ones4, ones9 = torch.ones(4, 1), torch.ones(9, 1)
    got = fp8_matmul(x, ones4, w, ones9, None, torch.float32)
    want = fp8_matmul_reference(x, ones4, w, ones9, None, torch.float32)
    xv, wv = x.view(FP8).double(), w.view(FP8).double()
    bound = 128 * 2.0**-24 * (xv.abs() @ wv.abs().T)  # (4, 9)
    assert torch.all((got.double() - want.double()).abs() <= bound)
    exact = (xv @ wv.T).float()  # the reference's tile sums are exact: close to the true sum
    assert torch.all((want.double() - exact.double()).abs() <= bound)


@pytest.mark.parametrize("target", [INTERPRETER, H200], ids=["interpreter-tiles", "h200-tiles"])
def test_fp8_rows_do_not_depend_on_m(target) -> None:
    """A row's output is the same bits whether it is multiplied alone or among 16, 70 or 130
    rows, each with the tiles the dispatcher picks for that M (general codes: fp32 rounding
    shows any change of summation order)."""
    xq, sx, wq, sw = _operands(130, FP8)
    bias = torch.randn(N)
    full = fp8_matmul(xq, sx, wq, sw, bias, torch.float32,
                      config=scaled_mm_config(130, N, K, target, FP8))
    for m in (1, 16, 70):
        rows = slice(130 - m, 130)
        part = fp8_matmul(xq[rows], sx[rows], wq, sw, bias, torch.float32,
                          config=scaled_mm_config(m, N, K, target, FP8))
        assert torch.equal(part, full[rows]), m


# --------------------------------------------------------------------------------------------
# sm90 machine code of the dispatcher's configs (compiled in a subprocess without a GPU)
# --------------------------------------------------------------------------------------------

_SASS_WORKER = r"""
import json, re, subprocess, sys, tempfile, os
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantkit.kernels.int8_matmul import _scaled_mm_kernel as fn

def loop_ops(sass):
    # instructions inside backward-branch ranges (the K loop), predicated-off
    # no-ops dropped
    lines = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(lines)}
    body = []
    for i, (a, op) in enumerate(lines):
        jump = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", op)
        if jump and int(jump.group(1), 16) < a and int(jump.group(1), 16) in index:
            body += [o for _, o in lines[index[int(jump.group(1), 16)]:i + 1]
                     if not o.startswith("@!PT")]
    return body

results = []
for case in json.load(sys.stdin):
    attrs = {(i,): [["tt.divisibility", 16]] for i in case["divisible"]}
    signature, constexprs = case["signature"], case["constexprs"]
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=case["num_warps"],
                                         num_stages=case["num_stages"]))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        open(ptx, "w").write(kernel.asm["ptx"])
        open(cubin, "wb").write(kernel.asm["cubin"])
        log = subprocess.run([knobs.nvidia.ptxas_blackwell.path, "-v", "--regAllocOptLevel=2",
                              "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "o.cubin")],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    results.append(dict(
        name=case["name"], spills=spills,
        mma=sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[.\w]*", kernel.asm["ptx"]))),
        loop=loop_ops(sass),
    ))
print(json.dumps(results))
"""


def _sass_facts(cases: list[dict]) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SASS_WORKER], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in json.loads(proc.stdout)}


def _dispatch_case(m: int, n: int, k: int, code_dtype: torch.dtype) -> dict:
    """What the launcher passes for ``(m, k) @ (n, k).T`` with per-token/channel scales, an
    fp16 bias and fp16 out on an H200, specialized as the runtime does (integer arguments
    equal to 1 become constants, multiples of 16 and pointers get ``tt.divisibility``)."""
    from quantkit.kernels.int8_matmul import _scaled_mm_kernel

    fp8 = code_dtype == FP8
    cfg = scaled_mm_config(m, n, k, H200, code_dtype)
    code = "*fp8e4nv" if fp8 else "*i8"
    args = {
        "a_ptr": code, "b_ptr": code, "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp16",
        "out_ptr": "*fp32" if cfg.split_k > 1 else "*fp16",
        "M": m, "N": n, "K": k, "stride_am": k, "stride_ak": 1, "stride_bn": k, "stride_bk": 1,
        "stride_sam": 0 if m == 1 else 1, "stride_sbn": 1, "stride_om": n, "stride_on": 1,
    }
    constexprs = {
        "ACC_INT": not fp8, "CODES_U8": False, "PROMOTE_K": FP8_PROMOTE_K if fp8 else 0,
        "RAW_ACC": False, "HAS_BIAS": True, "OUT_BF16": False, "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": cfg.split_k,
        "GROUP_M": cfg.group_m,
    }
    signature, divisible = {}, []
    for i, name in enumerate(_scaled_mm_kernel.arg_names):
        value = args.get(name)
        if name in constexprs or value == 1:
            signature[name] = "constexpr"
            constexprs.setdefault(name, value)
        elif isinstance(value, str):  # torch allocations are 16-byte aligned
            signature[name] = value
            divisible.append(i)
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.append(i)
    return dict(signature=signature, constexprs=constexprs, divisible=divisible,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _op(instruction: str) -> str:
    """``QGMMA`` of ``@P0 QGMMA.64x16x32.F32.E4M3.E4M3 R24, ...``."""
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def test_dispatched_configs_compile_to_the_intended_sm90_code() -> None:
    """Each distinct compile once (M = 8 and 17 often specialize alike, as do 16 and 64)."""
    cases: dict[str, dict] = {}
    for code_dtype in (torch.int8, FP8):
        for m in DISPATCH_M:
            case = _dispatch_case(m, 4096, 4096, code_dtype)
            case["name"] = json.dumps(case, sort_keys=True)
            cases.setdefault(case["name"], case)["label"] = f"{code_dtype}, M={m}"
    facts = _sass_facts(list(cases.values()))
    assert len(facts) == len(cases)
    for key, f in facts.items():
        name, fp8 = cases[key]["label"], cases[key]["constexprs"]["PROMOTE_K"] > 0
        ops = [_op(i) for i in f["loop"]]
        assert f["spills"] == 0, (name, f["spills"])
        assert not {"F2F", "F2FP", "I2F", "F2I"} & set(ops), (name, "conversion in the K loop")
        if not fp8:
            assert {"IMMA", "IGMMA"} & set(ops), (name, ops)
            continue
        # fp8: one instruction kind for every M, operands straight from shared memory
        assert f["mma"] and all(m.startswith("wgmma.mma_async") and
                                m.endswith("k32.f32.e4m3.e4m3") for m in f["mma"]), (name, f)
        assert not {"LDS", "LDSM", "STS", "HMMA"} & set(ops), (name, sorted(set(ops)))
        qgmma = [i for i in f["loop"] if _op(i) == "QGMMA"]
        fresh = [i for i in qgmma if ", RZ, !UPT" in i]  # a partial sum started from zero
        assert qgmma and len(qgmma) == 4 * len(fresh), (name, qgmma)  # promoted every 4 x k32
        assert "FADD" in ops, name  # the fp32 accumulation of the promoted partial sums

"""Numerics of the fused matmuls on the device, against float64 references (a gpu-check section).

The interpreter computes every dot exactly, so what a GPU's tensor cores do to the sums is
only visible here. For K in {4096, 14336} (``--smoke``: tiny shapes in the interpreter):

* **int8 W8A8**: the int32 accumulator must equal the exact sum (float64 is exact for these
  integers) bit for bit; the float16 output's error against the float64 result of the same
  scales is reported.
* **fp8 e4m3 GEMM**: the accumulator with unit scales against the exact float64 sum of the
  e4m3 products (also exact in float64), next to ``torch._scaled_mm`` with and without
  ``use_fast_accum``; the check is that the error stays below 2**-10 of the largest output
  (the float16 output's own rounding).
* **W4A16 dequant GEMM/GEMV**: float16 output against the float64 product with the
  dequantized weight.
* **M-invariance**: the first row computed with M in {1, 16, 64, 128} (GEMV, 16-row and larger
  tiles) must be bit-identical for int8 and fp8; for W4A16 the largest difference is shown.
* **Run-to-run determinism** at K=14336, M=1 and 16 (split-K territory): five runs must be
  bit-identical.

Writes a markdown section (``--markdown``) and ``{"checks": [[name, passed, detail], ...]}``
(``--json``); exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchlib import markdown_table
from quantkit import ops
from quantkit.quant_linear import QuantLinear
from quantkit.scheme import QuantScheme

W4 = QuantScheme("int4", "per_group", 128, has_zero=True, unsigned=True)
A8, W8 = QuantScheme("int8", "per_token"), QuantScheme("int8", "per_channel")
F8A, F8W = QuantScheme("fp8", "per_token"), QuantScheme("fp8", "per_channel")
FP8_TOL = 2.0**-10


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def f8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float8_e4m3fn).double()


class Checks:
    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self.info: list[list[Any]] = []

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.rows.append([name, passed, detail])

    def note(self, *cells: Any) -> None:
        self.info.append(list(cells))


def int8_section(c: Checks, m: int, n: int, k: int, dev: torch.device, backend: str) -> None:
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)  # (M, K)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev)  # (N, K)
    sx = torch.rand(m, 1, device=dev) / 2000 + 1e-5  # keeps |y| inside float16
    sw = torch.rand(n, 1, device=dev) / 2000 + 1e-5
    exact = xq.double() @ wq.double().T  # (M, N), exact in float64
    acc = ops.int8_matmul(xq, sx, wq, sw, None, torch.int32, backend=backend)
    c.check(f"int8 int32 accumulator exact, K={k}", torch.equal(acc.double(), exact),
            f"max abs diff {(acc.double() - exact).abs().max().item():.0f}")
    y = ops.int8_matmul(xq, sx, wq, sw, None, torch.float16, backend=backend)
    ref = exact * sx.double() * sw.double().T
    c.note("int8 W8A8 fp16 out vs float64", k, f"{rel(y, ref):.2e}")


def fp8_section(c: Checks, m: int, n: int, k: int, dev: torch.device, backend: str) -> None:
    x = torch.randn(m, k, device=dev)
    w = torch.randn(n, k, device=dev)
    xq, _, _ = ops.quantize(x, F8A, backend="torch")  # (M, K) uint8 e4m3 bits
    wq, _, _ = ops.quantize(w, F8W, backend="torch")
    one_x = torch.ones(m, 1, device=dev)
    one_w = torch.ones(n, 1, device=dev)
    exact = f8(xq) @ f8(wq).T  # (M, N) float64: every product and partial sum is exact here
    acc = ops.fp8_matmul(xq, one_x, wq, one_w, None, torch.float32, backend=backend)
    err = rel(acc, exact)
    c.check(f"fp8 accumulator error < 2^-10, K={k}", err < FP8_TOL, f"{err:.2e}")
    c.note("quantkit fp8 GEMM fp32 out vs float64 (unit scales)", k, f"{err:.2e}")
    if dev.type == "cuda" and hasattr(torch, "_scaled_mm"):
        one = torch.ones((), device=dev)
        for fast in (False, True):
            try:
                got = torch._scaled_mm(xq.view(torch.float8_e4m3fn), wq.view(torch.float8_e4m3fn).t(),
                                       scale_a=one, scale_b=one, out_dtype=torch.float32,
                                       use_fast_accum=fast)
                c.note(f"torch._scaled_mm fp32 out, use_fast_accum={fast}", k, f"{rel(got, exact):.2e}")
            except Exception as exc:  # noqa: BLE001 - a vendor reference only
                c.note(f"torch._scaled_mm use_fast_accum={fast}", k, f"failed: {type(exc).__name__}")


def w4_section(c: Checks, m: int, n: int, k: int, dev: torch.device, backend: str) -> None:
    lin = torch.nn.Linear(k, n, bias=False, device=dev)
    q = QuantLinear.from_linear(lin, W4)
    x = torch.randn(m, k, device=dev).half()
    y = ops.quant_linear_matmul(x, q.qweight, q.scales, q.qzeros, None, W4, backend=backend)
    w = q.dequantized_weight(torch.float16).double()  # (N, K)
    c.note("W4A16 int4 g128 fp16 out vs float64", k, f"{rel(y, x.double() @ w.T):.2e}")


def m_invariance(c: Checks, n: int, k: int, ms: tuple[int, ...], dev: torch.device, backend: str) -> None:
    big = max(ms)
    x = torch.randn(big, k, device=dev)
    w = torch.randn(n, k, device=dev) / k**0.5
    xq, sx, _ = ops.quantize(x, A8, backend="torch")
    wq, sw, _ = ops.quantize(w, W8, backend="torch")
    xf, sxf, _ = ops.quantize(x, F8A, backend="torch")
    wf, swf, _ = ops.quantize(w, F8W, backend="torch")
    q = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False, device=dev), W4)
    xh = x.half()
    runs = {
        "int8": lambda mm: ops.int8_matmul(xq[:mm], sx[:mm], wq, sw, None, torch.float16, backend=backend),
        "fp8": lambda mm: ops.fp8_matmul(xf[:mm], sxf[:mm], wf, swf, None, torch.float32, backend=backend),
        "w4a16": lambda mm: ops.quant_linear_matmul(xh[:mm], q.qweight, q.scales, q.qzeros, None, W4,
                                                    backend=backend),
    }
    for name, run in runs.items():
        first = [run(mm)[:1] for mm in ms]
        same = all(torch.equal(first[0], f) for f in first[1:])
        worst = max(rel(f, first[0]) for f in first)
        label = f"{name}: row 0 identical for M in {ms}, K={k}"
        if name == "w4a16":  # GEMV and tensor-core tiles sum in different orders by design
            c.note(label.replace("identical", "max rel diff"), k, f"{worst:.2e} (identical: {same})")
        else:
            c.check(label, same, f"max rel diff {worst:.2e}")
    for mm in sorted({ms[0], min(16, big)}):
        for name, run in runs.items():
            outs = [run(mm) for _ in range(5)]
            same = all(torch.equal(outs[0], o) for o in outs[1:])
            c.check(f"{name} M={mm} K={k}: 5 runs bit-identical", same,
                    "deterministic" if same else "results differ between runs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, interpreter)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    dev = torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")
    if dev.type == "cpu" and not interpret:
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 --smoke for the CPU smoke")
    torch.manual_seed(0)
    ks = (256, 264) if args.smoke else (4096, 14336)
    n, m, ms = (16, 4, (1, 4, 17)) if args.smoke else (512, 64, (1, 16, 64, 128))
    c = Checks()
    sections = [(int8_section, "int8"), (fp8_section, "fp8"), (w4_section, "w4a16")]
    for k in ks:
        for fn, name in sections:
            try:
                fn(c, m, n, k, dev, "triton")
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                c.check(f"{name} K={k} ran", False, f"{type(exc).__name__}: {exc}"[:200])
    try:
        m_invariance(c, n, ks[-1], ms, dev, "triton")
    except Exception as exc:  # noqa: BLE001
        c.check("M-invariance / determinism ran", False, f"{type(exc).__name__}: {exc}"[:200])
    checks = markdown_table(["check", "result", "detail"],
                            [[n_, "PASS" if ok else "FAIL", d] for n_, ok, d in c.rows])
    info = markdown_table(["measurement", "K", "max abs err / max abs ref"], c.info, [False, True, True])
    text = f"{checks}\n\n{info}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"checks": c.rows, "info": c.info}))
    return 0 if all(ok for _, ok, _ in c.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

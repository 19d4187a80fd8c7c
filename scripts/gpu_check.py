"""One-shot GPU check: what the project can only learn on a GPU, in one run and one report.

    python3 scripts/gpu_check.py --out gpu-check-report.md      # or: make gpu-check

Sections, in this order, each a subprocess with its own time box (a failure or a timeout is
recorded with the end of its log, and the next section still runs):

1. **environment**: GPU, driver, CUDA, python/torch/triton/transformers versions.
2. **kernel tests on CUDA**: ``tests/test_kernels_*.py`` with ``QUANTKIT_TEST_DEVICE=cuda``
   (``tests/conftest.py``: no interpreter, tensors on the GPU), i.e. compiled kernels against
   the torch references, bit-exact where the math is exact. Tests that only make sense on a
   CPU (interpreter refusals, the CPU-side sm90 compile) are deselected (:data:`CPU_ONLY`).
3. **numerics** (``scripts/gpu_numerics.py``): int8/fp8/W4A16 accumulation errors at K=4096 and
   14336 against float64, M-invariance, run-to-run determinism.
4. **static inspection**: ``scripts/inspect_kernels.py --json`` when that script exists; it
   needs no GPU and runs in the background during 2 and 3.
5. **kernel benchmark**: ``scripts/bench_kernels.py --preset check``.
6. **decode benchmark**: ``scripts/bench_decode.py`` (7B-shaped and SmolLM2-shaped models).
7. **loaded kernels**: registers, spills and SASS summary of every kernel 5 and 6 ran
   (``scripts/kernel_inventory.py``).
8. **targets** of issue 12, met or missed, computed from the JSON of 5 and 6.

Every section prints PASS, FAIL, ERROR (crashed), TIMEOUT or SKIPPED; the exit code is 1 if
any is FAIL, ERROR or TIMEOUT. Budgets (``--budget tests=150,bench=150``) and ``--total``
bound the run (default under 8 minutes).

On a GPU machine where nothing can be installed, quantkit may not be importable: the script
then links ``src/quantkit`` and ``kernels/`` into a package folder in its work dir and puts
that on the sections' ``PYTHONPATH`` (the same layout ``pip install -e .`` gives).

``--smoke`` runs every section in its CPU form (interpreter, tiny shapes) in well under a
minute: that is how the test suite checks this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BUDGETS = {"tests": 130, "numerics": 40, "inspect": 150, "bench": 160, "decode": 140}
TOTAL_S = 470
# Deselected on CUDA: they check the CPU-side refusals without the interpreter, and the
# sm90 compile of kernels on a machine without a GPU (the GPU itself does that here).
CPU_ONLY = ("need_interpreter", "needs_interpreter", "without_interpreter", "sm90")
LOG_TAIL = 4000


@dataclass
class Section:
    title: str
    status: str = "SKIPPED"
    seconds: float = 0.0
    body: str = ""
    notes: list[str] = field(default_factory=list)


def run_boxed(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group with output to ``log``; kill the whole group after
    ``timeout`` seconds. Returns ``(exit code or None on timeout, seconds)``."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return rc, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the process group this script started for ``proc``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def fenced(text: str) -> str:
    return "```\n" + text.replace("```", "'''").rstrip() + "\n```\n"


class Check:
    """The run: work dir, environment of the sections, budgets, sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.budgets = {**BUDGETS, **args.budget}
        self.sections: dict[str, Section] = {}
        self.env = self._section_env()
        self.cuda = False  # set by the environment section
        self.info: dict[str, Any] = {}

    def _section_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
        if self.smoke:
            env["TRITON_INTERPRET"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def budget(self, name: str) -> float:
        left = self.args.total - (time.monotonic() - self.start)
        return max(5.0, min(float(self.budgets[name]), left))

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]


# --------------------------------------------------------------------------------------------
# 1. environment and importability
# --------------------------------------------------------------------------------------------

_PROBE = r"""
import json, platform, torch, triton
info = {"python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda}
from importlib import metadata
for dist in ("transformers", "pytest", "pytest-xdist", "hypothesis"):
    try: info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError: info[dist] = "missing"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1))
try:
    import quantkit.kernels.matmul, quantkit.ops  # noqa: F401
    info["quantkit"] = quantkit.__file__
except Exception as exc: info["quantkit"] = f"not importable: {type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


def link_package(work: Path) -> Path:
    """``work/site/quantkit``: links to ``src/quantkit``'s entries plus ``kernels`` -> ``kernels/``
    (the layout of the installed package); returns ``work/site`` for PYTHONPATH."""
    pkg = work / "site" / "quantkit"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / "src" / "quantkit").iterdir():
        if entry.name != "__pycache__" and not (pkg / entry.name).exists():
            (pkg / entry.name).symlink_to(entry)
    if not (pkg / "kernels").exists():
        (pkg / "kernels").symlink_to(REPO / "kernels")
    return work / "site"


def _from_repo(info: dict[str, Any]) -> bool:
    """Whether the probe imported quantkit from this repository (directly or through links)."""
    path = Path(str(info.get("quantkit", "")))
    return path.is_absolute() and path.resolve().is_relative_to(REPO.resolve())


def environment(ck: Check) -> Section:
    sec = Section("Environment")
    lines = [f"- host: {platform.node()}, {platform.platform()}",
             f"- python executable: `{sys.executable}`", f"- repository: `{REPO}`"]
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
             "clocks.max.mem,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30)
        lines.append(f"- nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        lines.append(f"- nvidia-smi: not available ({type(exc).__name__})")
    probe = subprocess.run(ck.python("-c", _PROBE), cwd=REPO, env=ck.env, capture_output=True,
                           text=True, timeout=120)
    info: dict[str, Any] = {}
    if probe.returncode == 0:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    if not _from_repo(info):  # missing, or another checkout's: use this tree's sources
        site = link_package(ck.work)
        ck.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), ck.env.get("PYTHONPATH")]))
        lines.append(f"- quantkit was not importable from this tree "
                     f"({info.get('quantkit', probe.stderr[-300:])}); linked into `{site}` "
                     "and put on PYTHONPATH")
        probe = subprocess.run(ck.python("-c", _PROBE), cwd=REPO, env=ck.env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            info = json.loads(probe.stdout.strip().splitlines()[-1])
    if probe.returncode != 0:
        sec.status, sec.body = "ERROR", "\n".join(lines) + "\n\n" + fenced(probe.stderr[-LOG_TAIL:])
        return sec
    lines += [f"- {k}: {v}" for k, v in info.items()]
    pins = {"torch": "2.13", "triton": "3.9"}
    for name, want in pins.items():
        if not str(info.get(name, "")).startswith(want):
            lines.append(f"- NOTE: {name} {info.get(name)} here, the project pins {want}.x "
                         "(CPU CI): results are for this version")
    ok = _from_repo(info) and (info.get("cuda_available") or ck.smoke)
    sec.status = "PASS" if ok else "FAIL"
    if not info.get("cuda_available") and not ck.smoke:
        lines.append("- CUDA is not available: every GPU section is skipped")
    ck.cuda = bool(info.get("cuda_available"))
    ck.info = info
    sec.body = "\n".join(lines) + "\n"
    return sec


# --------------------------------------------------------------------------------------------
# 2. kernel tests, 3. numerics, 4. inspection
# --------------------------------------------------------------------------------------------

def kernel_tests(ck: Check) -> Section:
    sec = Section("Kernel tests, compiled on CUDA, against the torch references")
    junit, log = ck.work / "junit.xml", ck.work / "tests.log"
    env = dict(ck.env)
    if ck.smoke:  # CPU form: one small kernel file in the interpreter
        files, extra = ["tests/test_kernels_pack.py"], ["-q", "-k", "int4 and 13x37 and not sm90"]
    else:
        env["QUANTKIT_TEST_DEVICE"] = "cuda"
        # the fused matmuls first: a time-out then cuts the cheaper element-wise files
        files = sorted((str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels_*.py")),
                       key=lambda f: ("matmul" not in f, f))
        extra = ["-v", "-k", "not (" + " or ".join(CPU_ONLY) + ")"]
        if ck.info.get("pytest-xdist", "missing") != "missing" and ck.args.test_workers > 1:
            extra += ["-n", str(ck.args.test_workers)]
        else:
            sec.notes.append("pytest-xdist missing: tests run in one process")
    cmd = ck.python("-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra, *files)
    rc, sec.seconds = run_boxed(cmd, env, ck.budget("tests"), log)
    counts, failures = parse_junit(junit)
    if rc is None:  # killed before pytest wrote its junit report: count the verbose log lines
        counts, failures = parse_verbose_log(log)
        counts += f" before the {ck.budget('tests'):.0f} s time box ran out"
    sec.body = f"`{shlex.join(['python', *cmd[1:]])}`\n\n- {counts}\n"
    if failures:
        sec.body += "\nFailures (first lines):\n\n" + fenced("\n".join(failures[:60]))
    if rc is None:
        sec.status = "TIMEOUT"
    elif rc == 0:
        sec.status = "PASS"
    else:
        sec.status = "FAIL" if failures else "ERROR"
    if sec.status != "PASS":
        sec.body += "\nEnd of the log:\n\n" + fenced(tail(log))
    return sec


def parse_verbose_log(path: Path) -> tuple[str, list[str]]:
    """Counts and failed test ids from ``pytest -v`` output (``... PASSED``/``[gw0] PASSED ...``)."""
    counts = dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED"), 0)
    failed = []
    for line in tail(path, 10**8).splitlines():
        for word in counts:
            if f" {word} " in f" {line} " and "::" in line:
                counts[word] += 1
                if word in ("FAILED", "ERROR"):
                    failed.append(next((t for t in line.split() if "::" in t), line)[:300])
                break
    text = (f"{counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
            f"{counts['SKIPPED']} skipped")
    return text, failed


def parse_junit(path: Path) -> tuple[str, list[str]]:
    """``("N passed, N failed, N errors, N skipped", ["test id: message", ...])``."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no junit report (the run did not finish)", []
    cases = list(root.iter("testcase"))
    failed, errors, skipped, lines = 0, 0, 0, []
    for case in cases:
        for tag in ("failure", "error"):
            for node in case.findall(tag):
                failed += tag == "failure"
                errors += tag == "error"
                msg = (node.get("message") or node.text or "").strip().splitlines()
                lines.append(f"{case.get('classname')}::{case.get('name')}: "
                             f"{msg[0][:300] if msg else tag}")
        skipped += bool(case.findall("skipped"))
    passed = len(cases) - failed - errors - skipped
    return f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped", lines


def numerics(ck: Check) -> Section:
    sec = Section("Numerics: accumulation errors against float64, M-invariance, determinism")
    md, js, log = ck.work / "numerics.md", ck.work / "numerics.json", ck.work / "numerics.log"
    cmd = ck.python(str(SCRIPTS / "gpu_numerics.py"), "--markdown", str(md), "--json", str(js),
                    *(["--smoke"] if ck.smoke else []))
    rc, sec.seconds = run_boxed(cmd, ck.env, ck.budget("numerics"), log)
    sec.body = md.read_text() if md.exists() else ""
    sec.status = {None: "TIMEOUT", 0: "PASS", 1: "FAIL"}.get(rc, "ERROR")
    if sec.status in ("TIMEOUT", "ERROR"):
        sec.body += "\n" + fenced(tail(log))
    return sec


def start_inspection(ck: Check) -> tuple[subprocess.Popen | None, float, Path, Path]:
    script, js, log = ck.args.inspect_script, ck.work / "inspect.json", ck.work / "inspect.log"
    if not script.exists() or "inspect" in ck.args.skip:
        return None, 0.0, js, log
    out = open(log, "w")  # noqa: SIM115 - closed with the process in finish_inspection
    proc = subprocess.Popen(ck.python(str(script), "--json", str(js)), cwd=REPO, env=ck.env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, time.monotonic(), js, log


def finish_inspection(ck: Check, started: tuple[subprocess.Popen | None, float, Path, Path]) -> Section:
    proc, t0, js, log = started
    sec = Section("Static sm90 inspection (scripts/inspect_kernels.py)")
    if proc is None:
        reason = ("skipped by --skip" if "inspect" in ck.args.skip
                  else f"{ck.args.inspect_script} is missing")
        sec.body = f"{reason}\n"
        return sec
    left = ck.budgets["inspect"] - (time.monotonic() - t0)
    try:
        rc: int | None = proc.wait(timeout=max(1.0, left))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc = None
    sec.seconds = time.monotonic() - t0
    sec.status = {None: "TIMEOUT", 0: "PASS"}.get(rc, "FAIL")
    records = []
    if js.exists():
        try:
            records = json.loads(js.read_text())
        except json.JSONDecodeError as exc:
            sec.notes.append(f"unreadable JSON: {exc}")
    if isinstance(records, dict):
        records = records.get("records") or records.get("kernels") or []
    if records:
        from benchlib import markdown_table

        keys = list(records[0])
        sec.body = markdown_table(keys, [[_cell(r.get(k)) for k in keys] for r in records]) + "\n"
        spilling = [r for r in records if (r.get("spills_bytes") or 0) > 0]
        sec.notes.append(f"{len(records)} kernel configs, {len(spilling)} with spills")
    if sec.status != "PASS" or not records:
        sec.body += "\n" + fenced(tail(log))
    return sec


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# 5. kernel benchmark, 6. decode, 7. loaded kernels, 8. targets
# --------------------------------------------------------------------------------------------

def bench_kernels(ck: Check) -> Section:
    sec = Section("Kernel benchmark (scripts/bench_kernels.py)")
    md, js, kj = ck.work / "bench.md", ck.work / "bench.json", ck.work / "bench_kernels.json"
    budget = ck.budget("bench")
    mode = ["--quick"] if ck.smoke else ["--preset", "check"]
    cmd = ck.python(str(SCRIPTS / "bench_kernels.py"), *mode, "--markdown", str(md),
                    "--json", str(js), "--kernels-json", str(kj), "--deadline", f"{budget * 0.8:.0f}")
    return _bench_section(ck, sec, cmd, budget, md, js, ck.work / "bench.log",
                          lambda data: _bench_problems(data))


def bench_decode(ck: Check) -> Section:
    sec = Section("Decode benchmark (scripts/bench_decode.py)")
    md, js, kj = ck.work / "decode.md", ck.work / "decode.json", ck.work / "decode_kernels.json"
    budget = ck.budget("decode")
    mode = (["--batches", "1,2", "--steps", "2", "--prompt-len", "4", "--variants", "dense,w4a16"]
            if ck.smoke else [])
    cmd = ck.python(str(SCRIPTS / "bench_decode.py"), *mode, "--markdown", str(md),
                    "--json", str(js), "--kernels-json", str(kj), "--deadline", f"{budget * 0.7:.0f}")
    return _bench_section(ck, sec, cmd, budget, md, js, ck.work / "decode.log",
                          lambda data: [f"{r.get('model')} {r.get('variant')}: failed"
                                        for r in data.get("tables", {}).get("decode", [])
                                        if r.get("mode") == "FAILED"])


def _bench_section(ck: Check, sec: Section, cmd: list[str], budget: float, md: Path, js: Path,
                   log: Path, problems) -> Section:
    rc, sec.seconds = run_boxed(cmd, ck.env, budget, log)
    body = md.read_text() if md.exists() else ""
    if body.startswith("# "):
        body = body.split("\n", 1)[1]  # its title: the section has one
    sec.body = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
    data = json.loads(js.read_text()) if js.exists() else {}
    found = problems(data)
    if "\n## Failures" in body:  # bench_kernels lists rows that raised under this heading
        found.append("rows failed: see the tracebacks in this section")
    sec.notes += found
    sec.status = "TIMEOUT" if rc is None else ("ERROR" if rc != 0 else ("FAIL" if found else "PASS"))
    if rc != 0:
        sec.body += "\nEnd of the log:\n\n" + fenced(tail(log))
    return sec


def _bench_problems(data: dict[str, Any]) -> list[str]:
    """Rows that contradict the contract: triton != torch bits, or a large matmul error."""
    out = []
    for r in data.get("tables", {}).get("ops", []):
        if r.get("exact") is False:
            out.append(f"{r['op']} {r['scheme']} {r['shape']}: triton and torch differ")
    for r in data.get("tables", {}).get("matmul", []):
        if r.get("exact") is False or (r.get("err") is not None and r["err"] > 2e-2):
            out.append(f"{r['kernel']} M={r['m']} {r['shape']} {r['dtype']}: error {r.get('err')}")
    return out


def loaded_kernels(ck: Check) -> Section:
    sec = Section("Kernels actually loaded by the benchmarks (registers, spills, SASS)")
    records = []
    for name in ("bench_kernels.json", "decode_kernels.json"):
        path = ck.work / name
        if path.exists():
            records += json.loads(path.read_text())
    if not records:
        sec.body = "no kernel records (the benchmarks did not write them: CPU smoke, or they failed)\n"
        return sec
    from kernel_inventory import inventory_table

    unique = {json.dumps({k: r.get(k) for k in ("kernel", "constexprs", "num_warps", "num_stages",
                                                "regs")}, sort_keys=True, default=str): r
              for r in records}
    rows = sorted(unique.values(), key=lambda r: (r["kernel"], str(r["constexprs"])))
    spills = [r for r in rows if (r.get("spill_bytes") or 0) > 0]
    sec.body = inventory_table(rows) + "\n"
    sec.notes.append(f"{len(rows)} compiled specializations, {len(spills)} with spills")
    sec.status = "FAIL" if spills else "PASS"
    return sec


def targets(ck: Check) -> Section:
    """Issue 12's targets from the benchmark JSON (informational: never a FAIL)."""
    sec = Section("Targets of issue 12 (measured, not asserted)")
    bench = _load(ck.work / "bench.json")
    decode = _load(ck.work / "decode.json")
    mm = bench.get("tables", {}).get("matmul", [])
    lines = []

    def line(name: str, value: float | None, goal: float, unit: str) -> None:
        if value is None:
            lines.append(f"- n/a: {name} (not measured)")
        else:
            verdict = "MET" if value >= goal else "MISSED"
            lines.append(f"- {verdict}: {name}: {value:.2f}{unit} (target >= {goal:g}{unit})")

    def pick(kernel: str, m: int, shape: list[int], key: str, dtype: str = "fp16") -> float | None:
        for r in mm:
            if r["kernel"] == kernel and r["m"] == m and r["shape"] == shape and r["dtype"] == dtype:
                return r.get(key)
        return None

    for shape in ([4096, 4096], [14336, 4096]):
        line(f"W4A16 M=1 {shape[0]}x{shape[1]} % of copy bandwidth",
             pick("quantkit int4 g128 asym", 1, shape, "pct_copy"), 80, "%")
    line("W8A8 int8 GEMM M=4096 4096x4096 speed-up vs fp16 cuBLAS",
         pick("quantkit w8a8 int8 GEMM (codes given)", 4096, [4096, 4096], "speedup_vs_cublas"), 1.6, "x")
    int8 = pick("quantkit w8a8 int8 GEMM (codes given)", 4096, [4096, 4096], "tflops")
    fp8 = pick("quantkit fp8 GEMM (codes given)", 4096, [4096, 4096], "tflops")
    line("fp8 GEMM throughput / int8 GEMM throughput, M=4096 4096x4096",
         None if int8 is None or fp8 is None else fp8 / int8, 1.0, "x")
    ops = bench.get("tables", {}).get("ops", [])
    if ops:
        worst = min(ops, key=lambda r: r.get("pct_copy") or 0)
        line(f"quantize/dequantize/pack: lowest % of copy bandwidth ({worst['op']} {worst['scheme']})",
             worst.get("pct_copy"), 70, "%")
    else:
        line("quantize/dequantize/pack % of copy bandwidth", None, 70, "%")
    speed = [r.get("speedup_vs_dense") for r in decode.get("tables", {}).get("decode", [])
             if r.get("model") == "llama-7b" and r.get("variant") == "w4a16" and r.get("batch") == 1]
    line("decode batch 1, 7B-shaped, W4A16 tokens/s vs float16", speed[0] if speed else None, 2.5, "x")
    sec.body = "\n".join(lines) + "\n"
    sec.status = "PASS" if lines else "SKIPPED"
    counts = {v: sum(line.startswith(f"- {v}") for line in lines) for v in ("MET", "MISSED", "n/a")}
    sec.notes.append(", ".join(f"{n} {v}" for v, n in counts.items()))
    return sec


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------

def guarded(ck: Check, key: str, fn) -> None:
    """Run one section; an exception in this script becomes an ERROR section, not the end."""
    if key in ck.args.skip:
        ck.sections[key] = Section(key, "SKIPPED", body="skipped by --skip\n")
        return
    try:
        ck.sections[key] = fn(ck)
    except Exception:  # noqa: BLE001 - the report must still be written
        ck.sections[key] = Section(key, "ERROR", body=fenced(traceback.format_exc()))
    write_report(ck)


def write_report(ck: Check) -> str:
    rows = ["| section | status | seconds | notes |", "|---|---|---:|---|"]
    for sec in ck.sections.values():
        rows.append(f"| {sec.title} | **{sec.status}** | {sec.seconds:.0f} | "
                    f"{'; '.join(sec.notes)[:300].replace('|', '/')} |")
    worst = [s for s in ck.sections.values() if s.status in ("FAIL", "ERROR", "TIMEOUT")]
    verdict = "FAIL" if worst else "PASS"
    parts = [f"# quantkit GPU check{' (CPU smoke)' if ck.smoke else ''}: {verdict}", "",
             f"- total {time.monotonic() - ck.start:.0f} s; work dir `{ck.work}`", "", *rows, ""]
    for i, sec in enumerate(ck.sections.values(), 1):
        parts += [f"## {i}. {sec.title}: {sec.status}", "", sec.body.strip(), ""]
    text = "\n".join(parts) + "\n"
    ck.args.out.parent.mkdir(parents=True, exist_ok=True)
    ck.args.out.write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def budgets(text: str) -> dict[str, float]:
        out = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in BUDGETS:
                raise argparse.ArgumentTypeError(f"budget {key!r} unknown; valid: {', '.join(BUDGETS)}")
            out[key] = float(value)
        return out

    sections = ("tests", "numerics", "inspect", "bench", "decode")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check-report.md"), help="the report")
    p.add_argument("--workdir", help="keep the sections' files here (default: a temp dir)")
    p.add_argument("--budget", type=budgets, default={}, help="seconds per section, e.g. tests=200")
    p.add_argument("--total", type=float, default=TOTAL_S, help="seconds for the whole run")
    p.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help=f"sections to skip: {', '.join(sections)}")
    p.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers")
    p.add_argument("--smoke", action="store_true", help="CPU form of every section (tests)")
    p.add_argument("--inspect-script", type=Path, default=SCRIPTS / "inspect_kernels.py",
                   help="the static inspection, called with --json FILE")
    args = p.parse_args(argv)
    bad = [s for s in args.skip if s not in sections]
    if bad:
        p.error(f"--skip {bad} unknown; valid: {', '.join(sections)}")
    return args


def main(argv: list[str] | None = None) -> int:
    ck = Check(parse_args(argv))
    guarded(ck, "environment", environment)
    gpu_ok = ck.cuda or ck.smoke
    inspection = start_inspection(ck)
    for key, fn in (("tests", kernel_tests), ("numerics", numerics)):
        guarded(ck, key, fn if gpu_ok else _no_gpu(key))
    guarded(ck, "inspect", lambda c: finish_inspection(c, inspection))
    for key, fn in (("bench", bench_kernels), ("decode", bench_decode)):
        guarded(ck, key, fn if gpu_ok else _no_gpu(key))
    guarded(ck, "kernels", loaded_kernels)
    guarded(ck, "targets", targets)
    text = write_report(ck)
    print(text)
    print(f"report: {ck.args.out}")
    return 1 if "FAIL" in text.splitlines()[0] else 0


def _no_gpu(key: str):
    return lambda ck: Section(key, "SKIPPED", body="CUDA is not available\n")


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps on the tiny model: joblib launcher, skipped and failed combinations, resume, the report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from quantkit import report
from quantkit.results import FAILED_FILE, RESULTS_FILE, write_failed, write_json_atomic, write_skipped
from tests.test_run import ROOT, TINY, run_cli


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _csv_rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_joblib_sweep_skips_bad_combinations_resumes_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "eval.baseline=true",
            "algo=rtn,gptq", "algo.groupsize=16,4096", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    complete = sorted(sweep.glob(f"*/{RESULTS_FILE}"))
    skipped = sorted(sweep.glob("*/skipped.json"))
    assert len(complete) == 2 and len(skipped) == 2  # groupsize 4096 > the tiny model's width 64
    for path in skipped:
        reason = json.loads(path.read_text())["reason"]
        assert "algo.groupsize=4096 is larger than the model's smallest layer input (64)" in reason
    # the report is written by the sweep's callback: every run is a row, none dropped
    rows = _csv_rows(sweep)
    assert sorted(r["status"] for r in rows) == ["complete", "complete", "skipped", "skipped"]
    assert {r["algo"] for r in rows if r["status"] == "complete"} == {"rtn", "gptq"}
    for r in rows:
        if r["status"] == "complete":
            assert float(r["perplexity"]) > 1 and float(r["bits_per_weight"]) > 4
            assert r["delta_vs_float16_pct"] != ""  # eval.baseline=true: delta against float16
    md = (sweep / "report.md").read_text()
    assert "2 complete, 2 not complete" in md and "skipped" in md
    assert (sweep / "ppl_vs_bits.png").stat().st_size > 0 and (sweep / "ppl_vs_groupsize.png").stat().st_size > 0

    # interrupt one run (its results never written) and lose another's folder; rerun the sweep
    kept, lost = complete
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(lost.parent)
    rows = report.collect(sweep)
    assert [r.run for r in rows if r.status == "missing"] == [lost.parent.name]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert kept.stat().st_mtime_ns == stamp, "a complete run was redone"
    assert "complete results already in" in proc.stdout + proc.stderr
    assert json.loads(lost.read_text())["status"] == "complete"
    assert [r["status"] for r in _csv_rows(sweep)].count("complete") == 2


@pytest.mark.slow
def test_interrupted_run_is_listed_and_rerun(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "w_dtype=int3,int4", "algo.groupsize=32", f"hydra.sweep.dir={sweep}"]
    assert run_cli(*args).returncode == 0
    first, second = sorted(sweep.glob(f"*/{RESULTS_FILE}"))
    second.unlink()  # as if killed before the atomic write: .hydra/ exists, results do not
    rows = {r.run: r.status for r in report.collect(sweep)}
    assert rows == {first.parent.name: "complete", second.parent.name: "incomplete"}
    report.write_report(sweep)
    assert "running, interrupted or killed" in (sweep / "report.md").read_text()
    stale = second.parent / "skipped.json"  # e.g. skipped by an older version that rejected it
    stale.write_text(json.dumps({"status": "skipped", "reason": "no longer true", "config": None}))
    assert run_cli(*args).returncode == 0
    assert json.loads(second.read_text())["status"] == "complete"
    assert not stale.exists()


@pytest.mark.slow
def test_report_script_on_a_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    assert run_cli("-m", *TINY, "w_dtype=int4,int8", "algo.groupsize=-1", f"hydra.sweep.dir={sweep}").returncode == 0
    for name in ("report.md", "report.csv"):
        (sweep / name).unlink()
    out = tmp_path / "elsewhere"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _csv_rows(out)
    assert sorted(r["w_dtype"] for r in rows) == ["int4", "int8"]
    ppl = {r["w_dtype"]: float(r["perplexity"]) for r in rows}
    assert ppl["int8"] <= ppl["int4"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_experiment_presets_compose_and_sweep_valid_values(experiment):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    assert cfg.name == experiment  # each preset sweeps into its own multirun/<name>
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, "a preset must define what it sweeps"
    for key, values in params.items():
        group = key.split(".")[0]
        for value in str(values).split(","):
            if group in ("algo", "w_dtype", "a_dtype") and "." not in key:
                assert (ROOT / "conf" / group / f"{value}.yaml").is_file(), f"{key}={value}"


@pytest.mark.slow
def test_crashing_job_is_reported_as_failed_and_rerun(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "algo.groupsize=-1", "save.enabled=true", "w_dtype=int4,int8", f"hydra.sweep.dir={sweep}"]
    # the job's folder as Hydra names it (sorted overrides, booleans as Python prints them)
    crashing = sweep / ",".join(sorted([*TINY, "algo.groupsize=-1", "save.enabled=True", "w_dtype=int8"]))
    (crashing / "model").mkdir(parents=True)
    (crashing / "model" / "notes.txt").write_text("not a saved model: the save refuses to replace it")
    proc = run_cli(*args)
    assert proc.returncode != 0  # the sweep ran to its end, then says that a job failed
    assert "1 sweep job(s) failed" in proc.stderr and crashing.name in proc.stderr
    rows = {r["run"]: r for r in _csv_rows(sweep)}  # the report was written nevertheless
    assert sorted(r["status"] for r in rows.values()) == ["complete", "failed"]
    failed = rows[crashing.name]
    assert failed["w_dtype"] == "int8" and "FileExistsError" in failed["note"]
    assert not (crashing / RESULTS_FILE).exists() and (crashing / FAILED_FILE).is_file()
    assert "failed" in (sweep / "report.md").read_text()
    (done,) = sweep.glob(f"*/{RESULTS_FILE}")
    stamp = done.stat().st_mtime_ns

    (crashing / "model" / "notes.txt").unlink()  # the cause removed, the same command resumes
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert done.stat().st_mtime_ns == stamp and not (crashing / FAILED_FILE).exists()
    assert sorted(r["status"] for r in _csv_rows(sweep)) == ["complete", "complete"]


def _fake_results(run_dir: Path, algo: str, pre: str | None, ppl: float, bits: float = 4.25) -> None:
    config = {"algo": {"name": algo, "pre": pre, "groupsize": 128}, "w_dtype": {"name": "int4"},
              "a_dtype": {"name": "float16"}}
    write_json_atomic(run_dir / RESULTS_FILE, {
        "status": "complete", "algo": algo if pre is None else f"{pre}+{algo}", "w_dtype": "int4",
        "a_dtype": "float16", "groupsize": 128, "perplexity": ppl, "bits_per_weight": bits,
        "model_bytes_after": 2**20, "quantization_seconds": 1.0, "config": config})


def test_rows_for_every_outcome_and_compositions_get_their_own_label(tmp_path):
    _fake_results(tmp_path / "gptq", "gptq", None, 15.0)
    _fake_results(tmp_path / "awq_gptq", "gptq", "awq", 14.5)
    old = tmp_path / "sq_gptq_old"  # written before labels named the composition
    _fake_results(old, "gptq", None, 14.8)
    record = json.loads((old / RESULTS_FILE).read_text())
    record["config"]["algo"]["pre"] = "smoothquant"
    write_json_atomic(old / RESULTS_FILE, record)
    crashed = tmp_path / "crashed"
    write_failed(crashed, RuntimeError("CUDA out of memory"), {"algo": {"name": "awq"}, "w_dtype": {"name": "int3"}})
    stale = tmp_path / "stale"  # complete results, but the latest attempt failed on them
    _fake_results(stale, "rtn", None, 16.0)
    write_failed(stale, RuntimeError("holds the complete results of a different config"), None)
    write_skipped(tmp_path / "bad", "algo.groupsize=4096 is larger", {"algo": {"name": "gptq", "pre": "awq"}})

    rows = {r.run: r for r in report.collect(tmp_path)}
    assert {k: r.status for k, r in rows.items()} == {
        "gptq": "complete", "awq_gptq": "complete", "sq_gptq_old": "complete", "crashed": "failed",
        "stale": "failed", "bad": "skipped"}
    assert rows["awq_gptq"].values["algo"] == "awq+gptq"
    assert rows["sq_gptq_old"].values["algo"] == "smoothquant+gptq"
    assert rows["bad"].values["algo"] == "awq+gptq"
    assert rows["crashed"].values["note"] == "RuntimeError: CUDA out of memory"
    assert rows["crashed"].values["algo"] == "awq" and rows["crashed"].values["w_dtype"] == "int3"
    complete = [r for r in rows.values() if r.status == "complete"]
    assert sorted(report.bits_lines(complete)) == ["awq+gptq a=float16", "gptq a=float16", "smoothquant+gptq a=float16"]
    md = report.write_report(tmp_path).read_text()
    assert "| crashed | failed | RuntimeError: CUDA out of memory |" in md and "awq+gptq" in md


def test_sweep_end_writes_the_report_then_fails_if_a_job_failed(tmp_path):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    _fake_results(tmp_path / "ok", "rtn", None, 15.0)
    report.ReportCallback().on_multirun_end(config)  # nothing failed: no exit
    assert "1 complete" in (tmp_path / "report.md").read_text()
    write_failed(tmp_path / "boom", ValueError("NaN in the Hessian"), None)
    (tmp_path / "report.md").unlink()
    with pytest.raises(SystemExit, match="1 sweep job\\(s\\) failed: boom"):
        report.ReportCallback().on_multirun_end(config)
    assert "| boom | failed | ValueError: NaN in the Hessian |" in (tmp_path / "report.md").read_text()


def _with_tasks(run_dir: Path, tasks: dict, baseline_tasks: dict | None = None) -> None:
    record = json.loads((run_dir / RESULTS_FILE).read_text())
    write_json_atomic(run_dir / RESULTS_FILE, {**record, "tasks": tasks, "baseline_tasks": baseline_tasks or {}})


def test_task_metrics_become_columns_and_a_plot_and_runs_without_tasks_stay_rows(tmp_path):
    base = {"arc_easy": {"acc": 0.6, "acc_stderr": 0.01, "n": 100}}
    for name, bits, acc in (("rtn_int4", 4.25, 0.55), ("rtn_int3", 3.25, 0.41)):
        _fake_results(tmp_path / name, "rtn", None, 15.0, bits)
        _with_tasks(tmp_path / name, {"arc_easy": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01, "n": 100,
                                                   "num_fewshot": 0},
                                      "ceval": {"acc": 0.3, "acc_stderr": None, "n": 5, "num_fewshot": 0,
                                                "subjects": {"logic": {"acc": 0.3, "acc_stderr": None, "n": 5}}}},
                    base)
    _fake_results(tmp_path / "old", "gptq", None, 14.0)  # written before tasks existed: no "tasks" key

    md = report.write_report(tmp_path).read_text()
    rows = {r["run"]: r for r in _csv_rows(tmp_path)}
    header = list(rows["old"])
    assert header[-1] == "note" and header[header.index("quant_seconds") + 1:-1] == [
        "arc_easy.acc", "arc_easy.acc_stderr", "arc_easy.acc_norm", "ceval.acc"]
    assert float(rows["rtn_int3"]["arc_easy.acc"]) == 0.41 and float(rows["rtn_int4"]["arc_easy.acc_stderr"]) == 0.02
    assert rows["old"]["arc_easy.acc"] == "" and rows["old"]["status"] == "complete"
    table_header = next(line for line in md.splitlines() if "| algo |" in line)
    assert "arc_easy.acc | arc_easy.acc_norm | ceval.acc |" in table_header and "stderr" not in table_header
    assert "| 0.410 ± 0.020 |" in md and "float16 baseline tasks: arc_easy.acc 0.600" in md
    assert (tmp_path / "acc_vs_bits.png").stat().st_size > 0 and "![acc_vs_bits](acc_vs_bits.png)" in md


def test_report_without_any_tasks_has_no_task_plot(tmp_path):
    _fake_results(tmp_path / "a", "rtn", None, 15.0)
    md = report.write_report(tmp_path).read_text()
    assert not (tmp_path / "acc_vs_bits.png").exists() and "acc_vs_bits" not in md
    assert list(_csv_rows(tmp_path)[0])[-2:] == ["quant_seconds", "note"]


@pytest.mark.slow
def test_sweep_with_tasks_reports_columns_and_plot(tmp_path):
    """The issue's check through scripts/run.py: gptq (and rtn) at the default int4 with a local
    lm-eval task and CMMLU-shaped files write task scores, and the report shows them."""
    sweep = tmp_path / "sweep"
    fixtures = ROOT / "tests" / "fixtures"
    proc = run_cli("-m", *TINY, "algo=rtn,gptq", "algo.groupsize=32", "eval.baseline=true",
                   "eval.tasks=[quantkit_tiny_mc,cmmlu]", f"eval.task_paths=[{fixtures / 'lm_eval_tasks'}]",
                   f"eval.cmmlu.path={fixtures / 'cmmlu'}", "eval.cmmlu.subjects=[arts]",
                   # data locations are no sweep axis: keep them out of the job folder names
                   "hydra.job.config.override_dirname.exclude_keys=[name,experiment,eval.task_paths,eval.cmmlu.path]",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _csv_rows(sweep)
    assert sorted(r["algo"] for r in rows) == ["gptq", "rtn"]
    for r in rows:
        for column in ("quantkit_tiny_mc.acc", "quantkit_tiny_mc.acc_stderr", "cmmlu.acc", "cmmlu.acc_stderr"):
            assert 0 <= float(r[column]) <= 1, column
    md = (sweep / "report.md").read_text()
    assert "quantkit_tiny_mc.acc" in md and "±" in md and "float16 baseline tasks:" in md
    assert (sweep / "acc_vs_bits.png").stat().st_size > 0 and (sweep / "ppl_vs_bits.png").stat().st_size > 0


def _probe_results(run_dir: Path, ppl: float, probe: dict | None, layers: list | None = None) -> None:
    """Fake results of a run with per-layer schemes: ``probe`` is its sensitivity node."""
    _fake_results(run_dir, "rtn", None, ppl)
    record = json.loads((run_dir / RESULTS_FILE).read_text())
    sens = {"type": None, "blocks": None, "w_dtype": {"name": "int3", "has_zero": True, "unsigned": True},
            "a_dtype": None, "groupsize": None, "skip": False, **(probe or {})}
    record["config"].update(sensitivity=sens, layers=layers or [], output_dir=str(run_dir))
    record.update(w_scheme="int4 g128 asym unsigned", mixed=bool(probe or layers),
                  scheme_counts={"int4 g128 asym unsigned": 150, "int3 g128 asym unsigned": 30})
    write_json_atomic(run_dir / RESULTS_FILE, record)


def test_sensitivity_probes_are_reported_against_their_reference_run(tmp_path):
    _probe_results(tmp_path / "ref", 20.0, None)
    for kind, ppl in (("down", 30.0), ("q", 21.0), ("gate", 25.0)):
        _probe_results(tmp_path / f"type={kind}", ppl, {"type": kind})
    _probe_results(tmp_path / "blocks=0-4", 24.0, {"blocks": "0-4"})
    _probe_results(tmp_path / "blocks=5-9", 22.0, {"blocks": "5-9"})
    _probe_results(tmp_path / "g64", 40.0, {"type": "down", "groupsize": 64})  # other probe overrides: same reference
    md = report.write_report(tmp_path).read_text()
    section = md[md.index("## Sensitivity"):]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "probe scheme" not in line]
    # layer types in dataflow order, then block ranges by their first block
    assert [line.split(" | ")[0] for line in lines] == ["| q", "| gate", "| down", "| down", "| blocks 0-4", "| blocks 5-9"]
    assert "| down | w=int3 asym unsigned | ref | 30.000 | 20.000 | +50.0 | 4.250 |" in section
    assert "| q | w=int3 asym unsigned | ref | 21.000 | 20.000 | +5.0 | 4.250 |" in section
    assert "| down | w=int3 asym unsigned g64 | ref | 40.000 | 20.000 | +100.0 |" in section
    assert (tmp_path / "sensitivity.png").stat().st_size > 0 and "![sensitivity](sensitivity.png)" in md
    rows = {r["run"]: r for r in _csv_rows(tmp_path)}
    assert rows["type=down"]["sensitivity"] == "down" and rows["ref"]["sensitivity"] == ""
    assert rows["type=down"]["note"] == "150 x int4 g128 asym unsigned, 30 x int3 g128 asym unsigned"


def test_rules_column_and_probes_without_a_reference(tmp_path):
    _probe_results(tmp_path / "mixed", 18.0, None,
                   layers=[{"match": ".*down_proj", "w_dtype": {"name": "int8"}, "a_dtype": None, "groupsize": -1,
                            "skip": False}, {"match": "lm_head", "w_dtype": None, "a_dtype": None, "groupsize": None,
                                             "skip": True}])
    _probe_results(tmp_path / "probe", 25.0, {"blocks": "3"})
    record = json.loads((tmp_path / "probe" / RESULTS_FILE).read_text())
    record["config"]["algo"]["groupsize"] = 64  # its reference would be another config: none in the sweep
    write_json_atomic(tmp_path / "probe" / RESULTS_FILE, record)
    md = report.write_report(tmp_path).read_text()
    rows = {r["run"]: r for r in _csv_rows(tmp_path)}
    header = list(rows["mixed"])
    assert header[header.index("groupsize") + 1:header.index("groupsize") + 3] == ["layers", "sensitivity"]
    assert rows["mixed"]["layers"] == ".*down_proj: w=int8 channel; lm_head: skip" and rows["probe"]["layers"] == ""
    assert "| blocks 3 | w=int3 asym unsigned | (none) | 25.000 |  |  |" in md and "add `sensitivity.type=null`" in md
    assert (tmp_path / "sensitivity.png").is_file()  # perplexity itself where no increase can be computed


@pytest.mark.slow
def test_sensitivity_sweep_on_the_tiny_model(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "algo.groupsize=32", "sensitivity.w_dtype=int2", "sensitivity.type=null,q,down",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["sensitivity"]: r for r in _csv_rows(sweep)}
    assert sorted(rows) == ["", "down", "q"] and {r["status"] for r in rows.values()} == {"complete"}
    md = (sweep / "report.md").read_text()
    ref = float(rows[""]["perplexity"])
    for kind in ("q", "down"):  # int2 on one type: fewer bits than the int4 reference, another perplexity
        assert float(rows[kind]["bits_per_weight"]) < float(rows[""]["bits_per_weight"])
        ppl = float(rows[kind]["perplexity"])
        assert ppl != ref and f"| {ppl:.3f} | {ref:.3f} | {100 * (ppl / ref - 1):+.1f} |" in md
    assert "## Sensitivity" in md and (sweep / "sensitivity.png").stat().st_size > 0
    assert "missing" not in md  # every job of multirun.yaml (sensitivity.type=null included) was found


def test_runs_that_differ_only_in_keys_without_a_column_are_named(tmp_path):
    """Two clip ratios of the same W4A4 run: the note shows the activation scheme, and where the
    columns still cannot tell runs apart (an algo key such as observer) the table names the runs."""
    for name, clip, ppl in (("clip1", None, 54.5), ("clip0.75", " clip0.75", 41.5)):
        _fake_results(tmp_path / name, "rtn", None, ppl)
        record = json.loads((tmp_path / name / RESULTS_FILE).read_text())
        record.update(a_dtype="int4", w_scheme="int4 g128", a_scheme="int4 token restricted" + (clip or ""))
        write_json_atomic(tmp_path / name / RESULTS_FILE, record)
    md = report.write_report(tmp_path).read_text()
    assert "| int4 g128 / act int4 token restricted clip0.75 |" in md
    assert next(line for line in md.splitlines() if line.startswith("| ")).startswith("| algo")
    _fake_results(tmp_path / "observer=mse", "gptq", None, 14.0)
    _fake_results(tmp_path / "observer=minmax", "gptq", None, 14.1)
    md = report.write_report(tmp_path).read_text()
    assert next(line for line in md.splitlines() if line.startswith("| ")).startswith("| run | algo")
    assert "| observer=mse | gptq |" in md

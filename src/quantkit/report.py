"""Turn a sweep folder into ``report.md``, ``report.csv`` and PNG plots.

Every run folder under the sweep (one with Hydra's ``.hydra/`` or any result file) becomes a
row: complete runs with their numbers, skipped runs with their reason, failed runs (whose latest
attempt crashed) with their error, the others as incomplete (running, interrupted or killed);
runs that the sweep's ``multirun.yaml`` asked for but that never started are listed as missing.
Nothing is dropped silently. Algorithms are labelled with their composition (``awq+gptq``), so
compositions get their own rows and plot lines.

Runs with downstream tasks (``eval.tasks``) add a column per task metric, ``<task>.<metric>``
(``ceval.acc``, ``arc_easy.acc_norm``; the CSV also has ``<task>.<metric>_stderr``), and
``acc_vs_bits.png``: a panel per task metric, a line per algorithm, the float16 baseline dashed.
Runs without tasks leave those cells empty.

Runs with per-layer schemes add a ``layers`` column (their rules, e.g. ``.*down_proj: w=int8``;
the note counts the linears per scheme). Sensitivity sweeps (``sensitivity.type`` /
``sensitivity.blocks``, presets ``sensitivity_types`` and ``sensitivity_blocks``) add a
``sensitivity`` column, a section with each probe's perplexity increase over its reference run
(the same config without a probe) and ``sensitivity.png``: that increase per layer type and per
block range (:mod:`quantkit.sensitivity_report`).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from quantkit.results import FAILED_FILE, RESULTS_FILE, SKIPPED_FILE, algorithm_label
from quantkit.sensitivity_report import plot_sensitivity, probe_label, reference_key, rules_text, sensitivity_section

log = logging.getLogger(__name__)

COLUMNS = ("run", "status", "algo", "w_dtype", "a_dtype", "groupsize", "perplexity", "delta_vs_float16_pct",
           "bits_per_weight", "size_mib", "quant_seconds", "note")


@dataclass
class Row:
    run: str
    status: str
    values: dict[str, Any]

    def cell(self, column: str) -> Any:
        return {"run": self.run, "status": self.status}.get(column, self.values.get(column))


def _label(algo: str | None, config: dict[str, Any] | None) -> str | None:
    """``algo`` with its composition; results written before labels named it lack the ``pre+``."""
    pre = ((config or {}).get("algo") or {}).get("pre")
    return algorithm_label(algo, pre) if algo and pre and "+" not in algo else algo


_NOT_METRICS = ("n", "num_fewshot")


def task_values(tasks: dict[str, Any] | None) -> dict[str, float]:
    """``{"ceval": {"acc": .4, "acc_stderr": .01, "n": 9}}`` -> ``{"ceval.acc": .4, "ceval.acc_stderr": .01}``."""
    return {f"{task}.{metric}": value for task, scores in (tasks or {}).items() for metric, value in scores.items()
            if metric not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def task_columns(rows: list[Row]) -> list[str]:
    """The task metric columns of ``rows`` (each metric followed by its stderr), task by task."""
    keys = {k for r in rows for k in r.values.get("task_values", {})}
    metrics = sorted(k for k in keys if not k.endswith("_stderr"))
    return [c for m in metrics for c in (m, f"{m}_stderr") if c in keys]


def _row_from_results(name: str, r: dict[str, Any]) -> Row:
    base = r.get("baseline_perplexity")
    delta = 100 * (r["perplexity"] / base - 1) if base else None
    scores = task_values(r.get("tasks"))
    config = r.get("config") or {}
    note = (r.get("w_scheme") or "") + (f" / act {r['a_scheme']}" if r.get("a_scheme") else "")
    if r.get("mixed"):
        note = ", ".join(f"{n} x {scheme}" for scheme, n in r["scheme_counts"].items())
    return Row(name, "complete", {
        "layers": rules_text(config.get("layers")), "sensitivity": probe_label(config.get("sensitivity")),
        "probe": config.get("sensitivity"), "reference_key": reference_key(config),
        **scores, "task_values": scores, "baseline_task_values": task_values(r.get("baseline_tasks")),
        "algo": _label(r["algo"], r.get("config")), "w_dtype": r["w_dtype"], "a_dtype": r["a_dtype"], "groupsize": r.get("groupsize"),
        "perplexity": r["perplexity"], "baseline": base, "delta_vs_float16_pct": delta,
        "bits_per_weight": r.get("bits_per_weight") or 16.0, "size_mib": r["model_bytes_after"] / 2**20,
        "quant_seconds": r["quantization_seconds"], "model": r.get("model"), "note": note,
    })


def _config_values(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    algo = config.get("algo", {})
    return {"algo": _label(algo.get("name"), config), "w_dtype": config.get("w_dtype", {}).get("name"),
            "a_dtype": config.get("a_dtype", {}).get("name"), "groupsize": algo.get("groupsize")}


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return list(OmegaConf.load(path))


def collect(sweep_dir: Path) -> list[Row]:
    """One row per run folder under ``sweep_dir`` plus the missing ones."""
    sweep_dir = Path(sweep_dir)
    run_dirs = sorted({p.parent for pattern in (RESULTS_FILE, SKIPPED_FILE, FAILED_FILE, ".hydra/overrides.yaml")
                       for p in sweep_dir.rglob(pattern)} - {sweep_dir})
    run_dirs = sorted({d.parent if d.name == ".hydra" else d for d in run_dirs})
    rows = []
    for d in run_dirs:
        name = str(d.relative_to(sweep_dir))
        results_path, skipped_path, failed_path = d / RESULTS_FILE, d / SKIPPED_FILE, d / FAILED_FILE
        if failed_path.is_file():  # removed when an attempt starts: the latest attempt crashed
            f = json.loads(failed_path.read_text())
            rows.append(Row(name, "failed", {**_config_values(f.get("config")), "note": f["error"]}))
            continue
        if results_path.is_file():
            r = json.loads(results_path.read_text())
            if r.get("status") == "complete":
                rows.append(_row_from_results(name, r))
                continue
        if skipped_path.is_file():
            s = json.loads(skipped_path.read_text())
            rows.append(Row(name, "skipped", {**_config_values(s.get("config")), "note": s["reason"]}))
            continue
        overrides = _hydra_overrides(d)
        rows.append(Row(name, "incomplete", {"note": "running, interrupted or killed: " + " ".join(overrides)}))
    rows.extend(Row(name, "missing", {"note": "never started"}) for name in _missing(sweep_dir, rows))
    return rows


def _missing(sweep_dir: Path, rows: list[Row]) -> list[str]:
    """Job folders that the sweep's multirun.yaml asked for and that do not exist."""
    seen = {r.run for r in rows}
    return [name for name in job_names(sweep_dir) if name not in seen]


def job_names(sweep_dir: Path) -> list[str]:
    """The job folders that the sweep's latest launch (its ``multirun.yaml``) asked for."""
    spec = Path(sweep_dir) / "multirun.yaml"
    if not spec.is_file():
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(spec)
    task = list(cfg.hydra.overrides.task)
    params = cfg.hydra.sweeper.get("params") or {}  # sweeps defined in config (conf/experiment/)
    task = [f"{key}={value}" for key, value in params.items()] + task
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    parsed = OverridesParser.create().parse_overrides(task)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return [",".join(sorted(o for o in job if o.split("=", 1)[0].lstrip("+~") not in excluded)) for job in jobs]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _fmt_cell(row: Row, column: str) -> str:
    """A cell of the markdown table: task metrics as ``value ± stderr``."""
    text = _fmt(row.cell(column))
    err = row.values.get("task_values", {}).get(f"{column}_stderr")
    return f"{text} ± {_fmt(err)}" if text and isinstance(err, float) else text


def _task_baselines(rows: list[Row]) -> dict[str, list[float]]:
    """Task metric -> the distinct float16 baseline values among ``rows`` (one per model/data)."""
    found: dict[str, set[float]] = {}
    for r in rows:
        for metric, value in r.values.get("baseline_task_values", {}).items():
            if not metric.endswith("_stderr"):
                found.setdefault(metric, set()).add(value)
    return {m: sorted(v) for m, v in sorted(found.items())}


_KEY_COLUMNS = ("algo", "w_dtype", "a_dtype", "groupsize", "layers", "sensitivity", "note")


def _distinct(rows: list[Row], columns: list[str]) -> bool:
    """Whether ``columns`` tell every row apart."""
    keys = [tuple(_fmt_cell(r, c) for c in columns) for r in rows]
    return len(set(keys)) == len(keys)


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, report.csv and plots for ``sweep_dir``; return the markdown path."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir)
    complete = sorted((r for r in rows if r.status == "complete"),
                      key=lambda r: (r.values["algo"], -r.values["bits_per_weight"], r.values["perplexity"]))
    others = [r for r in rows if r.status != "complete"]
    tasks = task_columns(complete)
    mixed = [c for c in ("layers", "sensitivity") if any(r.values.get(c) for r in complete)]
    at = COLUMNS.index("groupsize") + 1
    columns = [*COLUMNS[:at], *mixed, *COLUMNS[at:-1], *tasks, COLUMNS[-1]]  # the note stays last
    with open(out_dir / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in complete + others:
            writer.writerow([r.cell(c) for c in columns])
    plots = plot(complete, out_dir)
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"{len(complete)} complete, {len(others)} not complete ({len(rows)} runs).", ""]
    baselines = {r.values["baseline"] for r in complete if r.values.get("baseline")}
    if baselines:
        lines += [f"float16 baseline perplexity: {', '.join(f'{b:.3f}' for b in sorted(baselines))}", ""]
    task_baselines = _task_baselines(complete)
    if task_baselines:
        lines += ["float16 baseline tasks: " + ", ".join(f"{m} {', '.join(f'{v:.3f}' for v in vs)}"
                                                        for m, vs in task_baselines.items()), ""]
    shown = [c for c in columns if c not in ("run", "status") and not c.endswith("_stderr")]
    if not _distinct(complete, [c for c in shown if c in _KEY_COLUMNS]):
        shown = ["run", *shown]  # runs that differ only in keys without a column: name them
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt_cell(r, c) for c in shown) + " |" for r in complete]
    lines += sensitivity_section(complete)
    if others:
        lines += ["", "## Runs without results", "", "| run | status | note |", "|---|---|---|"]
        lines += [f"| {r.run} | {r.status} | {r.cell('note') or ''} |" for r in others]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    log.info("report: %s (%d complete, %d not complete)", md, len(complete), len(others))
    return md


def bits_lines(rows: list[Row]) -> dict[str, list[Row]]:
    """The lines of the perplexity-vs-bits plot: one per algorithm (with its composition) and
    activation dtype."""
    lines: dict[str, list[Row]] = {}
    for r in rows:
        lines.setdefault(f"{r.values['algo']} a={r.values['a_dtype']}", []).append(r)
    return lines


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """Perplexity vs bits per weight (a line per algorithm) and vs group size; PNG paths."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rs in sorted(bits_lines(rows).items()):
        rs = sorted(rs, key=lambda r: r.values["bits_per_weight"])
        ax.plot([r.values["bits_per_weight"] for r in rs], [r.values["perplexity"] for r in rs], "o-", label=label)
    baselines = {r.values["baseline"] for r in rows if r.values.get("baseline")}
    for b in baselines:
        ax.axhline(b, color="gray", linestyle="--", linewidth=1, label="float16")
    ax.set(xlabel="bits per weight", ylabel="perplexity", yscale="log", title="Perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "ppl_vs_bits.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    grouped = [r for r in rows if r.values.get("groupsize") not in (None,)]
    if grouped:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[str, list[Row]] = {}
        for r in grouped:
            series.setdefault(f"{r.values['algo']} {r.values['w_dtype']}", []).append(r)
        for label, rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: _groupsize_x(r.values["groupsize"]))
            ax.plot([_groupsize_x(r.values["groupsize"]) for r in rs], [r.values["perplexity"] for r in rs], "o-", label=label)
        ax.set(xlabel="group size (rightmost: per channel)", ylabel="perplexity", xscale="log", yscale="log",
               title="Perplexity vs group size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "ppl_vs_groupsize.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    metrics = [c for c in task_columns(rows) if not c.endswith("_stderr")]
    if metrics:
        paths.append(plot_tasks(rows, metrics, out_dir / "acc_vs_bits.png"))
    sensitivity = plot_sensitivity(rows, out_dir / "sensitivity.png")
    if sensitivity is not None:
        paths.append(sensitivity)
    return paths


def plot_tasks(rows: list[Row], metrics: list[str], path: Path) -> Path:
    """A panel per task metric against bits per weight: a line per algorithm and activation dtype
    (as in the perplexity plot) with stderr bars, the float16 baseline dashed."""
    import math

    import matplotlib.pyplot as plt

    cols = min(len(metrics), 3)
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(5 * cols, 3.8 * math.ceil(len(metrics) / cols)),
                             squeeze=False)
    baselines = _task_baselines(rows)
    for ax, metric in zip(axes.flat, metrics):
        for label, rs in sorted(bits_lines(rows).items()):
            rs = sorted((r for r in rs if metric in r.values.get("task_values", {})),
                        key=lambda r: r.values["bits_per_weight"])
            if not rs:
                continue
            errs = [r.values["task_values"].get(f"{metric}_stderr") for r in rs]
            ax.errorbar([r.values["bits_per_weight"] for r in rs], [r.values["task_values"][metric] for r in rs],
                        yerr=None if None in errs else errs, fmt="o-", capsize=3, label=label)
        for i, b in enumerate(baselines.get(metric, [])):
            ax.axhline(b, color="gray", linestyle="--", linewidth=1, label="float16" if i == 0 else None)
        ax.set(xlabel="bits per weight", ylabel=metric.split(".", 1)[1], title=metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Task scores vs bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _groupsize_x(groupsize: int) -> float:
    """Per channel (-1) is drawn to the right of every group size."""
    return 4096.0 if groupsize == -1 else float(groupsize)


class ReportCallback(Callback):
    """Hydra callback: write the report when a multirun ends (``hydra.callbacks.report``).

    Jobs record their crashes instead of raising (``scripts/run.py``), so the sweep reaches its
    end; the callback then writes the report and exits non-zero if a job of this launch failed.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        md = None
        try:
            md = write_report(sweep_dir)
        except Exception as exc:  # a report failure must not turn a finished sweep into a failure
            log.warning("could not write the sweep report: %s", exc)
        launched = set(job_names(sweep_dir))
        failed = [r.run for r in collect(sweep_dir) if r.status == "failed" and (not launched or r.run in launched)]
        if failed:
            where = f"; see {md}" if md else ""
            raise SystemExit(f"{len(failed)} sweep job(s) failed: {', '.join(failed)}{where}")

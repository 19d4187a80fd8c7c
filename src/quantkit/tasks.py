"""Downstream tasks of a run (``eval.tasks``): lm-eval tasks and the C-Eval / CMMLU / BOSS protocol.

:func:`prepare_tasks` runs before any weight loads: it resolves every task name (a folder of
``eval.task_paths``, lm-eval's own tasks, or ``ceval``/``cmmlu``/``boss``), loads lm-eval's task
data and the benchmark questions, and turns every failure (an unknown name, a missing folder, a
hub dataset while offline) into one ``ConfigError`` line naming the key. :func:`evaluate_tasks`
then scores the in-memory model: lm-eval through its ``HFLM`` wrapper around the model object and
tokenizer (nothing is saved or reloaded), the benchmarks through :mod:`quantkit.multiple_choice`.

Each task's entry in ``results.json`` holds its metrics with their standard errors
(``acc``, ``acc_stderr``, ...), ``n`` (documents scored) and ``num_fewshot``; lm-eval groups add
``subtasks``, the benchmarks ``subjects`` and ``source``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from quantkit.benchmarks import BENCHMARKS, BenchmarkData, load_benchmark
from quantkit.cache import cached_json
from quantkit.config import ConfigError, EvalConfig, check
from quantkit.multiple_choice import evaluate_benchmark

log = logging.getLogger(__name__)


@dataclass
class TaskPlan:
    """The tasks of a run, resolved and with their data loaded."""

    lm_eval: list[str] = field(default_factory=list)  # lm-eval task or group names, in the asked order
    task_manager: Any = None  # lm_eval.tasks.TaskManager over eval.task_paths (+ lm-eval's own tasks if used)
    benchmarks: dict[str, BenchmarkData] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """What the task scores depend on besides the config: versions and the files read."""
        files = [f for d in self.benchmarks.values() for f in d.files]
        for folder in (self.task_manager.include_path or []) if self.task_manager is not None else []:
            files += sorted(p for p in Path(folder).rglob("*") if p.is_file())
        return {"lm_eval": lm_eval_version() if self.lm_eval else None,
                "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def lm_eval_version() -> str:
    return importlib.metadata.version("lm-eval")


def prepare_tasks(cfg: EvalConfig) -> TaskPlan | None:
    """Resolve ``cfg.tasks`` and load their data (no model needed); None when there are none."""
    if not cfg.tasks:
        return None
    for folder in cfg.task_paths:
        path = Path(folder).expanduser()
        check(path.is_dir(), f"eval.task_paths entry {folder!r} {'is not a folder' if path.exists() else 'does not exist'}"
                             " (a folder of lm-eval task YAMLs)")
    plan = TaskPlan()
    shots = cfg.num_fewshot or 0
    for name in cfg.tasks:
        if name in BENCHMARKS:
            bench = getattr(cfg, name)
            plan.benchmarks[name] = load_benchmark(name, bench.path, bench.subjects, need_shots=shots > 0)
            _check_shot_pool(plan.benchmarks[name], shots)
        else:
            plan.lm_eval.append(name)
    if plan.lm_eval:
        plan.task_manager = _task_manager(plan.lm_eval, [str(Path(p).expanduser()) for p in cfg.task_paths])
        for name in plan.lm_eval:  # one by one, so that a failure names its task
            try:
                plan.task_manager.load([name])
            except Exception as err:  # datasets/hub errors come in many types; all mean "cannot load"
                raise ConfigError(_load_error(name, err)) from None
    return plan


def _check_shot_pool(data: BenchmarkData, shots: int) -> None:
    for subject, pool in data.shots.items():
        check(len(pool) >= shots, f"eval.num_fewshot={shots} but {data.name} has only {len(pool)} worked examples "
                                  f"for {subject!r} in {data.source}")


def _task_manager(names: list[str], paths: list[str]) -> Any:
    """A TaskManager over ``paths``, and over lm-eval's own tasks only when a name needs them
    (indexing those takes ~15 s); an unknown name is a ConfigError with close matches."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    missing = [n for n in names if local is None or n not in local.all_tasks]
    if not missing:
        return local
    builtin = set(cached_json("lm_eval_tasks", {"lm_eval": lm_eval_version()},
                              lambda: {"names": sorted(TaskManager().all_tasks)})["names"])
    for name in missing:
        if name not in builtin:
            close = difflib.get_close_matches(name, [*builtin, *BENCHMARKS, *(local.all_tasks if local else [])], 3)
            raise ConfigError(
                f"eval.tasks entry {name!r} is not a task: not one of {', '.join(BENCHMARKS)}, not among the "
                f"{len(builtin)} tasks and groups of lm-eval {lm_eval_version()}"
                + (f", not in eval.task_paths={paths}" if paths else " (eval.task_paths is empty)")
                + (f"; did you mean {', '.join(close)}?" if close else ""))
    return TaskManager(include_path=paths or None)


def _load_error(name: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    from quantkit.benchmarks import hub_offline

    offline = ("; HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set, so hub datasets load only from the local cache"
               if hub_offline() else "")
    return (f"eval.tasks entry {name!r}: lm-eval could not load its data ({type(err).__name__}: {text}){offline}; "
            "to run it from local files, write a task YAML (dataset_path: json, dataset_kwargs: {data_files: ...}, "
            "or custom_dataset) into a folder listed in eval.task_paths")


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators; restore them afterwards."""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state)
    np.random.set_state(np_state)


def _metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``metric,filter`` keys as ``metric`` (filter ``none``) or ``metric_filter``, each
    standard error as ``<name>_stderr``; non-numbers (names, ``N/A`` errors) are dropped."""
    out = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = metric.endswith("_stderr")
        base = metric[: -len("_stderr")] if stderr else metric
        out[(base if filt in ("", "none") else f"{base}_{filt}") + ("_stderr" if stderr else "")] = value
    return out


def run_lm_eval(model: nn.Module, tokenizer: PreTrainedTokenizerBase, plan: TaskPlan, cfg: EvalConfig) -> dict[str, Any]:
    """lm-eval's scores of the in-memory ``model`` (wrapped, not saved) on ``plan.lm_eval``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.task_batch_size)
    with _rng_preserved():
        out = simple_evaluate(model=lm, tasks=list(plan.lm_eval), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                              task_manager=plan.task_manager, log_samples=False)
    results, subtasks = out["results"], out.get("group_subtasks", {})
    scores = {}
    for name in plan.lm_eval:
        entry = {**_metrics(results.get(name, {})), "n": _count(out, name, subtasks),
                 "num_fewshot": out.get("n-shot", {}).get(name)}
        if subtasks.get(name):
            entry["subtasks"] = {s: _metrics(results.get(s, {})) for s in subtasks[name]}
        scores[name] = entry
    return scores


def _count(out: dict[str, Any], name: str, subtasks: dict[str, list[str]]) -> int | None:
    samples = out.get("n-samples", {})
    names = subtasks.get(name) or [name]
    counts = [samples.get(n, {}).get("effective") for n in names]
    return sum(c for c in counts if c is not None) if any(c is not None for c in counts) else None


def evaluate_tasks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, plan: TaskPlan, cfg: EvalConfig,
                   device: torch.device, max_length: int | None = None) -> dict[str, Any]:
    """Scores of ``model`` on every task of ``plan``, in the order of ``cfg.tasks``."""
    scores: dict[str, Any] = {}
    if plan.lm_eval:
        scores.update(run_lm_eval(model, tokenizer, plan, cfg))
    for name, data in plan.benchmarks.items():
        scores[name] = evaluate_benchmark(model, tokenizer, data, cfg.num_fewshot or 0, cfg.limit, device,
                                          cfg.task_batch_size, max_length)
    return {name: scores[name] for name in cfg.tasks}

"""C-Eval, CMMLU and BOSS questions: from the Hugging Face hub or from local copies.

Where the data lives (checked against each benchmark's own documentation):

- **C-Eval**: hub dataset ``ceval/ceval-exam``, one config per subject, splits ``dev`` (5
  exemplars with answers), ``val`` and ``test`` (test answers are not released, so accuracy is
  measured on ``val``, as the seed framework does). The hub repo holds Parquet files
  ``<subject>/{dev,val,test}-*.parquet``; the authors' ``ceval-exam.zip`` holds
  ``{dev,val,test}/<subject>_<split>.csv``. Columns ``question, A, B, C, D, answer``.
- **CMMLU**: hub dataset ``haonan-li/cmmlu``, one config per subject, splits ``dev`` (5
  exemplars) and ``test``. The hub repo holds a loading script (which ``datasets`` >= 4 no
  longer runs) and the authors' archive ``cmmlu_v1_0_1.zip`` with ``{dev,test}/<subject>.csv``
  (columns ``Question, A, B, C, D, Answer``); quantkit downloads that archive.
- **BOSS**: no Hugging Face dataset; the authors distribute an archive (linked from
  https://github.com/lifan-yuan/OOD_NLP) whose ``process/<Task>/<dataset>/{train,test}.tsv``
  files hold a header row and ``Text, Label`` (sentiment, toxicity) or
  ``Premise, Hypothesis, Label`` (NLI) with integer labels. A local copy is required.

A local copy (``eval.<benchmark>.path``) is a directory in any of these layouts, at its top or
one folder down (e.g. the unzipped archive's own folder): ``<split>/<subject>_<split>.csv``,
``<split>/<subject>.csv``, ``<subject>/<split>-*.parquet``, ``<subject>/<split>/*.parquet``
(C-Eval/CMMLU), ``[process/]<Task>/<dataset>/<split>.tsv`` (BOSS). Every failure is a
:class:`~quantkit.data.DataError` naming the config key to change.
"""

from __future__ import annotations

import csv
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.config import TASK_BENCHMARKS as BENCHMARKS
from quantkit.config import ConfigError
from quantkit.models import cache_dir
from quantkit.subjects import BOSS_DATASETS, BOSS_ID_DATASET, BOSS_LABELS
from quantkit.subjects import select as _select

LETTERS = ("A", "B", "C", "D")

_BOSS_MAX_WORDS = 1024  # the BOSS evaluation truncates every input field to its first 1024 words


class BenchmarkError(ConfigError):
    """Benchmark data that cannot be read as asked; the message names the config key."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice item: its input fields, the option texts, the index of the answer."""

    fields: tuple[str, ...]  # (question,) for C-Eval/CMMLU; (text,) or (premise, hypothesis) for BOSS
    choices: tuple[str, ...]  # option texts A-D, or the BOSS label words
    answer: int


@dataclass(frozen=True)
class Spec:
    """Where one benchmark's splits are and what its hub copy is."""

    hub_id: str | None
    eval_split: str
    shot_split: str
    hub_file: str | None = None  # a single archive to download instead of the Parquet files


SPECS: dict[str, Spec] = {
    "ceval": Spec("ceval/ceval-exam", eval_split="val", shot_split="dev"),
    "cmmlu": Spec("haonan-li/cmmlu", eval_split="test", shot_split="dev", hub_file="cmmlu_v1_0_1.zip"),
    "boss": Spec(None, eval_split="test", shot_split="train"),
}


@dataclass
class BenchmarkData:
    """The questions of one benchmark, read before any weights load."""

    name: str
    source: str  # the hub id or the local dir it was read from
    questions: dict[str, list[Question]]  # subject (BOSS: dataset) -> evaluation questions
    shots: dict[str, list[Question]] = field(default_factory=dict)  # subject (BOSS: task) -> few-shot pool
    files: list[Path] = field(default_factory=list)  # the files read, for cache keys


def hub_offline() -> bool:
    """True when HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set."""
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_benchmark(name: str, path: str | None, subjects: tuple[str, ...], need_shots: bool,
                   key: str = "eval") -> BenchmarkData:
    """Read ``name``'s evaluation split (and few-shot pool when ``need_shots``) for ``subjects``.

    ``path`` is a local copy (``<key>.<name>.path``), None for the hub; ``subjects`` are subject
    or category names (empty: all).
    """
    chosen = select(name, subjects, f"{key}.{name}.subjects")
    spec = SPECS[name]
    root = _root(name, path, spec, f"{key}.{name}.path")
    data = BenchmarkData(name, str(path) if path else f"{spec.hub_id} (Hugging Face hub)", {})
    path_key = f"{key}.{name}.path"
    if name == "boss":
        for dataset in chosen:
            data.questions[dataset] = _boss(root, dataset, spec.eval_split, path_key, data.files)
        if need_shots:
            for task in dict.fromkeys(BOSS_DATASETS[d] for d in chosen):
                data.shots[task] = _boss(root, BOSS_ID_DATASET[task], spec.shot_split, path_key, data.files)
        return data
    for subject in chosen:
        data.questions[subject] = _exam(root, subject, spec.eval_split, path_key, data.files)
        if need_shots:
            data.shots[subject] = _exam(root, subject, spec.shot_split, path_key, data.files)
    return data


def calibration_documents(name: str, path: str | None, subjects: tuple[str, ...], key: str) -> list[str]:
    """The worked examples of ``name`` as calibration documents: C-Eval/CMMLU dev questions with
    their answers, BOSS in-distribution train examples with their labels (``key``: the config
    key of ``path``)."""
    spec, files = SPECS[name], []
    chosen = select(name, subjects, key.rsplit(".", 1)[0] + ".subjects")
    root = _root(name, path, spec, key)
    if name == "boss":
        tasks = dict.fromkeys(BOSS_DATASETS[d] for d in chosen)
        return [boss_example(task, q) for task in tasks
                for q in _boss(root, BOSS_ID_DATASET[task], spec.shot_split, key, files)]
    return [exam_question(q, with_answer=True) for s in chosen for q in _exam(root, s, spec.shot_split, key, files)]


def select(name: str, subjects: tuple[str, ...], key: str) -> list[str]:
    try:
        return _select(name, subjects, key)
    except ValueError as err:
        raise BenchmarkError(str(err)) from None


# ---- prompts (the seed framework's) ------------------------------------------------------------

EXAM_TITLE = "以下是中国考试的单项选择题，请选出其中的正确答案。"
"""The instruction line of the C-Eval/CMMLU prompts ("The following are single-choice questions
from Chinese exams; choose the correct answer.")."""


def exam_question(q: Question, with_answer: bool) -> str:
    """``question / A. .. / B. .. / C. .. / D. .. / 答案：`` and, for an example, its answer letter."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices))
    return f"{q.fields[0]}\n{options}\n答案：" + (LETTERS[q.answer] if with_answer else "")


def exam_prompt(q: Question, shots: list[Question]) -> str:
    """The title, the worked examples (with answers), then the question ending in ``答案：``;
    the model's next token is read as the answer letter."""
    return "\n\n".join([EXAM_TITLE, *(exam_question(s, True) for s in shots), exam_question(q, False)])


_BOSS_INSTRUCTIONS = {
    "SentimentAnalysis": "Solve the sentiment analysis task. Options for sentiment: negative, positive, neutral.",
    "ToxicDetection": "Solve the toxic detection task. Options for toxicity: benign, toxic.",
    "NaturalLanguageInference": "Solve the NLI task. Options for entailment relationship: entailment, neutral, "
                                "contradiction.",
}


def _boss_input(task: str, fields: tuple[str, ...]) -> str:
    if task == "NaturalLanguageInference":
        return f"Premise: {fields[0]} // Hypothesis: {fields[1]} // Prediction:"
    return f"Text: {fields[0]} // Prediction:"


def boss_example(task: str, q: Question) -> str:
    """One worked BOSS example: the input line followed by its label word."""
    return f"{_boss_input(task, q.fields)} {q.choices[q.answer]}"


def boss_prompt(task: str, q: Question, shots: list[Question]) -> str:
    """The BOSS prompt (zero-shot, or in-context with ``shots``): instruction, format, examples,
    input line ending in ``Prediction:``; each label word, after a space, is a candidate answer."""
    fmt = ("Premise: {Premise} // Hypothesis: {Hypothesis} // Prediction: {Prediction}"
           if task == "NaturalLanguageInference" else "Text: {Text} // Prediction: {Prediction}")
    lines = ["### Instruction ###", _BOSS_INSTRUCTIONS[task], "### Format ###", fmt]
    if shots:
        lines += ["### Example ###", *(boss_example(task, s) for s in shots)]
    return "\n".join([*lines, "### Input ###", _boss_input(task, q.fields)])


# ---- where the files are ------------------------------------------------------------------------

def _root(name: str, path: str | None, spec: Spec, key: str) -> Path:
    if path is not None:
        root = Path(path).expanduser()
        if not root.is_dir():
            what = "is a file (unzip it and point at the folder)" if root.is_file() else "does not exist"
            raise BenchmarkError(f"{key}={str(path)!r} {what}")
        return root
    if spec.hub_id is None:
        raise BenchmarkError(
            f"{key} is not set, and {name} has no Hugging Face dataset: download the archive of its authors "
            "(linked from github.com/lifan-yuan/OOD_NLP), unzip it and set "
            f"{key}=DIR (the folder holding SentimentAnalysis/, ToxicDetection/, NaturalLanguageInference/)")
    return _hub_snapshot(name, spec, key)


def _hub_snapshot(name: str, spec: Spec, key: str) -> Path:
    """Download (or find in the Hugging Face cache) the files of ``spec.hub_id``; its local dir."""
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = hub_offline()
    try:
        if spec.hub_file:
            archive = Path(hf_hub_download(spec.hub_id, spec.hub_file, repo_type="dataset", local_files_only=offline))
            target = cache_dir() / "benchmarks" / archive.stem
            if not target.is_dir():
                _extract(archive, target)
            return target
        patterns = [f"*/{spec.eval_split}-*.parquet", f"*/{spec.shot_split}-*.parquet"]
        return Path(snapshot_download(spec.hub_id, repo_type="dataset", allow_patterns=patterns,
                                      local_files_only=offline))
    except Exception as err:  # offline, not cached, unreachable: all "cannot load"
        why = ("HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
               if offline else f"it could not be downloaded ({_first_line(err)})")
        raise BenchmarkError(
            f"{name} reads its dataset {spec.hub_id} from the Hugging Face hub, but {why}; set "
            f"{key}=DIR to a local copy ({_LAYOUT[name]}), or unset HF_DATASETS_OFFLINE on a machine that "
            "reaches the hub") from None


_LAYOUT = {
    "ceval": "dev/ and val/ CSVs <subject>_<split>.csv as in ceval-exam.zip, or <subject>/<split>-*.parquet",
    "cmmlu": "dev/ and test/ CSVs <subject>.csv as in cmmlu_v1_0_1.zip",
    "boss": "<Task>/<dataset>/{train,test}.tsv as in the authors' archive",
}


def _extract(archive: Path, target: Path) -> None:
    """Unzip ``archive`` into ``target`` atomically (a rename of a finished temp dir)."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find(root: Path, patterns: list[str]) -> list[Path]:
    """Files matching the first pattern that matches anything, at ``root`` or one folder down."""
    for pattern in patterns:
        for prefix in ("", "*/"):
            found = sorted(p for p in root.glob(prefix + pattern) if p.is_file())
            if found:
                return found
    return []


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# ---- C-Eval / CMMLU -----------------------------------------------------------------------------

def _exam(root: Path, subject: str, split: str, key: str, files: list[Path]) -> list[Question]:
    found = _find(root, [f"{split}/{subject}_{split}.csv", f"{split}/{subject}.csv",
                         f"{subject}/{split}-*.parquet", f"{subject}/{split}/*.parquet"])
    if not found:
        raise BenchmarkError(
            f"{key}={str(root)!r} holds no {split!r} file of subject {subject!r} (looked for "
            f"{split}/{subject}_{split}.csv, {split}/{subject}.csv, {subject}/{split}-*.parquet, "
            f"{subject}/{split}/*.parquet)")
    questions = []
    for file in found:
        files.append(file)
        for i, row in enumerate(_rows(file, key)):
            questions.append(_exam_question(row, f"{key}={str(root)!r}: {file.name} row {i + 1}"))
    if not questions:
        raise BenchmarkError(f"{key}={str(root)!r}: {', '.join(f.name for f in found)} holds no questions")
    return questions


def _rows(file: Path, key: str) -> list[dict[str, Any]]:
    try:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(file).to_pylist()
        with open(file, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
        raise BenchmarkError(f"{key}: {file} could not be read ({_first_line(err)})") from None


def _exam_question(row: dict[str, Any], where: str) -> Question:
    cols = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    missing = [c for c in ("question", "a", "b", "c", "d", "answer") if c not in cols]
    if missing:
        raise BenchmarkError(f"{where} has no column(s) {', '.join(missing)} (expected question, A, B, C, D, answer)")
    answer = str(cols["answer"] or "").strip().upper()
    if answer not in LETTERS:
        raise BenchmarkError(f"{where}: answer {cols['answer']!r} is not one of A, B, C, D (C-Eval's test split has "
                             "no answers: use its val split)")
    return Question((str(cols["question"]),), tuple(str(cols[c] if cols[c] is not None else "") for c in "abcd"),
                    LETTERS.index(answer))


# ---- BOSS ---------------------------------------------------------------------------------------

def _boss(root: Path, dataset: str, split: str, key: str, files: list[Path]) -> list[Question]:
    task = BOSS_DATASETS[dataset]
    found = _find(root, [f"{task}/{dataset}/{split}.tsv", f"process/{task}/{dataset}/{split}.tsv"])
    if not found:
        raise BenchmarkError(f"{key}={str(root)!r} holds no {task}/{dataset}/{split}.tsv (BOSS archive layout)")
    file, labels = found[0], BOSS_LABELS[task]
    files.append(file)
    n_fields = 2 if task == "NaturalLanguageInference" else 1
    questions = []
    try:
        with open(file, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BenchmarkError(f"{key}: {file} could not be read ({_first_line(err)})") from None
    for row in rows[1:]:  # the first row is the header
        label = _boss_label(row[n_fields] if len(row) > n_fields else "", labels)
        fields = tuple(" ".join(str(v).split(" ")[:_BOSS_MAX_WORDS]) for v in row[:n_fields])
        # the authors' reader skips rows with an empty text or a label that is not a label
        if label is None or len(fields) < n_fields or not all(fields):
            continue
        questions.append(Question(fields, labels, label))
    if not questions:
        raise BenchmarkError(f"{key}: {file} holds no labelled {task} example (a header row, then "
                             f"{'Premise, Hypothesis' if n_fields == 2 else 'Text'}, Label with Label in "
                             f"0..{len(labels) - 1} or {', '.join(labels)})")
    return questions


def _boss_label(value: str, labels: tuple[str, ...]) -> int | None:
    value = value.strip().lower()
    if value.isdigit() and int(value) < len(labels):
        return int(value)
    return labels.index(value) if value in labels else None

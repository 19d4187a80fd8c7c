"""C-Eval / CMMLU / BOSS loaders on local copies shaped like the real ones; offline hub errors;
subject selection; the benchmarks as calibration corpora."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from quantkit import data as qdata
from quantkit.benchmarks import BenchmarkError, Question, exam_question, load_benchmark
from quantkit.config import ConfigError
from quantkit.subjects import BOSS_DATASETS, CEVAL_SUBJECTS, CMMLU_SUBJECTS, select

FIXTURES = Path(__file__).parent / "fixtures"


def test_tables_have_the_published_sizes():
    assert len(CEVAL_SUBJECTS) == 52 and len(CMMLU_SUBJECTS) == 67 and len(BOSS_DATASETS) == 12
    assert select("ceval", ["Humanities"], "k")[:3] == ["modern_chinese_history", "ideological_and_moral_cultivation",
                                                        "logic"]
    assert select("boss", ["NaturalLanguageInference", "sst5"], "k") == ["sst5", "mnli", "anli", "contract_nli",
                                                                        "wanli"]
    with pytest.raises(ValueError, match="eval.cmmlu.subjects entry 'physics' is neither"):
        select("cmmlu", ["physics"], "eval.cmmlu.subjects")


def test_ceval_zip_layout():
    data = load_benchmark("ceval", str(FIXTURES / "ceval"), ("logic", "law"), need_shots=True)
    assert list(data.questions) == ["logic", "law"]  # table order
    assert [q.answer for q in data.questions["law"]] == [1, 0] and len(data.shots["logic"]) == 2
    q = data.questions["law"][0]
    assert q.fields == ("我国的最高权力机关是？",) and q.choices[1] == "全国人民代表大会"
    assert data.source == str(FIXTURES / "ceval") and len(data.files) == 4


def test_cmmlu_zip_layout_with_bom_and_index_column():
    data = load_benchmark("cmmlu", str(FIXTURES / "cmmlu"), ("arts",), need_shots=False)
    assert [(q.fields[0][:4], q.answer) for q in data.questions["arts"]] == [("《蒙娜丽", 0), ("二胡有几", 1)]
    assert data.shots == {}


def test_hub_parquet_layout_one_folder_down(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "snapshot" / "ceval-exam"  # the copy's own folder inside the given dir
    (root / "logic").mkdir(parents=True)
    rows = {"id": [0], "question": ["q?"], "A": ["a"], "B": ["b"], "C": ["c"], "D": ["d"], "answer": ["D"],
            "explanation": [""]}
    pq.write_table(pa.table(rows), root / "logic" / "val-00000-of-00001.parquet")
    data = load_benchmark("ceval", str(tmp_path / "snapshot"), ("logic",), need_shots=False)
    assert data.questions["logic"] == [Question(("q?",), ("a", "b", "c", "d"), 3)]


def test_boss_layout_skips_unlabelled_rows_and_takes_shots_from_the_id_train_split():
    small = load_benchmark("boss", str(FIXTURES / "boss"), ("amazon", "sst5", "mnli"), need_shots=True)
    assert [q.answer for q in small.questions["sst5"]] == [0, 1, 2]
    assert small.questions["mnli"][1] == Question(("The shop is closed.", "The shop is open."),
                                                  ("entailment", "neutral", "contradiction"), 2)
    assert set(small.shots) == {"SentimentAnalysis", "NaturalLanguageInference"}
    assert len(small.shots["SentimentAnalysis"]) == 5  # amazon's train split


@pytest.mark.parametrize(
    ("name", "path", "subjects", "says"),
    [
        ("ceval", "fixtures/ceval", ("logic", "accountant"), "holds no 'val' file of subject 'accountant'"),
        ("ceval", "nowhere", (), "eval.ceval.path='"),
        ("boss", "fixtures/boss", ("SentimentAnalysis",), "holds no SentimentAnalysis/dynasent/test.tsv"),
        ("boss", None, (), "eval.boss.path is not set, and boss has no Hugging Face dataset"),
        ("cmmlu", "fixtures/cmmlu", ("nutrition",), "holds no 'test' file of subject 'nutrition'"),
    ],
)
def test_missing_data_names_the_key(name, path, subjects, says):
    with pytest.raises(BenchmarkError, match=says.replace("(", r"\(")) as info:
        load_benchmark(name, str(Path(__file__).parent / path) if path else None, subjects, need_shots=False)
    assert "\n" not in str(info.value) and isinstance(info.value, ConfigError)


def test_answer_outside_abcd_is_an_error(tmp_path):
    shutil.copytree(FIXTURES / "ceval", tmp_path / "ceval")
    with open(tmp_path / "ceval" / "val" / "logic_val.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([9, "q", "a", "b", "c", "d", "", ""])  # C-Eval test rows look like this
    with pytest.raises(BenchmarkError, match="logic_val.csv row 4: answer '' is not one of A, B, C, D"):
        load_benchmark("ceval", str(tmp_path / "ceval"), ("logic",), need_shots=False)


@pytest.mark.parametrize(("name", "hub_id"), [("ceval", "ceval/ceval-exam"), ("cmmlu", "haonan-li/cmmlu")])
def test_hub_dataset_offline_names_the_dataset_the_variable_and_the_local_alternative(name, hub_id, monkeypatch,
                                                                                      tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # nothing cached
    with pytest.raises(BenchmarkError) as info:
        load_benchmark(name, None, (), need_shots=False)
    message = str(info.value)
    for part in (hub_id, "HF_DATASETS_OFFLINE", f"eval.{name}.path=DIR", "local copy"):
        assert part in message, message


def test_benchmarks_are_calibration_corpora():
    text = qdata.load_text("ceval", "train", str(FIXTURES / "ceval"), subjects=("law",))
    dev = load_benchmark("ceval", str(FIXTURES / "ceval"), ("law",), need_shots=True).shots["law"]
    assert text == "\n\n".join(exam_question(q, with_answer=True) for q in dev)
    assert text.endswith("答案：C")
    boss = qdata.load_text("boss", "train", str(FIXTURES / "boss"), subjects=("sst5",))
    assert boss.splitlines()[0] == "Text: Broke after a week. // Prediction: negative"  # amazon train, labelled
    with pytest.raises(qdata.DataError, match="not a perplexity corpus"):
        qdata.load_text("cmmlu", "test", str(FIXTURES / "cmmlu"))

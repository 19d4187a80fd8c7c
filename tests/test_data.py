"""Corpora: pydoc split, hub loaders on local files of the hub schema, calibration windows."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from quantkit.config import ConfigError
from quantkit.data import CORPORA, CorpusKeys, DataError, calibration_samples, eval_tokens, load_text
from quantkit.models import build_tiny_llama


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """Byte-level tokenizer of the tiny models: one token per UTF-8 byte, no specials added."""
    return AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path_factory.mktemp("tiny")))


def _rows(prefix: str, n: int) -> list[str]:
    return [f"{prefix} row {i}: some text" for i in range(n)]


def _write(path: Path, columns: dict[str, list[str]]) -> Path:
    """Write `columns` in the format named by `path`'s suffixes (parquet, json lines, gzip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(columns)
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    elif path.suffix == ".gz":
        ds.to_json(str(path), compression="gzip")
    else:
        ds.to_json(str(path))
    return path


def test_pydoc_split_is_deterministic_and_disjoint() -> None:
    from pydoc_data.topics import topics

    train, test = load_text("pydoc", "train"), load_text("pydoc", "test")
    assert load_text("pydoc", "train") == train
    keys = sorted(topics)
    n_train = int(0.8 * len(keys))
    assert train.startswith(topics[keys[0]]) and train.endswith(topics[keys[n_train - 1]])
    assert test.startswith(topics[keys[n_train]]) and test.endswith(topics[keys[-1]])
    assert train + "\n\n" + test == "\n\n".join(topics[key] for key in keys)


def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError, match="local") as info:
        load_text("wikitext-103", "test")
    assert all(name in str(info.value) for name in CORPORA)
    with pytest.raises(DataError, match="split='validation'.*train or test"):
        load_text("pydoc", "validation")
    with pytest.raises(DataError, match="split='dev'"):
        load_text("wikitext2", "dev", path="unused")
    assert issubclass(DataError, ConfigError)  # a run reports it as a configuration error


KEYS = CorpusKeys(name="data.name", split="data.split", path="data.path")


@pytest.mark.parametrize(
    ("name", "split", "path", "message"),
    [
        ("wikitext-103", "test", None, "data.name='wikitext-103' is neither a corpus"),
        ("pydoc", "dev", None, "data.split='dev' is not a split of corpus 'pydoc'"),
        ("ptb", "dev", None, "data.split='dev' is not a split of corpus 'ptb'"),
        ("pydoc", "test", "x.txt", "data.path='x.txt' is set, but corpus 'pydoc' is built in"),
        ("ptb", "test", "/no/such/dir", "data.path='/no/such/dir' does not exist"),
    ],
)
def test_errors_name_the_keys_they_are_given(name: str, split: str, path: str | None, message: str) -> None:
    with pytest.raises(DataError) as info:
        load_text(name, split, path, KEYS)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_wikitext2_hub_snapshot_dir(tmp_path: Path) -> None:
    snap = tmp_path / "wikitext"
    _write(snap / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet", {"text": _rows("tr", 5)})
    _write(snap / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet", {"text": _rows("te", 4)})
    assert load_text("wikitext2", "test", path=str(snap)) == "\n\n".join(_rows("te", 4))
    assert load_text("wikitext2", "train", path=str(snap)) == "\n\n".join(_rows("tr", 5))
    with pytest.raises(DataError, match="path=.*holds no 'validation' data file"):
        load_text("wikitext2", "validation", path=str(snap))


def test_ptb_jsonl_and_txt(tmp_path: Path) -> None:
    sentences = ["no it was n't black monday", "but while the new york stock exchange"]
    jsonl = _write(tmp_path / "ptb.test.jsonl", {"sentence": sentences})
    assert load_text("ptb", "test", path=str(jsonl)) == " ".join(sentences)
    assert load_text("ptb", "train", path=str(jsonl)) == "\n\n".join(sentences)
    txt = tmp_path / "ptb.test.txt"
    txt.write_text("\n".join(sentences) + "\n")
    assert load_text("ptb", "test", path=str(txt)) == " ".join(sentences)


def test_c4_validation_keeps_first_1100_documents(tmp_path: Path) -> None:
    docs = _rows("doc", 1105)
    en = tmp_path / "en"
    _write(en / "c4-validation.00000-of-00008.json.gz", {"text": docs, "url": docs})
    _write(en / "c4-train.00000-of-01024.json.gz", {"text": docs[:3], "url": docs[:3]})
    assert load_text("c4", "validation", path=str(tmp_path)) == " ".join(docs[:1100])
    assert load_text("c4", "test", path=str(tmp_path)) == " ".join(docs[:1100])
    assert load_text("c4", "train", path=str(tmp_path)) == "\n\n".join(docs[:3])


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "test.jsonl", {"content": ["a"]})
    with pytest.raises(DataError, match="has columns \\['content'\\], expected a 'sentence' column"):
        load_text("ptb", "test", path=str(path))


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".txt", bytes(range(256)), "is not UTF-8 text"),
        (".txt", b"text with a \0 byte", "is not UTF-8 text"),
        (".jsonl", bytes(range(256)), "could not be read as json"),
        (".jsonl", b'{"text": 3}\n', "column 'text' must hold text, found 3"),
        (".bin", b"abc", "expected files of one format"),
    ],
)
def test_unreadable_local_files_are_named(tmp_path: Path, suffix: str, content: bytes, message: str) -> None:
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_text(str(path), "test", keys=KEYS)
    assert str(info.value).startswith(f"data.name={str(path)!r}") and message in str(info.value)


def test_hub_unreachable_error_suggests_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext2", "ptb", "c4"):
        with pytest.raises(DataError, match=f"data.name='{name}'.*point data.path at a local copy"):
            load_text(name, "test", keys=KEYS)
    calibration = CorpusKeys("calibrate_name", "calibrate_name", None)  # no key points it at files
    with pytest.raises(DataError, match="calibrate_name='c4'.*set calibrate_name to a local file"):
        load_text("c4", "train", keys=calibration)


@pytest.mark.skipif(not datasets.config.HF_HUB_OFFLINE, reason="needs HF_DATASETS_OFFLINE=1")
def test_real_hub_call_offline_error() -> None:
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face hub.*point path at a local copy"):
        load_text("wikitext2", "test")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".json.gz"])
def test_local_path_as_corpus_name(suffix: str, tmp_path: Path) -> None:
    rows = _rows("local", 3)
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("raw text\n\nkept verbatim\n")
        expected = "raw text\n\nkept verbatim\n"
    else:
        _write(path, {"text": rows})
        expected = "\n\n".join(rows)
    assert load_text(str(path), "train") == load_text(str(path), "test") == expected


def test_local_datasets_cache_stays_in_quantkit_cache(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", {"text": ["a"]})
    load_text(str(path), "train")
    assert any((tmp_path / "cache" / "datasets").iterdir())


def test_calibration_samples_are_seeded_windows(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"sentence number {i}. " for i in range(200)))
    ids = eval_tokens(tokenizer, str(path))[0]  # (T,)
    a = calibration_samples(tokenizer, str(path), num_samples=6, seq_length=32, seed=0)
    b = calibration_samples(tokenizer, str(path), num_samples=6, seq_length=32, seed=0)
    c = calibration_samples(tokenizer, str(path), num_samples=6, seq_length=32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    windows = ids.unfold(0, 32, 1)  # (T - 31, 32): every possible window
    for row in a:
        assert (windows == row).all(dim=1).any()


def test_calibration_on_pydoc(tokenizer: PreTrainedTokenizerBase) -> None:
    samples = calibration_samples(tokenizer, "pydoc", num_samples=2, seq_length=128, seed=0)
    assert samples.shape == (2, 128)
    assert tokenizer.decode(samples[0]) in load_text("pydoc", "train")


def test_calibration_corpus_boundary(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("0123456789A")  # 11 byte tokens
    samples = calibration_samples(tokenizer, str(path), num_samples=3, seq_length=10, seed=0)
    assert (samples == eval_tokens(tokenizer, str(path))[0, :10]).all()  # only offset 0 fits
    with pytest.raises(DataError, match=r"calibrate_seq_length=11.*calibrate_name=.*only 11"):
        calibration_samples(tokenizer, str(path), num_samples=1, seq_length=11, seed=0)


@pytest.mark.parametrize(
    ("num_samples", "seq_length", "param"),
    [(0, 8, "num_calibrate"), (2, 0, "calibrate_seq_length")],
)
def test_calibration_validates_sizes(
    tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_length: int, param: str
) -> None:
    with pytest.raises(ValueError, match=param):
        calibration_samples(tokenizer, "pydoc", num_samples, seq_length, seed=0)


def test_eval_tokens_shape(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = _write(tmp_path / "wikitext-2-raw-v1" / "test-0.parquet", {"text": ["ab", "c"]})
    ids = eval_tokens(tokenizer, "wikitext2", path=str(path.parent))
    assert ids.shape == (1, len("ab\n\nc")) and ids.dtype == torch.int64

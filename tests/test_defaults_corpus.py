"""The offline corpus ``austen``: R's serialization, the Debian package, the cached split, the
offline error, and a run on it, all from a package built here (no download in tests)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from quantkit import austen, runner
from quantkit import data as qdata
from quantkit.config import build_run_config
from tests.test_config import compose_dict

BOOKS = {
    "emma": ["EMMA", "", "Emma Woodhouse, handsome, clever, and rich,", None, "seemed to unite some of the best"],
    "mansfieldpark": ["MANSFIELD PARK", "About thirty years ago Miss Maria Ward"],
    "northangerabbey": ["NORTHANGER ABBEY", "No one who had ever seen Catherine Morland"],
    "persuasion": ["Persuasion", "", "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,"] * 12,
    "prideprejudice": ["PRIDE AND PREJUDICE", "It is a truth universally acknowledged, that a single man"] * 8,
    "sensesensibility": ["SENSE AND SENSIBILITY", "The family of Dashwood had long been settled in Sussex."],
}


# ---------------------------------------------------------------- a janeaustenr package, written here


def _int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _char(text: str | None) -> bytes:
    if text is None:
        return _int(9, -1)  # NA_STRING
    raw = text.encode()
    return _int(0x00040009, len(raw)) + raw  # CHARSXP, ASCII level (as R writes it)


def _strsxp(items: list[str | None]) -> bytes:
    return _int(16, len(items)) + b"".join(_char(s) for s in items)


def _names(names: list[str], first: bool) -> bytes:
    """The attribute pairlist ``names = names``; R writes the symbol once, then references it."""
    tag = _int(1) + _char("names") if first else _int(0x1FF)  # SYMSXP, or REFSXP to reference 1
    return _int(0x402) + tag + _strsxp(names) + _int(254)


def _serialize(body: bytes) -> bytes:
    return b"X\n" + _int(3, 0x040201, 0x030500, 5) + b"UTF-8" + body


def lazyload(objects: dict[str, list[str | None]]) -> tuple[bytes, bytes]:
    """``(Rdata.rdx, Rdata.rdb)`` of R's lazy-load database of these character vectors."""
    rdb, offsets = b"", []
    for lines in objects.values():
        raw = _serialize(_strsxp(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets.append((len(rdb), len(blob)))
        rdb += blob
    variables = _int(0x213, len(offsets)) + b"".join(_int(13, 2, o, n) for o, n in offsets) + _names(list(objects), True)
    references = _int(0x213, 0) + _names([], False)
    compressed = _int(10, 1, 1)
    index = _int(0x213, 3) + variables + references + compressed + _names(["variables", "references", "compressed"], False)
    return gzip.compress(_serialize(index)), rdb


def _tar_xz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:xz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, payload in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode() + payload
        out += b"\n" if len(payload) % 2 else b""
    return out


def write_deb(path: Path, books: dict[str, list[str | None]] = BOOKS) -> Path:
    rdx, rdb = lazyload(books)
    data = _tar_xz({f"./{austen.DATA_DIR}/Rdata.rdx": rdx, f"./{austen.DATA_DIR}/Rdata.rdb": rdb})
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({}), "data.tar.xz": data}))
    return path


def _expected(split: str) -> str:
    books = austen.TEST_BOOKS if split == "test" else austen.TRAIN_BOOKS
    return "\n\n".join("\n".join(line or "" for line in BOOKS[b]).strip() for b in books)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def apt(monkeypatch, tmp_path):
    """``apt-get download`` replaced by writing the package above; counts the downloads."""
    calls = []

    def fetch(work: Path) -> Path:
        calls.append(work)
        return write_deb(work / f"{austen.PACKAGE}_1.0.0-1_all.deb")

    monkeypatch.setattr(austen, "download_deb", fetch)
    return calls


# ---------------------------------------------------------------- reading


def test_r_serialization_of_character_vectors_and_named_lists():
    assert austen.read_rds(_serialize(_strsxp(["a", None, "é"]))) == ["a", None, "é"]
    rdx, rdb = lazyload({"one": ["x", "y"], "two": []})
    assert austen.read_lazyload(rdx, rdb) == {"one": ["x", "y"], "two": []}
    with pytest.raises(austen.AustenError, match="not an R XDR"):
        austen.read_rds(b"RDA2\n")
    with pytest.raises(austen.AustenError, match="type 3 is not supported"):
        austen.read_rds(_serialize(_int(3)))  # a closure


def test_novels_from_the_package_and_the_split_by_book(tmp_path):
    novels = austen.novels_from_deb(write_deb(tmp_path / "p.deb").read_bytes())
    assert novels["emma"][3] == "" and novels["persuasion"] == BOOKS["persuasion"]
    texts = austen.split_texts(novels)
    assert texts == {"train": _expected("train"), "test": _expected("test")}
    assert "Kellynch" in texts["test"] and "Kellynch" not in texts["train"]
    assert texts["train"].startswith("EMMA") and texts["train"].endswith("settled in Sussex.")


def test_a_package_without_the_novels_is_refused(tmp_path):
    deb = write_deb(tmp_path / "p.deb", {"emma": ["x"]})
    with pytest.raises(austen.AustenError, match="lacks the novels"):
        austen.novels_from_deb(deb.read_bytes())
    with pytest.raises(austen.AustenError, match="not a Debian package"):
        austen.novels_from_deb(b"PK\x03\x04")


# ---------------------------------------------------------------- the cache and load_text


def test_built_once_into_the_cache_then_read_from_there(cache, apt):
    assert qdata.load_text("austen", "test") == _expected("test")
    assert qdata.load_text("austen", "train") == _expected("train")
    assert len(apt) == 1
    assert (cache / "corpora" / "austen-v1" / "test.txt").read_text() == _expected("test")
    assert not [p for p in (cache / "corpora").iterdir() if p.name.startswith(".")], "no partial build left"


def test_build_from_a_local_package(cache, tmp_path, capsys):
    assert austen.main([str(write_deb(tmp_path / "local.deb"))]) == 0
    assert "test.txt" in capsys.readouterr().out
    assert qdata.load_text("austen", "test") == _expected("test")


def test_offline_error_names_the_alternatives(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on PATH: the real download fails
    with pytest.raises(qdata.DataError) as err:
        qdata.load_text("austen", "test", keys=qdata.CorpusKeys("data.name", "data.split", "data.path"))
    message = str(err.value)
    for part in ("data.name='austen'", "apt-get is not available", "apt-get download r-cran-janeaustenr",
                 "python -m quantkit.austen FILE.deb", "data=text data.path=FILE"):
        assert part in message
    assert not (cache / "corpora" / "austen-v1").exists()


def test_bad_split_and_path_name_the_key(cache, apt):
    with pytest.raises(qdata.DataError, match="data.split='validation' is not a split of corpus 'austen'"):
        qdata.load_text("austen", "validation", keys=qdata.CorpusKeys("data.name", "data.split", "data.path"))
    with pytest.raises(qdata.DataError, match="data.path='/x.txt' is set, but corpus 'austen' is built in"):
        qdata.load_text("austen", "test", "/x.txt", qdata.CorpusKeys("data.name", "data.split", "data.path"))
    assert not apt


# ---------------------------------------------------------------- a run on it


def test_run_calibrates_and_evaluates_on_austen(cache, apt, tmp_path):
    cfg = build_run_config(compose_dict(
        "model=tiny-llama", "data=austen", "algo=awq", "algo.groupsize=32", "eval.seq_length=64", "eval.max_windows=3",
        "num_calibrate=4", "calibrate_seq_length=32", f"output_dir={tmp_path / 'run'}"))
    assert cfg.data.name == cfg.calibrate_name == "austen"
    results = runner.run(cfg)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["perplexity"] == results["perplexity"]
    assert results["eval"]["windows"] == 3 and len(apt) == 1

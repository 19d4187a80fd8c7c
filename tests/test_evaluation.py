"""Perplexity protocol against a hand computation on a tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from quantkit.evaluation import perplexity
from quantkit.models import build_tiny_llama, load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3)
    return load_model(str(path), torch.float32)[0]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 260, (1, 100), generator=torch.Generator().manual_seed(0))  # (1, T)


def _reference(model: nn.Module, ids: torch.Tensor, seq_length: int, n_windows: int) -> float:
    """Token-weighted mean of HF's per-window loss (which averages over seq_length - 1 tokens)."""
    total = 0.0
    with torch.no_grad():
        for i in range(n_windows):
            window = ids[:, i * seq_length : (i + 1) * seq_length]
            total += model(window, labels=window).loss.item() * (seq_length - 1)
    return total / (n_windows * (seq_length - 1))


@pytest.mark.parametrize(
    ("seq_length", "batch_size", "max_windows", "expected_windows"),
    [
        (16, 1, None, 6),  # 100 = 6 * 16 + 4: the partial tail is dropped
        (16, 4, None, 6),  # last batch holds 2 windows
        (7, 3, 5, 5),
        (100, 2, None, 1),  # exactly one window
        (10, 1, 50, 10),  # max_windows beyond the available windows
    ],
    ids=["L16-b1", "L16-b4", "L7-b3-max5", "L100-one", "L10-max-over"],
)
def test_matches_hand_computation(
    model: nn.Module,
    ids: torch.Tensor,
    seq_length: int,
    batch_size: int,
    max_windows: int | None,
    expected_windows: int,
) -> None:
    out = perplexity(model, ids, seq_length, batch_size, max_windows, progress=False)
    nll = _reference(model, ids, seq_length, expected_windows)
    assert out["windows"] == expected_windows
    assert out["tokens"] == expected_windows * (seq_length - 1)
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_accepts_flat_ids_and_low_precision(model: nn.Module, ids: torch.Tensor) -> None:
    full = perplexity(model, ids, 20, progress=False)
    assert perplexity(model, ids[0], 20, progress=False) == full
    half = perplexity(model.to(torch.bfloat16), ids, 20, progress=False)
    model.to(torch.float32)
    assert half["nll"] == pytest.approx(full["nll"], rel=2e-2)


class _Uniform(nn.Module):
    """Returns all-zero logits: every token has probability 1 / vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_perplexity_vocab() -> None:
    ids = torch.arange(50).view(1, 50) % 37
    out = perplexity(_Uniform(37), ids, 10, batch_size=2, progress=False)
    assert out["perplexity"] == pytest.approx(37.0)
    assert out["nll"] == pytest.approx(math.log(37.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_length": 101}, "100 tokens.*eval.seq_length=101"),
        ({"seq_length": 1}, "eval.seq_length must be >= 2"),
        ({"seq_length": 10, "batch_size": 0}, "eval.batch_size"),
        ({"seq_length": 10, "max_windows": 0}, "eval.max_windows"),
    ],
    ids=["too-short", "L1", "batch0", "max0"],
)
def test_errors_name_the_parameter(
    model: nn.Module, ids: torch.Tensor, kwargs: dict[str, int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        perplexity(model, ids, progress=False, **kwargs)


def test_rejects_batched_ids(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        perplexity(model, torch.zeros(2, 20, dtype=torch.int64), 10, progress=False)

"""What a run measures on a model: perplexity on a token stream (the GPTQ / standard PTQ
protocol) and the downstream tasks of ``eval.tasks`` (:mod:`quantkit.tasks`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quantkit.config import EvalConfig
from quantkit.tasks import TaskPlan, evaluate_tasks


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, eval_ids: torch.Tensor, cfg: EvalConfig,
             device: torch.device, tasks: TaskPlan | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Everything ``cfg`` asks of ``model`` as it is in memory (quantized or not).

    Returns :func:`perplexity`'s dict plus ``"tasks"``: the scores of every task of ``tasks``
    (empty without tasks). ``max_length`` bounds the task prompts (the model's positions).
    """
    out: dict[str, Any] = perplexity(model, eval_ids, cfg.seq_length, cfg.batch_size, cfg.max_windows, device)
    out["tasks"] = evaluate_tasks(model, tokenizer, tasks, cfg, device, max_length) if tasks is not None else {}
    return out


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_length: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity over non-overlapping windows of `seq_length` tokens.

    The stream is cut into `T // seq_length` windows (the partial tail is dropped) and only the
    first `max_windows` are kept (None: all). Each window is scored on its own, without
    context from the previous one: the logits at positions 0..L-2 predict tokens 1..L-1, so a
    window contributes `seq_length - 1` tokens. The NLL is the token-weighted mean over all
    windows, computed in float32 from the logits whatever the model dtype.

    Args:
        model: a causal LM returning `.logits` of shape (B, L, vocab).
        input_ids: (1, T) or (T,) integer token ids.
        seq_length: tokens per window (`eval.seq_length`), >= 2.
        batch_size: windows per forward pass.
        max_windows: score only the first N windows; None scores all of them.
        device: where the windows are sent; defaults to the device of the model's parameters.
        progress: show a tqdm bar.

    Returns:
        {"perplexity": exp(nll), "nll": mean NLL in nats per token, "tokens": scored tokens,
        "windows": scored windows}.
    """
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must have shape (1, T) or (T,), got {tuple(input_ids.shape)}")
    if seq_length < 2:
        raise ValueError(
            f"eval.seq_length must be >= 2 (one input and one target), got {seq_length}"
        )
    if batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"eval.max_windows must be >= 1 or None (all windows), got {max_windows}")
    n_windows = input_ids.numel() // seq_length
    if n_windows == 0:
        raise ValueError(
            f"The evaluation text has {input_ids.numel()} tokens, fewer than one window of "
            f"eval.seq_length={seq_length}: lower eval.seq_length or use a longer text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if device is None:
        device = next(model.parameters()).device
    windows = input_ids[: n_windows * seq_length].view(n_windows, seq_length)  # (N, L)

    total_nll = 0.0
    bar = tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
    with torch.inference_mode():
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)  # (B, L)
            logits = model(batch, use_cache=False).logits  # (B, L, V)
            shift_logits = logits[:, :-1].float()  # (B, L-1, V)
            targets = batch[:, 1:]  # (B, L-1)
            nll = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                targets.reshape(-1),
                reduction="sum",
            )
            total_nll += nll.item()
            bar.update(batch.shape[0])
    bar.close()

    tokens = n_windows * (seq_length - 1)
    mean_nll = total_nll / tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": tokens,
        "windows": n_windows,
    }

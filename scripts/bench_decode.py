"""End-to-end decode speed: quantized models against float16, in the same process.

For each model, variant and batch size it measures

* **prefill**: one forward of a ``(batch, prompt_len)`` prompt into an empty static KV cache
  (median of 3 after a warm-up), and
* **decode**: greedy steps of one token per sequence, ``--steps`` timed after ``--warmup``,
  reported as ms/token (mean, p10/p50/p90 over the steps), tokens/s (``batch / mean``) and the
  speed-up over the dense model at the same batch size.

Activations and the dense model are float16 (``--dtype``; float32 on a CPU, where float16
matmuls have no fast path). Variants: ``dense`` (the unquantized model), ``w4a16`` (RTN int4 g128 asymmetric weights, the
project's default weight grid, through ``quantkit.pipeline.quantize_model``: ``QuantLinear``
modules, ``lm_head`` kept in float16) and ``w8a8`` (RTN int8 per-channel weights, int8
per-token dynamic activations: the fused int8 GEMM).

Models: ``llama-7b`` (a Llama-2-7B-shaped model, random weights built from a ``LlamaConfig``
directly on the device in float16, no download; speed does not depend on the values),
``smollm2-135m`` (the embedded model through ``quantkit.models`` when its converted
checkpoint is already cached, else a random model of the same shape, which the table says)
and ``tiny-llama`` (the CPU smoke).

On CUDA the KV cache is transformers' ``StaticCache`` (fixed addresses) and each decode step
is captured once in a CUDA graph and replayed (``--graphs auto``), so a step costs its
kernels, not Python. Before timing, the graph's logits are checked against eager steps fed
the same tokens; if capture fails or the check does not pass, the row is timed eagerly and
says why. Eager steps are timed with CUDA events around the whole step (host gaps included).
On a CPU everything is eager and timed by wall clock (a smoke run).

Usage::

    python scripts/bench_decode.py                                  # GPU: llama-7b, smollm2-135m
    python scripts/bench_decode.py --models llama-7b --batches 1 --variants dense,w4a16
    python scripts/bench_decode.py --models tiny-llama --steps 4 --prompt-len 8   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import inspect
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchlib import Deadline, Report, environment, finish, fmt, markdown_table, summary_stats

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
TINY_LLAMA = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False)
SHAPES = {"llama-7b": LLAMA_7B, "smollm2-135m": SMOLLM2_135M, "tiny-llama": TINY_LLAMA}
VARIANTS = ("dense", "w4a16", "w8a8")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VERIFY_STEPS = 4
PREFILL_REPS = 3


def random_llama(shape: dict[str, Any], dtype: torch.dtype, device: torch.device,
                 seed: int) -> Any:
    """A Llama of ``shape`` built on ``device`` in ``dtype`` with N(0, 0.02) weights (norms 1),
    the same for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, use_cache=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in half precision: 7B fp32 would be 27 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def smollm2_checkpoint() -> Path | None:
    """The converted SmolLM2 checkpoint if ``quantkit.models`` has it cached (no download)."""
    from quantkit import models

    path = models.cache_dir() / "smollm2-135m"
    return path if (path / "config.json").is_file() else None


def build_model(name: str, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[Any, str]:
    """``(model, where its weights come from)``."""
    if name == "smollm2-135m" and smollm2_checkpoint() is not None:
        from quantkit import models

        model, _ = models.load_model("smollm2-135m", dtype, device)
        model.config.use_cache = True
        return model, "checkpoint (quantkit.models)"
    note = "random weights"
    if name == "smollm2-135m":
        note += " (checkpoint not cached: same shape, speed does not depend on the values)"
    return random_llama(SHAPES[name], dtype, device, seed), note


def quantize(model: Any, variant: str, device: torch.device) -> str:
    """Replace the linears of ``model`` by QuantLinear modules through the RTN pipeline; returns
    the weight scheme. Groups of 128 (32 on models narrower than 128, i.e. tiny-llama)."""
    from quantkit.algorithms.rtn import RTN, RTNConfig
    from quantkit.arch import get_arch
    from quantkit.config import DTypeConfig
    from quantkit.pipeline import quantize_model

    cfg = model.config
    group = 128 if min(cfg.hidden_size, cfg.intermediate_size) >= 128 else 32
    if variant == "w4a16":
        algo = RTN(RTNConfig(groupsize=group), DTypeConfig("int4", has_zero=True, unsigned=True),
                   DTypeConfig("float16"))
    elif variant == "w8a8":
        algo = RTN(RTNConfig(groupsize=-1, w_qtype="per_channel", a_qtype="per_token"),
                   DTypeConfig("int8"), DTypeConfig("int8"))
    else:
        raise ValueError(f"variant {variant!r} unknown; valid: {', '.join(VARIANTS)}")
    quantize_model(model, get_arch("llama"), algo, None, device, offload=device, progress=False)
    return algo.w_scheme.describe() + (f", act {algo.a_scheme.describe()}" if algo.a_scheme else "")


class Decoder:
    """Greedy decoding of ``batch`` sequences into a static KV cache of ``max_len`` tokens."""

    def __init__(self, model: Any, batch: int, max_len: int, device: torch.device) -> None:
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in 5.2x
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, 1) next input

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: self.cache})
        return out.logits[:, -1, :]  # (B, vocab)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        self.cache.reset()  # zeroes in place: captured graphs keep pointing at the same cache
        logits = self.forward(prompt)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        return logits

    def step(self) -> torch.Tensor:
        logits = self.forward(self.ids)
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, host gaps included (CUDA events around it, then a sync)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def capture_step(dec: Decoder, prompt: torch.Tensor, device: torch.device) -> tuple[Any, torch.Tensor]:
    """A CUDA graph of one decode step (it reads ``dec.ids``, writes the next token there) and
    its static logits. Two eager steps on a side stream first compile every kernel."""
    dec.prefill(prompt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dec.step()
        dec.step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = dec.step()
    return graph, logits


def verify_graph(dec: Decoder, graph: Any, logits: torch.Tensor, prompt: torch.Tensor) -> float:
    """Max |graph - eager| / max |eager| of the logits over :data:`VERIFY_STEPS` steps fed the
    same tokens (the eager greedy ones)."""
    dec.prefill(prompt)
    first = dec.ids.clone()
    eager, tokens = [], [first]
    for _ in range(VERIFY_STEPS):
        eager.append(dec.step().float().clone())
        tokens.append(dec.ids.clone())
    dec.prefill(prompt)
    worst = 0.0
    for i in range(VERIFY_STEPS):
        dec.ids.copy_(tokens[i])
        graph.replay()
        diff = (logits.float() - eager[i]).abs().max() / eager[i].abs().max().clamp_min(1e-30)
        worst = max(worst, diff.item())
    return worst


def measure(model: Any, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Prefill and decode timings of one model at one batch size."""
    vocab = model.config.vocab_size
    max_len = args.prompt_len + args.warmup + args.steps + 2 * VERIFY_STEPS + 8
    gen = torch.Generator(device=device).manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, args.prompt_len), device=device, generator=gen)
    dec = Decoder(model, batch, max_len, device)
    with torch.no_grad():
        dec.prefill(prompt)  # warm-up: compiles the prefill kernels, allocates the cache
        _sync(device)
        prefill = sorted(time_ms(lambda: dec.prefill(prompt), device) for _ in range(PREFILL_REPS))
        mode, check, step = "eager", "-", dec.step
        if device.type == "cuda" and args.graphs != "off":
            try:
                graph, logits = capture_step(dec, prompt, device)
                err = verify_graph(dec, graph, logits, prompt)
                check = f"graph vs eager logits: {err:.1e}"
                if err <= args.graph_tolerance:
                    mode, step = "CUDA graph", graph.replay
                else:
                    mode = "eager (graph check failed)"
            except Exception as exc:  # noqa: BLE001 - fall back to eager and say why
                torch.cuda.synchronize(device)
                mode = "eager (graph capture failed)"
                check = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                if args.graphs == "on":
                    raise
        dec.prefill(prompt)
        for _ in range(args.warmup):
            step()
        _sync(device)
        samples = [time_ms(step, device) for _ in range(args.steps)]
    stats = summary_stats(samples)
    return dict(prefill_ms=prefill[len(prefill) // 2], decode_ms=stats, mode=mode, check=check,
                tokens_per_s=1e3 * batch / stats["mean"])


def weight_bytes(model: Any) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.dtype != torch.float32:  # skip rotary tables
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    dtype = DTYPES[args.dtype]
    deadline = Deadline(args.deadline)
    lines: list[list[object]] = []
    header = ["model", "weights", "variant", "batch", "mode", "prefill ms", "ms/token mean",
              "p10", "p50", "p90", "tokens/s", "speed-up vs dense", "graph check"]
    dense_ms: dict[tuple[str, int], float] = {}

    def render(note: str = "") -> None:
        table = markdown_table(header, lines, [False] * 3 + [True, False] + [True] * 7 + [False])
        report.set("table", f"## Decode\n\n{table}\n{note}")

    for name in args.models:
        for variant in args.variants:
            if deadline.expired():
                render(f"\n(stopped at the time budget before {name} {variant})\n")
                return
            model = None
            try:
                model, source = build_model(name, dtype, device, args.seed)
                t0 = time.perf_counter()
                scheme = quantize(model, variant, device) if variant != "dense" else str(dtype).removeprefix("torch.")
                quant_s = time.perf_counter() - t0
                nbytes = weight_bytes(model)
                for batch in args.batches:
                    if deadline.expired():
                        render(f"\n(stopped at the time budget before {name} {variant} b{batch})\n")
                        return
                    r = measure(model, batch, args, device)
                    d = r["decode_ms"]
                    if variant == "dense":
                        dense_ms[(name, batch)] = d["mean"]
                    base = dense_ms.get((name, batch))
                    speedup = None if base is None else base / d["mean"]
                    report.add_row("decode", dict(model=name, source=source, variant=variant,
                                                  batch=batch, scheme=scheme, weight_bytes=nbytes,
                                                  quantize_s=quant_s, speedup_vs_dense=speedup, **r))
                    lines.append([
                        name, f"{source.split(' (')[0]}, {nbytes / 2**30:.2f} GiB",
                        f"{variant}: {scheme}", batch,
                        r["mode"], f"{r['prefill_ms']:.2f}", f"{d['mean']:.3f}", f"{d['p10']:.3f}",
                        f"{d['p50']:.3f}", f"{d['p90']:.3f}", f"{r['tokens_per_s']:.1f}",
                        fmt(speedup, ".2f", "x"), r["check"],
                    ])
                    render()
            except Exception as exc:  # noqa: BLE001 - one model/variant failing must not end the run
                lines.append([name, "-", variant, "-", "FAILED", "-", "-", "-", "-", "-", "-", "-",
                              f"{type(exc).__name__}: {exc}".splitlines()[0][:160]])
                report.set(f"tb {name} {variant}",
                           f"\n{name} {variant} failed:\n```\n{traceback.format_exc()[-3000:]}\n```\n")
                render()
            finally:
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def names(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            items = [t for t in text.split(",") if t]
            bad = [t for t in items if t not in allowed]
            if bad or not items:
                raise argparse.ArgumentTypeError(
                    f"{what} {bad or text!r} unknown; valid: {', '.join(allowed)}")
            return items
        return parse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=names(tuple(SHAPES), "model"),
                   help="default: llama-7b,smollm2-135m on CUDA, tiny-llama on CPU")
    p.add_argument("--variants", type=names(VARIANTS, "variant"), default=list(VARIANTS))
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=None, help="default: 128 (CPU: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 64; CPU 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 8; CPU 1)")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="CUDA graphs for decode steps (on: fail instead of falling back)")
    p.add_argument("--graph-tolerance", type=float, default=2e-2,
                   help="largest graph-vs-eager logit difference (relative) accepted")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: float16 (CPU: float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, help="write the report here (rewritten after each row)")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--kernels-json", type=Path, help="write the compiled kernels it ran here")
    p.add_argument("--deadline", type=float, help="stop starting rows after this many seconds")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    for key in ("prompt_len", "steps", "warmup"):
        value = getattr(args, key)
        if value is not None and value < (1 if key != "warmup" else 0):
            p.error(f"--{key.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    args.models = args.models or (["llama-7b", "smollm2-135m"] if on_gpu else ["tiny-llama"])
    args.dtype = args.dtype or ("float16" if on_gpu else "float32")
    args.prompt_len = args.prompt_len or (128 if on_gpu else 8)
    args.steps = args.steps or (64 if on_gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (8 if on_gpu else 1)
    report = Report(args.markdown, args.json)
    report.meta.update(vars(args) | {"device": str(device)})
    mode = "" if on_gpu else " (smoke run on CPU)"
    report.set("head", "\n".join([
        f"# quantkit decode benchmark{mode}", "", *environment(device),
        f"- prompt {args.prompt_len} tokens, {args.warmup} warm-up + {args.steps} timed decode "
        f"steps per row, greedy; {args.dtype} activations; static KV cache"
        + ("; decode steps replayed as CUDA graphs where the check passes" if on_gpu else ""), "",
    ]))
    run(args, device, report)
    return finish(report, args.kernels_json, on_gpu)


if __name__ == "__main__":
    main()

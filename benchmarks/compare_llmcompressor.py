"""GPTQ by llm-compressor (vLLM project) on quantkit's protocol, for a side-by-side comparison.

Same model loading (float32, CPU), same calibration windows (pydoc train split, seed 0), same
perplexity (pydoc test split, non-overlapping windows) as ``quantkit.runner`` with the default
config; only the GPTQ implementation differs: ``llmcompressor.oneshot`` with a ``GPTQModifier``
(targets Linear, lm_head ignored, int weights, asymmetric by default, dampening 0.01, block 128,
actorder off unless --actorder), sequential pipeline (one decoder layer at a time, inputs of
layer i+1 taken from the already quantized layer i).

Needs an environment with both quantkit and llmcompressor. llmcompressor is not a quantkit
dependency (it pins older transformers); measured with llmcompressor 0.14.0.1 installed with
``pip install --no-deps llmcompressor==0.14.0.1 accelerate`` into a separate virtual environment
whose path also reaches quantkit's (a .pth file), so that torch/transformers stay the same:

    HF_HUB_OFFLINE=1 python benchmarks/compare_llmcompressor.py            # SmolLM2, w4 g128
    ... --groupsize -1                        # per channel
    ... --actorder                            # llm-compressor "static"/"weight" actorder

Group sizes that do not divide a layer's input width (SmolLM2: 576 % 128 != 0): llm-compressor's
"group" strategy refuses such layers (it can only leave them in full precision, `ignore`). With
``--layout auto`` (default) the script then uses llm-compressor's "block" strategy with blocks of
1 row x groupsize columns, which is the same per-row group layout with a shorter last group
(zero-padded for the min/max; zero is always in the range, so padding changes nothing) — what
quantkit does. ``--layout group`` forces the group strategy (fails on such layers),
``--layout group-ignore`` leaves the indivisible layers unquantized (llm-compressor's own advice).

The oneshot call leaves the GPTQ result (quantize-dequantized weights) in each Linear's
``weight``; perplexity is measured on that in-memory model with compressed-tensors' forward-time
fake quantization switched off (a check on one window compares it with the wrapped forward).

Where llm-compressor's GPTQ itself differs from quantkit's (not a setting of this script):
- group scales/zero points come from the ORIGINAL weights before GPTQ runs (its observer), i.e.
  always "static groups"; quantkit without actorder computes each group's parameters from the
  error-updated weights when the group is reached (original GPTQ). With --actorder both use
  static groups: ``algo.actorder=true`` (static_groups=true) is the like-for-like quantkit run.
- all linears of a decoder layer are calibrated in one pass on that layer's unquantized weights;
  quantkit's default ``algo.layer_sequential=true`` re-calibrates o_proj / down_proj on the
  outputs of the already quantized q/k/v / gate/up: compare with ``algo.layer_sequential=false``.
- calibration forwards run in float32, as quantkit's default ``calibrate_dtype=model`` on a CPU.
- a Hessian that fails Cholesky falls back to round-to-nearest (quantkit raises the damping x10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from quantkit import data as qdata  # noqa: E402
from quantkit import models  # noqa: E402
from quantkit.evaluation import perplexity  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="quantkit model name (smollm2-135m, tiny-llama, ...) or a local HF checkpoint folder")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groupsize", type=int, default=128, help="columns per group; -1 = per channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid without zero point (default: asymmetric)")
    p.add_argument("--actorder", action="store_true", help="llm-compressor actorder=static (weight)")
    p.add_argument("--layout", choices=("auto", "group", "block", "group-ignore"), default="auto",
                   help="how groups are expressed to llm-compressor (see module doc)")
    p.add_argument("--num-calibrate", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (quantkit's seed)")
    p.add_argument("--data", default="pydoc", help="corpus name (quantkit.data); pydoc works offline")
    p.add_argument("--data-path", default=None, help="local copy of a hub corpus (quantkit's data.path)")
    p.add_argument("--eval-split", default=None, help="default: the split in conf/data/<data>.yaml")
    p.add_argument("--eval-seq-length", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--dampening-frac", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--pipeline", default="sequential", help="llm-compressor calibration pipeline")
    p.add_argument("--baseline", action="store_true", help="also evaluate the unquantized model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/llmcompressor_<bits>_g<groupsize>[_actorder].json)")
    return p.parse_args(argv)


def eval_split(name: str, override: str | None) -> str:
    """The split quantkit evaluates on: conf/data/<name>.yaml's ``split`` (pydoc: test)."""
    if override:
        return override
    conf = REPO / "conf" / "data" / f"{name}.yaml"
    if conf.is_file():
        for line in conf.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "split":
                return value.split("#")[0].strip()
    return "test"


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head"}


def weight_args(args: argparse.Namespace, layout: str) -> dict:
    # actorder is set on the GPTQModifier (its default would be "static"), not here
    w = {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric}
    if args.groupsize == -1:
        w["strategy"] = "channel"
    elif layout == "block":
        w["strategy"] = "block"
        w["block_structure"] = [1, args.groupsize]
    else:
        w["strategy"] = "group"
        w["group_size"] = args.groupsize
    return w


def distinct_per_group(weight: torch.Tensor, groupsize: int) -> int:
    """Max number of distinct values in one row-group of ``weight`` (whole rows if groupsize=-1)."""
    W = weight.detach().float()
    cols = W.shape[1]
    g = cols if groupsize == -1 else groupsize
    worst = 0
    for start in range(0, cols, g):
        block = W[:, start:start + g].sort(dim=1).values
        distinct = 1 + (block[:, 1:] != block[:, :-1]).sum(dim=1)
        worst = max(worst, int(distinct.max()))
    return worst


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import llmcompressor
    from compressed_tensors.quantization import disable_quantization, enable_quantization
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    device = torch.device("cpu")
    path = models.resolve_model_path(args.model)
    model, tokenizer = models.load_model(path, torch.float32, device)
    split = eval_split(args.data, args.eval_split)
    eval_ids = qdata.eval_tokens(tokenizer, args.data, split, args.data_path)
    samples = qdata.calibration_samples(tokenizer, args.data, args.num_calibrate, args.seq_length, args.seed,
                                        args.data_path)  # (n, L) int64, exactly quantkit's windows

    linears = target_linears(model)
    widths = sorted({m.in_features for m in linears.values()})
    ignore = ["lm_head"]
    layout = args.layout
    if args.groupsize != -1:
        if args.groupsize > widths[0]:
            sys.exit(f"--groupsize {args.groupsize} is larger than the smallest layer input ({widths[0]}), "
                     "which quantkit also rejects")
        ragged = [w for w in widths if w % args.groupsize]
        if layout == "auto":
            layout = "block" if ragged else "group"
        if layout == "group-ignore":
            skipped = [n for n, m in linears.items() if m.in_features % args.groupsize]
            ignore += skipped
            layout = "group"
            if len(skipped) == len(linears):
                sys.exit(f"--layout group-ignore: no layer has an input width divisible by {args.groupsize}")
            print(f"group-ignore: {len(skipped)} of {len(linears)} linears stay in full precision "
                  f"(input widths {ragged} not multiples of {args.groupsize})")
    else:
        layout = "channel"
    wargs = weight_args(args, layout)

    baseline = None
    if args.baseline:
        baseline = perplexity(model, eval_ids, args.eval_seq_length, args.eval_batch_size, args.max_windows, device)

    probe = next(iter(linears))
    before = linears[probe].weight.detach().clone()

    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": wargs}},
        ignore=ignore,
        block_size=args.block_size,
        dampening_frac=args.dampening_frac,
        actorder="static" if args.actorder else None,
    )
    calib = Dataset.from_dict({
        "input_ids": samples.tolist(),
        "attention_mask": torch.ones_like(samples).tolist(),
    })
    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=calib,
        num_calibration_samples=len(calib),
        max_seq_length=args.seq_length,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline=args.pipeline,
        output_dir=None,
    )
    quant_seconds = time.perf_counter() - t0

    # Evaluate on the stored GPTQ weights (already quantize-dequantized); check on one window
    # that compressed-tensors' own fake-quantized forward gives the same logits.
    model.eval()
    window = eval_ids[:, : args.eval_seq_length]
    with torch.inference_mode():
        wrapped = model(window, use_cache=False).logits
        model.apply(disable_quantization)
        plain = model(window, use_cache=False).logits
    forward_diff = float((wrapped - plain).abs().max())
    result_ppl = perplexity(model, eval_ids, args.eval_seq_length, args.eval_batch_size, args.max_windows, device)
    model.apply(enable_quantization)

    quantized = [n for n, m in linears.items() if getattr(m, "quantization_scheme", None) is not None]
    after = linears[probe].weight.detach()
    distinct = distinct_per_group(after, args.groupsize)
    scheme = (f"w{args.bits} {'sym' if args.symmetric else 'asym'} "
              + ("per-channel" if args.groupsize == -1 else f"g{args.groupsize} ({layout})")
              + (" actorder" if args.actorder else ""))
    out = {
        "llmcompressor_version": llmcompressor.__version__,
        "model": args.model,
        "scheme": scheme,
        "weights": wargs,
        "actorder": "static" if args.actorder else None,
        "ignore": ignore,
        "quantized_linears": len(quantized),
        "total_linears": len(linears),
        "perplexity": result_ppl["perplexity"],
        "nll": result_ppl["nll"],
        "eval_tokens": result_ppl["tokens"],
        "eval_windows": result_ppl["windows"],
        "baseline_perplexity": baseline["perplexity"] if baseline else None,
        "quant_seconds": quant_seconds,
        "num_calibrate": args.num_calibrate,
        "seq_length": args.seq_length,
        "eval_seq_length": args.eval_seq_length,
        "max_windows": args.max_windows,
        "data": args.data,
        "eval_split": split,
        "dampening_frac": args.dampening_frac,
        "block_size": args.block_size,
        "pipeline": args.pipeline,
        "torch_threads": torch.get_num_threads(),
        "check": {
            "probe_layer": probe,
            "weight_changed": bool((after != before).any()),
            "max_abs_weight_change": float((after - before).abs().max()),
            "max_distinct_values_per_group": distinct,
            "grid_size": 2 ** args.bits,
            "wrapped_vs_plain_forward_max_abs_logit_diff": forward_diff,
        },
    }
    dest = Path(args.out) if args.out else HERE / (
        f"llmcompressor_{args.bits}_g{args.groupsize}{'_actorder' if args.actorder else ''}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"llmcompressor {out['llmcompressor_version']} | {scheme} | ppl {out['perplexity']:.4f}"
          + (f" (fp32 {baseline['perplexity']:.4f})" if baseline else "")
          + f" | quant {quant_seconds:.1f} s | {len(quantized)}/{len(linears)} linears"
          + f" | {dest}")
    return out


if __name__ == "__main__":
    main()

"""quantkit vs llm-compressor (vLLM project) on one protocol: GPTQ, AWQ and SmoothQuant W8A8.

Same model loading (float32, CPU), same calibration windows (the corpus's train split, seed 0),
same perplexity code and windows (its test split) for both tools; only the algorithm differs.
Three comparisons (``--preset``):

- ``defaults``: each tool with its own defaults, what a user gets without tuning.
  llm-compressor: GPTQ = ``GPTQModifier`` with the settings of its ``W4A16`` scheme (symmetric
  int, groups, its default ``actorder="static"``, dampening 0.01, block 128); AWQ =
  ``AWQModifier`` (duo scaling, n_grid 20) with ``W4A16_ASYM`` weights, as its examples;
  SmoothQuant = ``SmoothQuantModifier`` (smoothing_strength 0.5) + ``QuantizationModifier``
  ``W8A8`` (int8 per-channel symmetric weights, dynamic per-token int8 activations).
  quantkit: ``algo=gptq`` / ``algo=awq`` with ``w_dtype=int<bits> algo.groupsize=<g>``,
  ``algo=smoothquant w_dtype=int8 a_dtype=int8``, everything else from ``conf/``.
- ``best``: each tool's candidates, and the best of each. llm-compressor: GPTQ symmetric /
  asymmetric x actorder static / none; AWQ asymmetric / symmetric; SmoothQuant strength 0.5 /
  0.8 with round-to-nearest or GPTQ weights (its W8A8 example). quantkit: every variant of
  ``conf/study/`` for that algorithm (the ``defaults_study`` preset's), SmoothQuant alpha 0.5 /
  0.8 / auto and SmoothQuant+GPTQ.
- ``custom`` (the default, as before): one llm-compressor GPTQ run with the flags given
  (``--symmetric``, ``--actorder``, ``--dampening-frac``, ...), no quantkit run.

``--side`` picks which tool runs (``both``, ``llmcompressor``, ``quantkit``): the quantkit side
needs no llm-compressor (it runs ``quantkit.runner`` in this process, results under
``--work-dir``), so it also runs where llm-compressor is not installed.

llm-compressor is not a quantkit dependency (it pins older transformers); measured with
llmcompressor 0.14.0.1 installed with ``pip install --no-deps llmcompressor==0.14.0.1 accelerate``
into a separate virtual environment that also reaches quantkit's (a .pth file naming its
site-packages, and a copy of its ``__editable__.quantkit-*.pth``), so that torch/transformers
stay the same:

    HF_HUB_OFFLINE=1 python benchmarks/compare_llmcompressor.py            # GPTQ w4 g128, custom
    ... --algo awq --preset defaults --data austen --groupsize 64
    ... --algo smoothquant --preset best --max-windows 63
    ... --groupsize -1 / --actorder / --symmetric     # custom GPTQ settings

Group sizes that do not divide a layer's input width (SmolLM2: 576 % 128 != 0): llm-compressor's
"group" strategy refuses such layers (it can only leave them in full precision, `ignore`). With
``--layout auto`` (default) the script then uses llm-compressor's "block" strategy with blocks of
1 row x groupsize columns, which is the same per-row group layout with a shorter last group
(zero-padded for the min/max; zero is always in the range, so padding changes nothing) — what
quantkit does. ``--layout group`` forces the group strategy (fails on such layers),
``--layout group-ignore`` leaves the indivisible layers unquantized (llm-compressor's own advice).

Weight-only runs are evaluated on the quantize-dequantized weights stored in each Linear's
``weight``, with compressed-tensors' forward-time fake quantization switched off. GPTQModifier
stores them itself; after AWQ, QuantizationModifier rounds only in the wrapped forward, so the
script writes that rounding into the weights (and checks the logits against the wrapped
forward). A stored weight with more than 2**bits values in a group is refused. W8A8 keeps it on: the activations are
quantized in that forward (compressed-tensors' full symmetric grid, ``amax / 127.5``; quantkit's
activations use the restricted one, ``amax / 127``, as vLLM's int8 kernels).

Where llm-compressor's GPTQ itself differs from quantkit's (not a setting of this script):
- group scales/zero points come from the ORIGINAL weights before GPTQ runs (its observer), i.e.
  always "static groups"; quantkit without actorder computes each group's parameters from the
  error-updated weights when the group is reached (original GPTQ).
- all linears of a decoder layer are calibrated in one pass on that layer's unquantized weights;
  quantkit's default ``algo.layer_sequential=true`` re-calibrates o_proj / down_proj on the
  outputs of the already quantized q/k/v / gate/up (``algo.layer_sequential=false``: one pass).
- a Hessian that fails Cholesky falls back to round-to-nearest (quantkit raises the damping x10).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
ALGOS = ("gptq", "awq", "smoothquant")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=ALGOS, default="gptq")
    p.add_argument("--preset", choices=("custom", "defaults", "best"), default="custom",
                   help="custom: one llm-compressor GPTQ run with the flags below; defaults / best: see the doc")
    p.add_argument("--side", choices=("both", "llmcompressor", "quantkit"), default="both",
                   help="which tool runs (custom: llmcompressor only)")
    p.add_argument("--model", default="smollm2-135m",
                   help="quantkit model name (smollm2-135m, tiny-llama, ...) or a local HF checkpoint folder")
    p.add_argument("--bits", type=int, default=4, help="weight bits of GPTQ/AWQ (SmoothQuant: W8A8)")
    p.add_argument("--groupsize", type=int, default=128, help="columns per group; -1 = per channel")
    p.add_argument("--symmetric", action="store_true", help="custom: symmetric grid without zero point")
    p.add_argument("--actorder", action="store_true", help="custom: llm-compressor actorder=static (weight)")
    p.add_argument("--layout", choices=("auto", "group", "block", "group-ignore"), default="auto",
                   help="how groups are expressed to llm-compressor (see module doc)")
    p.add_argument("--num-calibrate", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (quantkit's seed)")
    p.add_argument("--data", default="pydoc", help="corpus name (quantkit.data): pydoc, austen (offline), ...")
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
    p.add_argument("--work-dir", default=None, help="quantkit runs' output folders (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/llmcompressor_<...>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ what each side runs


def llmcompressor_candidates(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The llm-compressor settings to run: ``{"name", "weights": {symmetric, bits}, ...}``."""
    if args.preset == "custom":
        return [{"name": "custom", "algo": "gptq", "symmetric": args.symmetric, "bits": args.bits,
                 "actorder": "static" if args.actorder else None}]
    if args.algo == "gptq":
        default = {"name": f"defaults (W4A16 settings at {args.bits} bits: sym, actorder static)", "algo": "gptq",
                   "symmetric": True, "bits": args.bits, "actorder": "library-default"}
        if args.preset == "defaults":
            return [default]
        return [{"name": f"{'sym' if sym else 'asym'} actorder={order}", "algo": "gptq", "symmetric": sym,
                 "bits": args.bits, "actorder": order} for sym in (True, False) for order in ("static", None)]
    if args.algo == "awq":
        grids = [False] if args.preset == "defaults" else [False, True]
        return [{"name": f"AWQModifier W4A16_{'SYM' if sym else 'ASYM'}", "algo": "awq", "symmetric": sym,
                 "bits": args.bits} for sym in grids]
    strengths = [0.5] if args.preset == "defaults" else [0.5, 0.8]
    weights = ["rtn"] if args.preset == "defaults" else ["rtn", "gptq"]
    return [{"name": f"SmoothQuant {s} + {w.upper()} W8A8", "algo": "smoothquant", "strength": s, "weights": w}
            for s in strengths for w in weights]


def quantkit_candidates(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(name, Hydra overrides)`` of the quantkit runs (the protocol keys are added later)."""
    if args.preset == "custom":
        return []
    if args.algo == "smoothquant":
        w8a8 = ["w_dtype=int8", "a_dtype=int8"]
        if args.preset == "defaults":
            return [("smoothquant (defaults)", ["algo=smoothquant", *w8a8])]
        return [(f"smoothquant alpha={a}", ["algo=smoothquant", f"algo.alpha={a}", *w8a8]) for a in ("0.5", "0.8", "auto")] \
            + [("smoothquant+gptq alpha=0.8", ["algo=smoothquant_gptq", "algo.alpha=0.8", "algo.groupsize=-1", *w8a8])]
    scheme = [f"w_dtype=int{args.bits}", f"algo.groupsize={args.groupsize}"]
    if args.preset == "defaults":
        return [(f"{args.algo} (defaults)", [f"algo={args.algo}", *scheme])]
    variants = sorted(p.stem for p in (REPO / "conf" / "study").glob(f"{args.algo}*.yaml"))
    return [(v, ["+experiment=defaults_study", f"+study={v}", *scheme]) for v in variants]


def protocol_overrides(args: argparse.Namespace) -> list[str]:
    """The quantkit keys that make its runs use this script's protocol."""
    model = ([f"model={args.model}"] if (REPO / "conf" / "model" / f"{args.model}.yaml").is_file()
             else ["model=hf", f"model.path={args.model}"])
    out = [*model, f"data={args.data}" if (REPO / "conf" / "data" / f"{args.data}.yaml").is_file()
           else f"data.name={args.data}", f"num_calibrate={args.num_calibrate}",
           f"calibrate_seq_length={args.seq_length}", f"seed={args.seed}", f"eval.seq_length={args.eval_seq_length}",
           f"eval.max_windows={'null' if args.max_windows is None else args.max_windows}",
           f"eval.baseline={str(args.baseline).lower()}", "device=cpu"]
    if args.data_path:
        out.append(f"data.path={args.data_path}")
    if args.eval_split:
        out.append(f"data.split={args.eval_split}")
    return out


def run_quantkit(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from quantkit import runner
    from quantkit.config import build_run_config
    from quantkit.layers import expand_dtype_names, hydra_dtype

    out = []
    for index, (name, overrides) in enumerate(quantkit_candidates(args)):
        run_dir = work / f"{index:02d}"
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, *protocol_overrides(args), f"output_dir={run_dir}"])
            data = expand_dtype_names(OmegaConf.to_container(cfg, resolve=True), hydra_dtype)
        results = runner.run(build_run_config(data), data)
        out.append({"name": name, "overrides": overrides, "perplexity": results["perplexity"],
                    "baseline_perplexity": results["baseline_perplexity"],
                    "quant_seconds": results["quantization_seconds"], "bits_per_weight": results["bits_per_weight"],
                    "smoothquant_alpha_counts": (results.get("smoothquant") or {}).get("alpha_counts")})
        print(f"quantkit {name}: ppl {results['perplexity']:.4f} | quant {results['quantization_seconds']:.1f} s")
    return out


# ------------------------------------------------------------------ llm-compressor


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


def group_layout(args: argparse.Namespace, linears: dict[str, nn.Linear]) -> tuple[str, list[str]]:
    """llm-compressor's strategy for ``--groupsize`` and the extra linears to ignore."""
    if args.groupsize == -1:
        return "channel", []
    widths = sorted({m.in_features for m in linears.values()})
    if args.groupsize > widths[0]:
        sys.exit(f"--groupsize {args.groupsize} is larger than the smallest layer input ({widths[0]}), "
                 "which quantkit also rejects")
    ragged = [w for w in widths if w % args.groupsize]
    if args.layout == "auto":
        return ("block" if ragged else "group"), []
    if args.layout == "group-ignore":
        skipped = [n for n, m in linears.items() if m.in_features % args.groupsize]
        if len(skipped) == len(linears):
            sys.exit(f"--layout group-ignore: no layer has an input width divisible by {args.groupsize}")
        print(f"group-ignore: {len(skipped)} of {len(linears)} linears stay in full precision "
              f"(input widths {ragged} not multiples of {args.groupsize})")
        return "group", skipped
    return args.layout, []


def weight_args(bits: int, groupsize: int, symmetric: bool, layout: str) -> dict:
    # actorder is set on the GPTQModifier (its default is "static"), not here
    w: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": symmetric}
    if layout == "channel":
        w["strategy"] = "channel"
    elif layout == "block":
        w["strategy"] = "block"
        w["block_structure"] = [1, groupsize]
    else:
        w["strategy"] = "group"
        w["group_size"] = groupsize
    return w


def recipe(candidate: dict[str, Any], args: argparse.Namespace, layout: str, ignore: list[str]) -> tuple[list, dict]:
    """The llm-compressor modifiers of ``candidate`` and its quantization config group."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    if candidate["algo"] == "smoothquant":
        group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                    "strategy": "channel"},
                 "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                       "dynamic": True}}
        weights = (GPTQModifier(config_groups={"group_0": group}, ignore=ignore, block_size=args.block_size,
                                dampening_frac=args.dampening_frac) if candidate["weights"] == "gptq"
                   else QuantizationModifier(config_groups={"group_0": group}, ignore=ignore))
        return [SmoothQuantModifier(smoothing_strength=candidate["strength"]), weights], group
    group = {"targets": ["Linear"],
             "weights": weight_args(candidate["bits"], args.groupsize, candidate["symmetric"], layout)}
    if candidate["algo"] == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups={"group_0": group}, ignore=ignore)], group
    kwargs: dict[str, Any] = {"block_size": args.block_size, "dampening_frac": args.dampening_frac}
    if candidate["actorder"] != "library-default":
        kwargs["actorder"] = candidate["actorder"]
    return [GPTQModifier(config_groups={"group_0": group}, ignore=ignore, **kwargs)], group


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


def freeze_weights(linears: dict[str, torch.nn.Module]) -> None:
    """Write each quantized linear's rounded weight into its stored weight.

    ``QuantizationModifier`` (the weights after AWQ) keeps the float weight stored and rounds it
    in the wrapped forward only; ``GPTQModifier`` stores the rounded weights itself."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():
        for m in linears.values():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                m.weight.copy_(fake_quantize(m.weight, m.weight_scale, getattr(m, "weight_zero_point", None),
                                             scheme.weights))


def run_llmcompressor(args: argparse.Namespace, candidate: dict[str, Any], path: str, eval_ids: torch.Tensor,
                      samples: torch.Tensor) -> dict[str, Any]:
    from compressed_tensors.quantization import disable_quantization, enable_quantization
    from datasets import Dataset
    from llmcompressor import oneshot

    device = torch.device("cpu")
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations for faster copies to a GPU, which
        # raises without one; pinning changes no value, so on a CPU it is skipped
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    model, tokenizer = models.load_model(path, torch.float32, device)
    linears = target_linears(model)
    layout, ignored = group_layout(args, linears) if candidate["algo"] != "smoothquant" else ("channel", [])
    ignore = ["lm_head", *ignored]
    modifiers, group = recipe(candidate, args, layout, ignore)
    probe = next(iter(linears))
    before = linears[probe].weight.detach().clone()
    calib = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=modifiers, dataset=calib, num_calibration_samples=len(calib),
            max_seq_length=args.seq_length, shuffle_calibration_samples=False, batch_size=1, pipeline=args.pipeline,
            output_dir=None)
    quant_seconds = time.perf_counter() - t0

    model.eval()
    window = eval_ids[:, : args.eval_seq_length]
    with torch.inference_mode():
        wrapped = model(window, use_cache=False).logits
        model.apply(disable_quantization)
        plain = model(window, use_cache=False).logits
    activations = "input_activations" in group
    check = {"probe_layer": probe}
    evaluated_with = "stored weights"
    if activations:  # W8A8: the activations are quantized in the wrapped forward only
        model.apply(enable_quantization)
        evaluated_with = "wrapped forward (fake-quantized activations)"
    elif candidate["algo"] == "awq":
        freeze_weights(linears)
        evaluated_with = "stored weights (the wrapped forward's rounding written in)"
        with torch.inference_mode():
            frozen = model(window, use_cache=False).logits
        check["frozen_vs_wrapped_forward_max_abs_logit_diff"] = diff = float((frozen - wrapped).abs().max())
        if diff > 1e-4 * float(wrapped.abs().max()):
            raise RuntimeError(f"llm-compressor {candidate['name']}: the weights written back compute other logits "
                               f"than its wrapped forward (max difference {diff:.3g})")
    after = linears[probe].weight.detach()
    distinct = distinct_per_group(after, -1 if activations else args.groupsize)
    if not activations and distinct > 2 ** candidate["bits"]:  # the stored weights are what is evaluated
        raise RuntimeError(f"llm-compressor {candidate['name']}: {probe} holds {distinct} distinct values in a "
                           f"group of {args.groupsize} after quantization, more than {2 ** candidate['bits']}: "
                           "its stored weights are not the quantized ones")
    result = perplexity(model, eval_ids, args.eval_seq_length, args.eval_batch_size, args.max_windows, device)
    model.apply(enable_quantization)
    return {
        **candidate, "group": group, "ignore": ignore, "layout": layout,
        "quantized_linears": sum(getattr(m, "quantization_scheme", None) is not None for m in linears.values()),
        "total_linears": len(linears), "perplexity": result["perplexity"], "nll": result["nll"],
        "eval_tokens": result["tokens"], "eval_windows": result["windows"], "quant_seconds": quant_seconds,
        "evaluated_with": evaluated_with,
        "check": {**check, "weight_changed": bool((after != before).any()), "max_distinct_values_per_group": distinct,
                  "wrapped_vs_plain_forward_max_abs_logit_diff": float((wrapped - plain).abs().max())},
    }


# ------------------------------------------------------------------ main


def default_out(args: argparse.Namespace) -> Path:
    if args.preset == "custom":
        return HERE / f"llmcompressor_{args.bits}_g{args.groupsize}{'_actorder' if args.actorder else ''}.json"
    scheme = "w8a8" if args.algo == "smoothquant" else f"{args.bits}_g{args.groupsize}"
    return HERE / f"compare_{args.algo}_{scheme}_{args.preset}_{args.data}.json"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset == "custom" and (args.algo != "gptq" or args.side == "quantkit"):
        sys.exit("--preset custom runs llm-compressor's GPTQ with the flags given; use --preset defaults or best "
                 "for AWQ, SmoothQuant or the quantkit side")
    out: dict[str, Any] = {"algo": args.algo, "preset": args.preset, "model": args.model, "data": args.data,
                           "bits": 8 if args.algo == "smoothquant" else args.bits,
                           "groupsize": -1 if args.algo == "smoothquant" else args.groupsize,
                           "num_calibrate": args.num_calibrate, "seq_length": args.seq_length, "seed": args.seed,
                           "eval_seq_length": args.eval_seq_length, "max_windows": args.max_windows,
                           "eval_split": eval_split(args.data, args.eval_split)}
    if args.side in ("both", "llmcompressor"):
        import llmcompressor

        path = models.resolve_model_path(args.model)
        _, tokenizer = models.load_model(path, torch.float32, torch.device("cpu"))
        eval_ids = qdata.eval_tokens(tokenizer, args.data, out["eval_split"], args.data_path)
        samples = qdata.calibration_samples(tokenizer, args.data, args.num_calibrate, args.seq_length, args.seed,
                                            args.data_path)  # (n, L) int64, exactly quantkit's windows
        out["llmcompressor_version"] = llmcompressor.__version__
        if args.baseline:
            model, _ = models.load_model(path, torch.float32, torch.device("cpu"))
            out["baseline_perplexity"] = perplexity(model, eval_ids, args.eval_seq_length, args.eval_batch_size,
                                                    args.max_windows, "cpu")["perplexity"]
            del model
        out["llmcompressor"] = []
        for candidate in llmcompressor_candidates(args):
            out["llmcompressor"].append(run_llmcompressor(args, candidate, path, eval_ids, samples))
            print(f"llmcompressor {candidate['name']}: ppl {out['llmcompressor'][-1]['perplexity']:.4f} | "
                  f"quant {out['llmcompressor'][-1]['quant_seconds']:.1f} s")
    if args.side in ("both", "quantkit") and args.preset != "custom":
        with tempfile.TemporaryDirectory(prefix="quantkit-compare-") as tmp:
            out["quantkit"] = run_quantkit(args, Path(args.work_dir or tmp))
    for side in ("llmcompressor", "quantkit"):
        if out.get(side):
            out[f"best_{side}"] = min(out[side], key=lambda r: r["perplexity"])["name"]
    if out.get("llmcompressor") and out.get("quantkit"):
        best = {s: min(r["perplexity"] for r in out[s]) for s in ("llmcompressor", "quantkit")}
        out["quantkit_vs_llmcompressor_pct"] = 100 * (best["quantkit"] / best["llmcompressor"] - 1)
        print(f"{args.preset}: quantkit {best['quantkit']:.4f} vs llm-compressor {best['llmcompressor']:.4f} "
              f"({out['quantkit_vs_llmcompressor_pct']:+.2f}%)")
    dest = Path(args.out) if args.out else default_out(args)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {dest}")
    return out


if __name__ == "__main__":
    main()

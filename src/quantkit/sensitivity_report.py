"""The per-layer part of a sweep report: rules as text, and the sensitivity section and plot.

A sensitivity sweep (``sensitivity.type=null,q,k,...`` or ``sensitivity.blocks=null,0-4,...``)
runs one *probe* per job: one layer type or block range at the probe's scheme, everything else
at the run's. Its *reference* is the job of the same sweep without a probe whose config is
otherwise the same (the ``sensitivity`` node aside); a probe's perplexity increase is
``100 * (ppl / reference ppl - 1)``. Probes with different overrides (``sensitivity.w_dtype=int2,int3``)
share the reference and are drawn as separate bars. Rows are the report's (``quantkit.report.Row``: ``.run``
and ``.values``), read here without importing that module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")  # dataflow order of a Llama block
KINDS = ("layer type", "block range", "layer type in a block range")  # order of the sections and panels
_IGNORED = ("output_dir", "name", "overwrite")  # config keys that do not change what a run computes


def _dtype_text(dtype: dict[str, Any] | None) -> str | None:
    if not dtype:
        return None
    flags = [f for f, on in (("asym", dtype.get("has_zero")), ("unsigned", dtype.get("unsigned"))) if on]
    if dtype.get("symmetric_range"):
        flags.append(str(dtype["symmetric_range"]))
    return " ".join([str(dtype.get("name")), *flags])


def overrides_text(rule: dict[str, Any]) -> str:
    """``w=int8 a=int8 g64``, ``skip``: what a rule (or the probe) sets."""
    parts = [f"{short}={_dtype_text(rule.get(role))}" for role, short in (("w_dtype", "w"), ("a_dtype", "a"))
             if rule.get(role)]
    groupsize = rule.get("groupsize")
    if groupsize is not None:
        parts.append("channel" if groupsize == -1 else f"g{groupsize}")
    if rule.get("skip"):
        parts.append("skip")
    return " ".join(parts)


def rules_text(layers: list[dict[str, Any]] | None) -> str | None:
    """The ``layers`` rules of a run as one cell: ``.*down_proj: w=int8; q_proj: g64``."""
    if not layers:
        return None
    return "; ".join(f"{rule.get('match')}: {overrides_text(rule)}" for rule in layers)


def probe_label(probe: dict[str, Any] | None) -> str | None:
    """``down``, ``blocks 0-4``, ``down in blocks 0-4``; None without a probe."""
    if not probe:
        return None
    kind, blocks = probe.get("type"), probe.get("blocks")
    where = f"blocks {blocks}" if blocks is not None else None
    if kind is not None:
        return kind + (f" in {where}" if where else "")
    return where


def reference_key(config: dict[str, Any] | None) -> str:
    """The config without its ``sensitivity`` node (and keys that do not change results), as
    text: every probe of a sweep and its reference run (no probe) share it."""
    config = {k: v for k, v in (config or {}).items() if k not in (*_IGNORED, "sensitivity")}
    return json.dumps(config, sort_keys=True, default=str)


def _probe(row: Any) -> dict[str, Any]:
    return row.values.get("probe") or {}


def _kind(row: Any) -> str:
    probe = _probe(row)
    if probe.get("type") is not None and probe.get("blocks") is not None:
        return KINDS[2]
    return KINDS[0] if probe.get("type") is not None else KINDS[1]


def _order(row: Any) -> tuple:
    probe = _probe(row)
    kind, blocks = probe.get("type"), probe.get("blocks")
    first = int(str(blocks).split("-")[0]) if blocks is not None else -1
    rank = TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER)
    return first, rank, str(kind)


def _references(rows: list[Any]) -> dict[str, Any]:
    return {r.values["reference_key"]: r for r in rows if not r.values.get("sensitivity") and "reference_key" in r.values}


def increase(row: Any, references: dict[str, Any]) -> float | None:
    """Perplexity increase of a probe over its reference run, in percent (None: no reference)."""
    ref = references.get(row.values.get("reference_key"))
    return None if ref is None else 100 * (row.values["perplexity"] / ref.values["perplexity"] - 1)


def _series(row: Any, references: dict[str, Any]) -> str:
    """Legend of a probe's bar: its reference run's scheme and the probe's."""
    ref = references.get(row.values.get("reference_key"))
    base = f"{row.values['algo']} {ref.values['note'] if ref else row.values['w_dtype']}"
    return f"{base}, probe {overrides_text(_probe(row))}"


def sensitivity_section(rows: list[Any]) -> list[str]:
    """Markdown lines of the sensitivity section (none without probes)."""
    probes = sorted((r for r in rows if r.values.get("sensitivity")), key=lambda r: (KINDS.index(_kind(r)), _order(r)))
    if not probes:
        return []
    refs = _references(rows)
    lines = ["", "## Sensitivity", "",
             "Each probe gives one layer type or block range the probe's scheme while every other linear keeps "
             "the reference run's (the same config without a probe); increase = perplexity over the reference's.",
             "", "| probe | probe scheme | reference | perplexity | reference ppl | increase % | bits_per_weight |",
             "|---|---|---|---|---|---|---|"]
    for r in probes:
        ref = refs.get(r.values["reference_key"])
        up = increase(r, refs)
        ref_ppl = f"{ref.values['perplexity']:.3f}" if ref else ""
        lines.append(f"| {r.values['sensitivity']} | {overrides_text(_probe(r))} | {ref.run if ref else '(none)'} | "
                     f"{r.values['perplexity']:.3f} | {ref_ppl} | {'' if up is None else f'{up:+.1f}'} | "
                     f"{r.values['bits_per_weight']:.3f} |")
    if any(increase(r, refs) is None for r in probes):
        lines += ["", "Probes without a reference run: add `sensitivity.type=null` (or `sensitivity.blocks=null`) "
                      "to the sweep."]
    return lines


def plot_sensitivity(rows: list[Any], path: Path) -> Path | None:
    """Bars of the perplexity increase per probe: a panel per kind (layer type, block range), a
    bar per reference/probe scheme. Probes without a reference show their perplexity instead."""
    probes = [r for r in rows if r.values.get("sensitivity")]
    if not probes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = _references(rows)
    relative = all(increase(r, refs) is not None for r in probes)
    kinds = sorted({_kind(r) for r in probes}, key=KINDS.index)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = sorted((r for r in probes if _kind(r) == kind), key=_order)
        labels = list(dict.fromkeys(r.values["sensitivity"] for r in mine))
        series = sorted({_series(r, refs) for r in mine})
        width = 0.8 / len(series)
        for k, name in enumerate(series):
            xs, ys = [], []
            for r in mine:
                if _series(r, refs) == name:
                    xs.append(labels.index(r.values["sensitivity"]) + (k - (len(series) - 1) / 2) * width)
                    ys.append(increase(r, refs) if relative else r.values["perplexity"])
            ax.bar(xs, ys, width=width, label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 7 else 0)
        ax.set(xlabel=kind, ylabel="perplexity increase (%)" if relative else "perplexity",
               title=f"Sensitivity per {kind}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

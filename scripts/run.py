"""Quantize a model and measure it: ``python scripts/run.py algo=rtn w_dtype=int4``.

A thin Hydra entry: compose ``conf/``, convert it once to typed dataclasses, run, and return
the perplexity so that Hydra sweepers can optimize it. Sweeps: ``python scripts/run.py -m
algo=rtn,gptq w_dtype=int3,int4 algo.groupsize=32,64,128``.

What a rerun into a run dir does: complete results of the same config are reused (a sweep
resumes); complete results of another config are an error naming the differing keys, unless
``overwrite=true``. In a sweep, an invalid combination is skipped with its reason
(``skipped.json``) and a crashing job is recorded as failed (``failed.json``, traceback in its
log); neither stops the sweep, whose report lists them and whose exit status is then non-zero.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from quantkit.config import ConfigError, build_run_config
from quantkit.layers import expand_dtype_names, hydra_dtype
from quantkit.results import (
    FAILED_FILE, RESULTS_FILE, SKIPPED_FILE, StaleResultsError, reusable_results, write_failed, write_skipped,
)
from quantkit.runner import run

log = logging.getLogger("quantkit")

# What to set for a mandatory key that a config group leaves open (``???``).
_REQUIRED = {
    "model.path": "model=hf needs model.path=<local checkpoint dir or hub id>",
    "data.path": "data=text needs data.path=<.txt/.json/.jsonl/.parquet file or dir>",
}


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as a plain dict; an unset mandatory key is a ConfigError naming it.
    A dtype name in a ``layers`` rule or ``sensitivity`` (``w_dtype: int8``) becomes the mapping
    ``w_dtype=int8`` composes to (``conf/w_dtype/int8.yaml``), as results.json then records it."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("missing value for " + "; ".join(
            f"{key} ({_REQUIRED[key]})" if key in _REQUIRED else key for key in missing))
    return expand_dtype_names(OmegaConf.to_container(cfg, resolve=True), hydra_dtype)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    for outcome in (SKIPPED_FILE, FAILED_FILE):  # what an earlier attempt ended with no longer holds
        (out / outcome).unlink(missing_ok=True)
    resolved = None
    try:
        resolved = resolve(cfg)
        done = reusable_results(out, resolved)
        if done is not None:
            log.info("complete results already in %s for this config: reused (perplexity %.3f)", out, done["perplexity"])
            return done["perplexity"]
        run_cfg = build_run_config(resolved)
        if run_cfg.overwrite:
            (out / RESULTS_FILE).unlink(missing_ok=True)
        return run(run_cfg, resolved)["perplexity"]
    except ConfigError as exc:
        if multirun:  # one bad combination must not end the sweep
            log.warning("skipped: %s", exc)
            write_skipped(out, str(exc), resolved)
            return None
        log.error("configuration error: %s", exc)
        raise SystemExit(f"configuration error: {exc}") from None
    except StaleResultsError as exc:
        write_failed(out, exc, resolved)
        log.error("%s", exc)
        if multirun:
            return None
        raise SystemExit(f"error: {exc}") from None
    except Exception as exc:
        write_failed(out, exc, resolved)
        if multirun:  # the other jobs still run and the report lists this one as failed
            log.exception("failed: %s", exc)
            return None
        raise


if __name__ == "__main__":
    main()

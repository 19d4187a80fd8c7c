"""Quantize a model and measure it: ``python scripts/run.py algo=rtn w_dtype=int4``.

A thin Hydra entry: compose ``conf/``, convert it once to typed dataclasses, run, and return
the perplexity so that Hydra sweepers can optimize it. Sweeps: ``python scripts/run.py -m
algo=rtn,gptq w_dtype=int3,int4 algo.groupsize=32,64,128``. A run whose output dir already
holds complete results is not redone; in a sweep, an invalid combination is skipped with its
reason recorded (``skipped.json``) instead of stopping the sweep.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from quantkit.config import ConfigError, build_run_config
from quantkit.results import SKIPPED_FILE, read_results, write_skipped
from quantkit.runner import run

log = logging.getLogger("quantkit")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    done = read_results(Path(resolved["output_dir"]))
    if done is not None:
        log.info("complete results already in %s: skipping (perplexity %.3f)", resolved["output_dir"], done["perplexity"])
        return done["perplexity"]
    (Path(resolved["output_dir"]) / SKIPPED_FILE).unlink(missing_ok=True)  # an earlier skip no longer holds
    try:
        run_cfg = build_run_config(resolved)
        return run(run_cfg, resolved)["perplexity"]
    except ConfigError as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # one bad combination must not end the sweep
            log.warning("skipped: %s", exc)
            write_skipped(Path(resolved["output_dir"]), str(exc), resolved)
            return None
        log.error("configuration error: %s", exc)
        raise SystemExit(f"configuration error: {exc}") from None


if __name__ == "__main__":
    main()

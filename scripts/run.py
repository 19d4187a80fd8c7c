"""Quantize a model and measure it: ``python scripts/run.py algo=rtn w_dtype=int4``.

A thin Hydra entry: compose ``conf/``, convert it once to typed dataclasses, run, and return
the perplexity so that Hydra sweepers can optimize it. Sweeps: ``python scripts/run.py -m
algo=rtn w_dtype=int3,int4 algo.groupsize=32,64,128``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from quantkit.config import ConfigError, build_run_config
from quantkit.runner import run

log = logging.getLogger("quantkit")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        run_cfg = build_run_config(resolved)
        return run(run_cfg, resolved)["perplexity"]
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(f"configuration error: {exc}") from None


if __name__ == "__main__":
    main()

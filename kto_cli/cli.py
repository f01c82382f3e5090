"""Hydra entrypoints. Thin: compose and validate the config, then hand over to the loop.

    kto-train model=tiny loss.beta=0.2 hydra.run.dir=runs/smoke
"""
import ctypes
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import UserError, register_configs, to_run_config


def tune_allocator() -> None:
    """Keep glibc from mmapping and unmapping every large temporary (logits, log-softmax) on each
    step: on CPU that cost 40-50% of a small model's step time in page faults. Linux/glibc only;
    KTO_CLI_MALLOC_TUNING=0 turns it off."""
    if os.environ.get("KTO_CLI_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)


@hydra.main(version_base=None, config_path="pkg://kto_cli.conf", config_name="config")
def _train(cfg: DictConfig) -> None:
    from .train import train  # imported late: torch and transformers load slowly

    try:
        run = to_run_config(cfg)
        train(run, Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        print(f"kto-train: error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base=None, config_path="pkg://kto_cli.conf", config_name="config")
def _precompute(cfg: DictConfig) -> None:
    from .train import precompute

    try:
        precompute(to_run_config(cfg))
    except UserError as e:
        print(f"kto-precompute: error: {e}", file=sys.stderr)
        sys.exit(2)


def train_main() -> None:
    register_configs()
    tune_allocator()
    _train()


def precompute_main() -> None:
    """kto-precompute <the same overrides as kto-train>: fill the reference cache ahead of training."""
    register_configs()
    tune_allocator()
    _precompute()


if __name__ == "__main__":
    train_main()

"""Hydra entrypoints. Thin: compose and validate the config, then hand over to the loop.

    kto-train model=tiny loss.beta=0.2 hydra.run.dir=runs/smoke
"""
import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import UserError, register_configs, to_run_config
from .distributed import env_ranks, strip_launcher_args


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


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; run again to resume
EXIT_DIVERGED = 3  # non-finite losses, gradients or weights: rerunning as is would not help


@hydra.main(version_base=None, config_path="pkg://kto_cli.conf", config_name="config")
def _train(cfg: DictConfig) -> None:
    from .preemption import Preempted, Preemption, mark

    out, main = Path(HydraConfig.get().runtime.output_dir), env_ranks()[0] == 0
    with Preemption():  # from the start: a signal while modules load is kept for the first check
        from .checkpoint import Diverged  # imported late: transformers loads slowly
        from .train import train
        try:
            run = to_run_config(cfg)
            if main:
                mark(out, None)
            train(run, out)
            if env_ranks()[0] > 0 and out.name.startswith("kto-train-rank"):
                shutil.rmtree(out, ignore_errors=True)  # this rank's unused Hydra dir
        except UserError as e:
            print(f"kto-train: error: {e}", file=sys.stderr)
            sys.exit(2)
        except Preempted as e:
            if main:
                mark(out, e)
            print(f"kto-train: {e}", file=sys.stderr)
            sys.exit(EXIT_PREEMPTED)
        except Diverged as e:
            print(f"kto-train: error: {e}", file=sys.stderr)
            sys.exit(EXIT_DIVERGED)


@hydra.main(version_base=None, config_path="pkg://kto_cli.conf", config_name="config")
def _precompute(cfg: DictConfig) -> None:
    from .precompute import precompute

    try:
        precompute(to_run_config(cfg))
    except UserError as e:
        print(f"kto-precompute: error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base=None, config_path="pkg://kto_cli.conf", config_name="config")
def _evaluate(cfg: DictConfig) -> None:
    from .evaluate import evaluate_saved

    try:
        evaluate_saved(to_run_config(cfg), Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        print(f"kto-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


def launcher_argv(argv: list) -> list:
    """The command line Hydra sees: without the deepspeed launcher's --local_rank=N, and, on ranks
    other than 0, without a run dir or log file of their own (rank 0's run dir is used; without
    an explicit hydra.run.dir the others' timestamps could differ)."""
    argv = strip_launcher_args(argv)
    rank = env_ranks()[0]
    if rank > 0:
        argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
        if not any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv):
            argv.append(f"hydra.run.dir={tempfile.gettempdir()}/kto-train-rank{rank}-{os.getpid()}")
    return argv


def train_main() -> None:
    sys.argv = launcher_argv(sys.argv)
    register_configs()
    tune_allocator()
    _train()


def eval_main() -> None:
    """kto-eval eval.model=RUN/final <the run's overrides>: what a saved model answers to the
    held-out prompts, scored by the verifier."""
    register_configs()
    _evaluate()


def precompute_main() -> None:
    """kto-precompute <the same overrides as kto-train>: fill the reference cache ahead of training."""
    sys.argv = launcher_argv(sys.argv)
    register_configs()
    tune_allocator()
    _precompute()


if __name__ == "__main__":
    train_main()

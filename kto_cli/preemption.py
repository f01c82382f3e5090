"""Stopping cleanly on the signals a scheduler sends before a time limit or a preemption."""
import logging
import signal
import threading
from pathlib import Path

from . import distributed as dist

log = logging.getLogger("kto_cli")


class Preempted(Exception):
    """The run stopped early on a signal, after writing a checkpoint to resume from."""

    def __init__(self, step: int, run_dir: Path, signum: int):
        super().__init__(f"stopped on {signal.Signals(signum).name} after step {step}; checkpoint "
                         f"{run_dir / 'checkpoints' / f'step_{step:07d}'}; the same command with "
                         f"trainer.resume=auto and hydra.run.dir={run_dir} continues from it")
        self.step = step


class Preemption:
    """Catches the signal Slurm sends before a time limit or a preemption (SIGUSR1 with sbatch
    --signal=USR1@SECONDS; SIGUSR2 under submitit; SIGTERM at the limit itself): the loop finishes
    its step, writes a checkpoint and stops (Preempted), so a requeued job resumes from it. With
    several processes every rank stops at the same step (the flag is reduced over ranks each step)."""
    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def requested(self) -> bool:
        got = dist.all_max(int(self.signal is not None))
        if got and self.signal is None:
            self.signal = signal.SIGUSR1  # another rank got it
        return bool(got)

    def hand_over(self) -> None:
        """After the checkpoint: a handler that was there before ours (submitit's, which requeues
        the job) gets the signal too."""
        previous = self.previous.get(self.signal)
        if callable(previous):
            previous(self.signal, None)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

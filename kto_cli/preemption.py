"""Stopping cleanly on the signals a scheduler sends before a time limit or a preemption, in any
phase of a job: the handler only notes the signal; the job stops at the next point where what it
has done can be kept (a step's checkpoint, a finished phase), with exit 75 and a marker file that
tells a batch script to requeue it."""
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Optional

from . import distributed as dist
from .files import atomic_write

log = logging.getLogger("kto_cli")

MARKER = "PREEMPTED"  # in the run dir while the run is stopped and resumable (scripts/slurm/*.sbatch)


class Preempted(Exception):
    """The run stopped early on a signal, keeping what a resumed run needs."""

    def __init__(self, when: str, run_dir: Path, signum: int, step: Optional[int] = None):
        super().__init__(f"stopped on {signal.Signals(signum).name} {when}; the same command with "
                         f"trainer.resume=auto and hydra.run.dir={run_dir} continues")
        self.step = step


class Preemption:
    """Catches the signal Slurm sends before a time limit or a preemption (SIGUSR1 with sbatch
    --signal=USR1@SECONDS; SIGUSR2 under submitit; SIGTERM at the limit itself). One instance
    serves the whole job: a nested `with Preemption()` returns the one already installed. With
    several processes every rank stops at the same point (the flag is reduced over ranks)."""
    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
    active: Optional["Preemption"] = None

    def __init__(self):
        self.signal, self.previous, self.depth, self.nested_in = None, {}, 0, None

    def __enter__(self):
        outer = Preemption.active
        if outer is not None and outer is not self:
            self.nested_in = outer
            outer.depth += 1
            return outer
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self.handle)
        self.depth, Preemption.active = 1, self
        return self

    def handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("received %s: stopping at the next point that keeps the work done", signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether any rank got a signal (a collective: every rank asks at the same point)."""
        got = dist.all_max(int(self.signal is not None))
        if got and self.signal is None:
            self.signal = signal.SIGUSR1  # another rank got it
        return bool(got)

    def stop(self, run_dir: Path, when: str, step: Optional[int] = None) -> None:
        """Once what is resumable is kept: the signal to a handler that was there before ours
        (submitit's, which requeues the job), then Preempted."""
        previous = self.previous.get(self.signal)
        if callable(previous):
            previous(self.signal, None)
        raise Preempted(when, run_dir, self.signal, step)

    def check(self, run_dir: Path, when: str) -> None:
        """At a point where nothing more needs keeping: stop if a signal came."""
        if self.requested():
            self.stop(run_dir, when)

    def __exit__(self, *exc):
        if self.nested_in is not None:
            return self.nested_in.__exit__(*exc)
        self.depth -= 1
        if self.depth == 0:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            Preemption.active = None
        return False


def mark(run_dir: Path, stopped: Optional[Preempted]) -> None:
    """The job's marker (rank 0 writes it): written when it stops resumable, removed when it starts
    again. A batch script requeues on it, whatever exit code the launcher reports."""
    path = Path(run_dir) / MARKER
    if stopped is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"stopped": str(stopped), "step": stopped.step}) + "\n"))


def check(run_dir: Path, when: str) -> None:
    """Stop here if a signal came (a no-op outside a job's `with Preemption()`)."""
    if Preemption.active is not None:
        Preemption.active.check(run_dir, when)

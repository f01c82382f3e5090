"""Checkpoints and the final export, each written under a temp name and renamed when complete, so
a crash never leaves a folder that a later resume or user would trust. With several processes every
rank writes its part into the same temp folder; rank 0 renames it once all have finished."""
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import distributed as dist
from .config import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_dir(dest: Path, write) -> Path:
    """Calls write(tmp) on a fresh temp folder beside dest (on every rank), then rank 0 renames it
    to dest. The temp name is the same on every rank: it is one shared folder."""
    tmp = dest.with_name(f"{dest.name}.tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    write(tmp)
    dist.barrier()
    if dist.is_main():
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    dist.barrier()
    return dest


def save_checkpoint(run_dir: Path, step: int, backend, fingerprint: str) -> Path:
    """The backend's state (weights, optimizer, schedule) and the step: the data order depends only
    on the seed and the step, and nothing random happens after set-up, so that is all a resume needs."""
    def write(tmp: Path):
        backend.save(tmp)
        if dist.is_main():
            torch.save({"step": step, "fingerprint": fingerprint, "backend": backend.name, "world": dist.world()},
                       tmp / "trainer_state.pt")
    return atomic_dir(run_dir / "checkpoints" / f"step_{step:07d}", write)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: temp folders of an interrupted save never match STEP_DIR."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*") if (m := STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, backend, fingerprint: str) -> int:
    """Restores the backend's state in place; returns the step the checkpoint ends."""
    if not (path / "trainer_state.pt").is_file():
        raise UserError(f"{path}: not a kto-cli checkpoint (no trainer_state.pt)")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise UserError(f"{path}: checkpoint was written by a run with another model, data or loss config")
    if state.get("backend", "torch") != backend.name:
        raise UserError(f"{path}: checkpoint was written with backend {state.get('backend')}, this run uses "
                        f"{backend.name} (deepspeed=none is torch; zero0-3 are deepspeed)")
    backend.load(path)
    return state["step"]


class Diverged(Exception):
    """Training cannot go on: the loss or gradients are not finite, or the weights are not."""

    def __init__(self, what: str, run_dir: Path):
        last = latest_checkpoint(run_dir)
        where = f"the last checkpoint is {last}" if last else "no checkpoint was written (trainer.save_every=0)"
        super().__init__(f"{what}; stopped, {where}")


def export_final(run_dir: Path, backend, lm, tokenizer) -> Path:
    """final/: a save_pretrained folder (model + tokenizer) that transformers loads as is, from the
    weights gathered on rank 0 (consolidated under ZeRO-3), plus value_head.safetensors for ppo.
    Weights that are not all finite are never exported (Diverged)."""
    state = backend.state_dict()  # a collective under ZeRO-3
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()] if state is not None else []
    if dist.all_max(len(bad)):  # rank 0 alone holds the weights
        raise Diverged(f"the trained weights are not finite ({', '.join(bad[:3]) or 'on rank 0'}): final/ "
                       "not written", run_dir)

    def write(tmp: Path):
        if not dist.is_main():
            return
        weights = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        lm.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        head = {k[len("value_head."):]: v.contiguous() for k, v in state.items() if k.startswith("value_head.")}
        if head:
            save_file(head, str(tmp / "value_head.safetensors"))
    return atomic_dir(run_dir / "final", write)

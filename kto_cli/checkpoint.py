"""Checkpoints and the final export, each written under a temp name and renamed when complete."""
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_dir(dest: Path, write) -> Path:
    """Calls write(tmp) on a fresh temp folder beside dest, then renames it to dest."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, fingerprint: str, value_head=None) -> Path:
    def write(tmp: Path):
        model.save_pretrained(tmp / "model")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "fingerprint": fingerprint, "value_head": value_head.state_dict() if value_head else None},
                   tmp / "trainer_state.pt")
    return atomic_dir(run_dir / "checkpoints" / f"step_{step:07d}", write)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: temp folders of an interrupted save never match STEP_DIR."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*") if (m := STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, fingerprint: str, value_head=None) -> int:
    """Restores weights, optimizer and schedule in place; returns the step the checkpoint ends."""
    from .config import UserError

    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise UserError(f"{path}: checkpoint was written by a run with another model, data or loss config")
    weights = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    model.tie_weights()
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise UserError(f"{path}: checkpoint weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if value_head is not None:
        value_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def export_final(run_dir: Path, model, tokenizer, value_head=None) -> Path:
    """final/: a save_pretrained folder (model + tokenizer) that transformers loads as is (plus
    value_head.safetensors for ppo, which transformers ignores)."""
    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if value_head is not None:
            save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, str(tmp / "value_head.safetensors"))
    return atomic_dir(run_dir / "final", write)

"""Checkpoints and the final export, each written under a temp name and renamed when complete, so
a crash never leaves a folder that a later resume or user would trust. With several processes every
rank writes its part into the same temp folder; rank 0 renames it once all have finished."""
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import distributed as dist
from .models import merge_lora, peft_config
from .config import UserError

log = logging.getLogger("kto_cli")

STEP_DIR = re.compile(r"^step_(\d+)$")
# Settings a resumed run may change: how it logs, evaluates, saves and runs its kernels, not what it trains.
FREE_TO_CHANGE = ("trainer.resume", "trainer.progress", "trainer.log_every", "trainer.save_every",
                  "trainer.eval_every", "trainer.eval_batch_size", "trainer.threads", "trainer.device",
                  "trainer.final_checkpoint", "trainer.max_bad_steps", "trainer.keep_checkpoints",
                  "trainer.micro_batch_size", "trainer.gradient_checkpointing", "trainer.shared_prompt",
                  "trainer.attention_blocks", "trainer.kl_prefix", "trainer.packing", "trainer.pack_length",
                  "model.attn_implementation", "reference.", "eval.",
                  "deepspeed.timeout_s", "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size",
                  "verifier.timeout_s", "online.eval_each_round", "logger.",
                  "dataset.cache", "dataset.cache_dir")


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


def save_checkpoint(run_dir: Path, step: int, backend, identity: dict, keep: int = 0) -> Path:
    """The backend's state (weights, optimizer, schedule), the step and the run's identity (its
    config, a digest of its training data, its processes: what a resume compares). The data order
    depends only on the seed and the step, and nothing random happens after set-up, so that is all
    a resume needs. trainer_state.json is plain JSON: loading it runs no code. With keep, only the
    newest `keep` checkpoints stay, older ones removed once this one is complete."""
    def write(tmp: Path):
        backend.save(tmp)
        if dist.is_main():
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "backend": backend.name, **identity}))
    check_space(run_dir / "checkpoints", backend)
    try:
        path = atomic_dir(run_dir / "checkpoints" / f"step_{step:07d}", write)
    except OSError as e:  # the disk filled up while writing: the temp folder goes, the older checkpoints stay
        if dist.is_main():
            shutil.rmtree(run_dir / "checkpoints" / f"step_{step:07d}.tmp", ignore_errors=True)
        raise UserError(f"{run_dir / 'checkpoints'}: could not write the checkpoint of step {step} "
                        f"({e.strerror or e}); {last_kept(run_dir)}") from None
    if dist.is_main():
        for old in (checkpoints(run_dir)[keep:] if keep else []):
            shutil.rmtree(old, ignore_errors=True)
    return path


def last_kept(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    return f"the last checkpoint is {last}" if last else "no checkpoint was written before"


def check_space(folder: Path, backend) -> None:
    """Stops, before writing, when the disk cannot hold another checkpoint the size of the last one
    (or, for the first, of the weights and Adam's two moments in fp32)."""
    need = 0
    if dist.is_main():
        last = latest_checkpoint(folder.parent)
        need = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) if last else \
            12 * sum(getattr(p, "ds_numel", p.numel()) for p in backend.policy.parameters())
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        need = need if need > free else 0
    need = dist.broadcast(need)
    if need:
        raise UserError(f"{folder}: not enough free space for a checkpoint (about {need / 2**20:.0f} MiB, the size of "
                        f"the last one or of the weights and optimizer state): free some, or keep fewer with "
                        f"trainer.keep_checkpoints; {last_kept(folder.parent)}")


def checkpoints(run_dir: Path) -> list:
    """The complete checkpoints, newest first: temp folders of an interrupted save never match STEP_DIR."""
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*") if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    return next(iter(checkpoints(run_dir)), None)


def read_state(path: Path) -> dict:
    if (path / "trainer_state.json").is_file():
        return json.loads((path / "trainer_state.json").read_text())
    if (path / "trainer_state.pt").is_file():  # written by earlier versions: tensors and plain values only
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    raise UserError(f"{path}: not a kto-cli checkpoint (no trainer_state.json)")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changes(saved: dict, now: dict) -> list:
    """What differs between a checkpoint's identity and this run's, as 'key old -> new' lines."""
    if "config" not in saved:  # an earlier version's checkpoint: its fingerprint of model, data and loss
        return [] if saved.get("fingerprint") == now["fingerprint"] else ["the model, data or loss config"]
    old, new = flat(saved["config"]), flat(now["config"])
    for k in new.keys() - old.keys():  # a setting added since the checkpoint was written: it had its default
        old[k] = schema_default(k, new[k])
    out = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys())
           if old.get(k) != new.get(k) and not k.startswith(FREE_TO_CHANGE)]
    if saved.get("data") != now["data"] and same_form(saved.get("data"), now["data"]):
        out.append("the training examples (the data file's contents)")
    for key, name in (("world", "processes"), ("stage", "ZeRO stage")):
        if saved.get(key) != now[key]:
            out.append(f"{name} {saved.get(key)} -> {now[key]}")
    return out


def same_form(old, new) -> bool:
    """Whether two data digests can be compared: an earlier version hashed the token ids themselves
    into 16 hex digits, without the form prefix of today's (data.DIGEST_FORM), so its checkpoints
    resume uncompared."""
    return not (isinstance(old, str) and re.fullmatch(r"[0-9a-f]{16}", old) and "-" in str(new))


def schema_default(key: str, fallback):
    """The default of a run setting ("model.lora.r" -> 0) as its dataclass declares it, as plain
    config values (fallback when the schema has none there, e.g. inside a loss's own config)."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    from .config import RunConfig
    kind, parts = RunConfig, key.split(".")
    for k, part in enumerate(parts):
        found = {f.name: f for f in dataclasses.fields(kind)}.get(part) if dataclasses.is_dataclass(kind) else None
        if found is None:
            return fallback
        hints = typing.get_type_hints(kind)
        if k == len(parts) - 1:
            if found.default is not dataclasses.MISSING:
                value = found.default
            elif found.default_factory is not dataclasses.MISSING:
                value = found.default_factory()
            else:
                return fallback
            return OmegaConf.to_container(OmegaConf.create({"v": value}), enum_to_str=True)["v"]
        kind = hints[part]
    return fallback


def load_checkpoint(path: Path, backend, identity: dict, force: bool = False) -> int:
    """Restores the backend's state in place; returns the step the checkpoint ends. A checkpoint
    written under other settings (changes()) is one line, unless force."""
    state = read_state(path)
    if state.get("backend", "torch") != backend.name:
        raise UserError(f"{path}: checkpoint was written with backend {state.get('backend')}, this run uses "
                        f"{backend.name} (deepspeed=none is torch; zero0-3 are deepspeed)")
    refuse_changes(path, state, identity, force)
    backend.load(path)
    return state["step"]


def refuse_changes(path: Path, state: dict, identity: dict, force: bool = False) -> None:
    """One line when the checkpoint was written under other settings (a warning with force)."""
    differ = changes(state, identity)
    if differ and not force:
        raise UserError(f"{path}: written under other settings: {'; '.join(differ)}. Resume with the settings "
                        "it was written with, or set trainer.resume_force=true to go on anyway")
    if differ:
        log.warning("%s: resuming under other settings (trainer.resume_force): %s", path, "; ".join(differ))


class Diverged(Exception):
    """Training cannot go on: the loss or gradients are not finite, or the weights are not."""

    def __init__(self, what: str, run_dir: Path):
        super().__init__(f"{what}; stopped, {last_kept(run_dir)}")


def export_final(run_dir: Path, backend, lm, tokenizer, lora=None, base: str = "") -> Path:
    """final/: a save_pretrained folder (model + tokenizer) that transformers loads as is, from the
    weights gathered on rank 0 (consolidated under ZeRO-3), plus value_head.safetensors for ppo.
    With LoRA adapters (lora: their config): the merged model and final/adapter (peft's layout,
    base: the base model's name), or with lora.merge=false the adapter alone in final/.
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
        if lora is not None:
            weights, adapter = merge_lora(weights, lora)
            folder = tmp / "adapter" if lora.merge else tmp
            folder.mkdir(exist_ok=True)
            save_file(adapter, str(folder / "adapter_model.safetensors"))
            peft_config(lora, base).save_pretrained(str(folder))
        if lora is None or lora.merge:
            lm.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        head = {k[len("value_head."):]: v.contiguous() for k, v in state.items() if k.startswith("value_head.")}
        if head:
            save_file(head, str(tmp / "value_head.safetensors"))
    return atomic_dir(run_dir / "final", write)

"""The reference pass: the reference model's completion log-probs for every example and its KL
partner, train and eval, computed once before training.

The reference model is the policy's starting point, so the pass runs on the freshly loaded model
before the first step: training never holds a second model.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import Split
from .logprobs import logps_of

FIELDS = ("train", "train_kl", "eval", "eval_kl")


@dataclass
class ReferenceLogps:
    train: torch.Tensor  # (N_train,)
    train_kl: torch.Tensor  # (N_train,) of the KL sequences (x_i, y_partner(i))
    eval: Optional[torch.Tensor] = None  # (N_eval,)
    eval_kl: Optional[torch.Tensor] = None


def split_sequences(split: Split, indices=None) -> tuple:
    idx = range(len(split)) if indices is None else indices
    return [split.sequence(i) for i in idx], [split.kl_sequence(i) for i in idx]


def reference_pass(model, train: Split, train_indices: list, eval_split: Optional[Split], batch_size: int, pad_id: int,
                   device, autocast, show_progress: bool = True) -> ReferenceLogps:
    """Log-probs of the train examples that training will visit (train_indices; NaN for the rest,
    so a short run on a large dataset pays only for what it uses) and of every eval example."""
    todo = {"train": (train, train_indices)}
    if eval_split is not None:
        todo["eval"] = (eval_split, range(len(eval_split)))
    model.eval()
    out = {}
    with tqdm(total=sum(2 * len(i) for _, i in todo.values()), desc="reference pass", unit="seq",
              disable=not show_progress) as bar:
        for name, (split, indices) in todo.items():
            seqs, kl_seqs = split_sequences(split, indices)
            idx = torch.tensor(list(indices), dtype=torch.long)
            for key, sequences in ((name, seqs), (f"{name}_kl", kl_seqs)):
                out[key] = torch.full((len(split),), float("nan"))
                out[key][idx] = logps_of(model, sequences, batch_size, pad_id, device, autocast, bar)
    return ReferenceLogps(**out)


def save(ref: ReferenceLogps, path: Path, fingerprint: str) -> None:
    """Written under a temp name and renamed, so a crash never leaves a half-written file."""
    tensors = {k: getattr(ref, k).contiguous() for k in FIELDS if getattr(ref, k) is not None}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


def load(path: Path, fingerprint: str, train: Split, eval_split: Optional[Split]) -> Optional[ReferenceLogps]:
    """The saved values if they were made for this model, data and loss config, else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
    ref = ReferenceLogps(**load_file(str(path)))
    if len(ref.train) != len(train) or (eval_split is not None and (ref.eval is None or len(ref.eval) != len(eval_split))):
        return None
    return ref

"""The reference pass: the reference model's completion log-probs for the examples training and
evaluation will use (and, for KTO, their KL partners), computed once before training.

The reference model is the policy's starting point, so the pass runs on the freshly loaded model
before the first step: training never holds a second model.
"""
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import Split
from .logprobs import logps_of


@dataclass
class ReferenceLogps:
    """Per example of each split (NaN where an example is never used)."""
    train: torch.Tensor  # (N_train,) summed over completion tokens
    train_kl: Optional[torch.Tensor] = None  # (N_train,) of the KL sequences (x_i, y_partner(i))
    train_tokens: Optional[torch.Tensor] = None  # (N_train, L) per token, for per-token losses
    eval: Optional[torch.Tensor] = None
    eval_kl: Optional[torch.Tensor] = None
    eval_tokens: Optional[torch.Tensor] = None

    def get(self, split: str, kind: str = "") -> Optional[torch.Tensor]:
        return getattr(self, f"{split}{kind}")


def split_sequences(split: Split, indices, kl: bool = False) -> list:
    return [split.kl_sequence(i) if kl else split.sequence(i) for i in indices]


def reference_pass(model, splits: dict, kl: bool, per_token: bool, batch_size: int, pad_id: int, device,
                   autocast, show_progress: bool = True) -> ReferenceLogps:
    """splits: name ("train"/"eval") -> (Split, indices of the examples that will be used)."""
    model.eval()
    out = {}
    total = sum(len(idx) * (2 if kl else 1) for _, idx in splits.values())
    with tqdm(total=total, desc="reference pass", unit="seq", disable=not show_progress) as bar:
        for name, (split, indices) in splits.items():
            idx = torch.tensor(list(indices), dtype=torch.long)
            seq, tokens = logps_of(model, split_sequences(split, indices), batch_size, pad_id, device, autocast, bar,
                                   per_token=per_token)
            out[name] = torch.full((len(split),), float("nan")).index_copy(0, idx, seq)
            if per_token:
                out[f"{name}_tokens"] = torch.full((len(split), tokens.shape[1]), float("nan")).index_copy(0, idx, tokens)
            if kl:
                kl_seq, _ = logps_of(model, split_sequences(split, indices, kl=True), batch_size, pad_id, device,
                                     autocast, bar)
                out[f"{name}_kl"] = torch.full((len(split),), float("nan")).index_copy(0, idx, kl_seq)
    return ReferenceLogps(**out)


def save(ref: ReferenceLogps, path: Path, fingerprint: str) -> None:
    """Written under a temp name and renamed, so a crash never leaves a half-written file."""
    tensors = {f.name: getattr(ref, f.name).contiguous() for f in fields(ref) if getattr(ref, f.name) is not None}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


def load(path: Path, fingerprint: str) -> Optional[ReferenceLogps]:
    """The saved values if they were made for this model, data and loss config, else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
    return ReferenceLogps(**load_file(str(path)))

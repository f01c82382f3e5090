"""The reference pass: the reference model's completion log-probs for the examples a run will use
(and, for KTO, their KL partners), computed once and, through kto_cli/refcache.py, shared on disk
with every later run that needs the same values.

The reference model is the policy's starting point, so a run that must compute anything does it on
the freshly loaded model before the first step: training never holds a second model.
"""
import contextlib
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed as dist
from . import objectives
from .config import CacheMode, Precision, RunConfig
from .files import atomic_write
from .logprobs import Runner, logps_of
from .models import cache_root, model_key
from .refcache import RefCache, sequence_key

log = logging.getLogger("kto_cli")

PIECE = 2048  # sequences per piece of the reference pass (a scheduler's signal stops it between pieces)
PIECE_SECONDS = 300  # new values are stored at least this often


@dataclass
class ReferenceLogps:
    """Per example of each split (NaN where an example is never used)."""
    train: torch.Tensor  # (N_train,) summed over completion tokens
    train_kl: Optional[torch.Tensor] = None  # (N_train,) of the KL sequences (x_i, y_partner(i))
    train_tokens: Optional[torch.Tensor] = None  # (N_train, L) per token, for per-token losses
    eval: Optional[torch.Tensor] = None
    eval_kl: Optional[torch.Tensor] = None
    eval_tokens: Optional[torch.Tensor] = None

    def seq(self, split: str) -> torch.Tensor:
        """(N,) of the split's examples."""
        return getattr(self, split)

    def kl(self, split: str) -> Optional[torch.Tensor]:
        """(N,) of the split's KL sequences."""
        return getattr(self, f"{split}_kl")

    def tokens(self, split: str) -> Optional[torch.Tensor]:
        """(N, L) per token."""
        return getattr(self, f"{split}_tokens")


def wanted(splits: dict, kl) -> list:
    """(output field, split, example indices, sequences) for everything the pass must deliver.
    kl: the names of the splits whose KL partners it must also deliver."""
    jobs = []
    for name, (split, idx) in splits.items():
        jobs.append((name, split, idx, [split.sequence(i) for i in idx]))
        if name in kl:
            jobs.append((f"{name}_kl", split, idx, [split.kl_sequence(i) for i in idx]))
    return jobs


def reference_pass(get_model: Callable, splits: dict, kl, per_token: bool, cache: Optional[RefCache],
                   run: Runner, show_progress: bool = True, shard: tuple = (0, 1), exchange: bool = False,
                   after_piece: Optional[Callable] = None) -> tuple:
    """splits: name ("train"/"eval") -> (Split, indices of the examples that will be used); kl: the
    names of those whose KL partners are used too.
    Looks every sequence up in the cache by content, computes only the missing ones (this
    process's share of them when shard = (rank, world size)), stores those, and returns
    (ReferenceLogps, and a report). get_model is called only if something must be computed.
    Sharded without exchange (kto-precompute), the other processes' values are theirs to store
    and the ReferenceLogps is None. With exchange (training under torch.distributed), rank 0's
    list of missing values is the one every rank shards, every rank runs as many forward passes
    as the busiest (ZeRO-3 gathers parameters collectively), and the values are exchanged.
    run: how forward passes run (batch size, device, precision, the engine, training's layout).
    after_piece(done, total, save): called on every rank after each piece of the pass (compute());
    save() stores the values not yet stored: where a scheduler's signal stops the job."""
    jobs = wanted(splits, kl)
    keys = [[sequence_key(*s) for s in seqs] for _, _, _, seqs in jobs]
    # one run at a time finds and computes what is missing (sharded precompute processes split the
    # work instead); under torch.distributed rank 0 holds the lock for all ranks, and the others
    # wait with it in short collectives (one long one would time out)
    locking = cache is not None and (exchange or shard[1] == 1)
    if locking and exchange and not dist.is_main():
        while not dist.broadcast(None):  # rank 0: False while it waits, True once it may go on
            pass
    waiting = (lambda waited, holder: dist.broadcast(False) and False) if exchange else None
    with cache.computing(waiting) if locking and dist.is_main() else contextlib.nullcontext():
        if locking and exchange and dist.is_main():
            dist.broadcast(True)
        todo = {}
        for job, job_keys in zip(jobs, keys):
            for k, s in zip(job_keys, job[3]):
                if (cache is None or cache.get(k) is None) and k not in todo:
                    todo[k] = s
        if exchange:
            every = {k: s for job, job_keys in zip(jobs, keys) for k, s in zip(job_keys, job[3])}
            todo = {k: every[k] for k in dist.broadcast(list(todo))}
            if cache is not None and not dist.is_main():
                cache.refresh()  # what rank 0 found stored (it looked under the lock)
        reused = len({k for ks in keys for k in ks}) - len(todo)
        mine = list(todo)[shard[0]::shard[1]] if exchange else share(keys, todo, shard)
        store = (lambda keys, values: store_piece(cache, keys, values, per_token)) if cache is not None else None
        values = compute(get_model, [todo[k] for k in mine], mine, per_token, run, show_progress, lockstep=exchange,
                         store=store, after_piece=after_piece)
        if exchange:  # every rank has stored its share once this returns
            values = {k: v for part in dist.gather(values) for k, v in part.items()}
    report = {"reused": reused, "computed": len(todo) if exchange else len(mine),
              "damaged_shards": cache.corrupt if cache else 0}
    if shard[1] > 1 and not exchange:
        return None, report
    lookup = (lambda k: values[k] if k in values else cache.get(k))
    return assemble(jobs, keys, lookup, per_token), report


def share(keys: list, todo: dict, shard: tuple) -> list:
    """The missing keys that are this process's to compute: its stride of every wanted key, so the
    split does not depend on what the cache held when each process looked (a process starting after
    another has stored its share would otherwise stride a shorter list and skip values)."""
    every = list(dict.fromkeys(k for ks in keys for k in ks))
    return [k for k in every[shard[0]::shard[1]] if k in todo]


def store_piece(cache: RefCache, keys: list, values: dict, per_token: bool) -> None:
    path = cache.put(keys, torch.tensor([values[k][0] for k in keys]), [values[k][1] for k in keys] if per_token else None)
    if path:
        log.info("reference cache: stored %d values in %s", len(keys), path)


def compute(get_model, sequences: list, keys: list, per_token: bool, run: Runner, show_progress: bool,
            lockstep: bool = False, store: Optional[Callable] = None, after_piece: Optional[Callable] = None) -> dict:
    """key -> (summed log-prob, per-token log-probs or None) for sequences, on the reference model,
    in pieces of PIECE sequences: store(keys, values) keeps what is new every PIECE_SECONDS and at
    the end; after_piece(done, total, save) may store the rest (save()) and stop the job (a signal:
    a requeued one finds those values in the cache). lockstep: every rank joins the same number of
    pieces and forward passes, padding with one-token ones."""
    total = dist.all_max(len(sequences)) if lockstep else len(sequences)
    if not total:
        return {}
    model = get_model()
    model.eval()
    values, new, stored_at = {}, [], time.monotonic()

    def save():
        nonlocal new, stored_at
        if store and new:
            store(new, values)
        new, stored_at = [], time.monotonic()
    with tqdm(total=len(sequences), desc="reference pass", unit="seq", disable=not show_progress) as bar:
        for start in range(0, total, PIECE):
            part, part_keys, stats = sequences[start:start + PIECE], keys[start:start + PIECE], {"forwards": 0}
            if part:
                seq, tokens, lengths = logps_of(model, part, run, per_token, progress=bar, stats=stats)
                values.update({k: (float(seq[i]), tokens[i, : lengths[i]].clone() if per_token else None)
                               for i, k in enumerate(part_keys)})
                new += part_keys
            if lockstep:
                for _ in range(dist.all_max(stats["forwards"]) - stats["forwards"]):
                    logps_of(model, [([run.pad_id], [run.pad_id])], run, per_token)
            end = start + PIECE >= total
            if end or time.monotonic() - stored_at >= PIECE_SECONDS:
                save()
            if after_piece and not end:
                after_piece(start + PIECE, total, save)
    return values


def assemble(jobs: list, keys: list, lookup: Callable, per_token: bool) -> ReferenceLogps:
    out = {}
    for (name, split, idx, seqs), job_keys in zip(jobs, keys):
        rows = torch.tensor(list(idx), dtype=torch.long)
        found = [lookup(k) for k in job_keys]
        out[name] = torch.full((len(split),), float("nan")).index_copy(0, rows, torch.tensor([f[0] for f in found]))
        if per_token and not name.endswith("_kl"):
            width = max((len(c) for _, c in seqs), default=0)
            tokens = torch.full((len(split), width), float("nan"))
            for r, f in zip(idx, found):
                t = torch.as_tensor(f[1], dtype=torch.float32)
                tokens[r] = 0.0  # past the scored tokens: 0, as the policy's per-token log-probs
                tokens[r, : len(t)] = t
            out[f"{name}_tokens"] = tokens
    return ReferenceLogps(**out)


def save(ref: ReferenceLogps, path: Path, fingerprint: str) -> None:
    """Written under a temp name and renamed, so a crash never leaves a half-written file."""
    tensors = {f.name: getattr(ref, f.name).contiguous() for f in fields(ref) if getattr(ref, f.name) is not None}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint}))


def load(path: Path, fingerprint: str) -> Optional[ReferenceLogps]:
    """The saved values if they were made for this model, data and loss config, else None."""
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
    return ReferenceLogps(**load_file(str(path)))


def open_cache(cfg: RunConfig, tokenizer) -> Optional[RefCache]:
    """The shared reference cache for this model and precision (None with reference.cache=off)."""
    r = cfg.reference
    if r.cache == CacheMode.off:
        return None
    root = Path(r.cache_dir) if r.cache_dir else cache_root() / "reference"
    key = model_key(cfg.model, len(tokenizer), precision_tag(cfg))
    return RefCache(root, key, objectives.objective_class(cfg.loss).needs.per_token,
                    writable=r.cache == CacheMode.readwrite, lock_wait=r.lock_wait)


def precision_tag(cfg: RunConfig) -> str:
    """How the reference values were computed: bf16 autocast over fp32 weights (plain PyTorch) and
    bf16 weights (DeepSpeed) give different numbers."""
    p = cfg.trainer.precision.value
    return f"{p}-weights" if cfg.deepspeed.stage is not None and cfg.trainer.precision == Precision.bf16 else p

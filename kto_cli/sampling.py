"""Which units each optimizer step trains on: a stream of seeded per-epoch orders that depends only
on the seed, so a resumed run (or another number of ranks) sees the same batches.
"""
import functools
import math

import numpy as np
import torch

from .config import RunConfig


def total_steps(cfg: RunConfig, n_train: int) -> int:
    t = cfg.trainer
    return t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * n_train / t.batch_size))


def batch_indices(step: int, n: int, batch_size: int, seed: int, order=None) -> list:
    """The units of an optimizer step: a stream of per-epoch orders (order(n, seed, epoch), a seeded
    shuffle by default) that depends only on the seed, so a resumed run sees the same batches."""
    order = order or epoch_permutation
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(int(order(n, seed, epoch)[k]))
    return out


def visited_indices(steps: int, n: int, batch_size: int, seed: int, order=None) -> list:
    """Every unit some step of the run will use, sorted."""
    if steps * batch_size >= n:
        return list(range(n))
    return sorted(set(map(int, (order or epoch_permutation)(n, seed, 0)[: steps * batch_size])))


def data_order(n: int, seed: int, epoch: int) -> range:
    """trainer.shuffle=false: every epoch in data order (a range: indexing it costs nothing)."""
    return range(n)


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """(n,) a seeded order of the units (an array: a list of a million Python ints costs 36 MB)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


def length_grouped(lengths: list, batch_size: int, span: int = 64):
    """An epoch order in which each batch holds units of similar length (less padding): the seeded
    shuffle is cut into blocks of span batches, each block sorted by length and cut into batches,
    and the batches shuffled again, so long batches do not all come last."""
    @functools.lru_cache(maxsize=4)
    def order(n: int, seed: int, epoch: int) -> list:
        perm = epoch_permutation(n, seed, epoch)
        block = batch_size * span
        batches = []
        for start in range(0, n, block):
            chunk = sorted(perm[start:start + block].tolist(), key=lambda i: lengths[i])
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
    return order

"""A content-addressed disk cache of reference log-probs, shared by every run that can use it.

    <cache_dir>/<model key>/<seq|tok>/<content hash>.safetensors

The model key covers what the numbers depend on besides the sequence: the weights (hashes of the
model's weight and config files, memoised by path, size and mtime, so a start does not re-read
gigabytes), the precision, and the library versions. Each entry is keyed by a hash of its token
ids (prompt and completion after chat template and truncation), so the tokenizer, the template,
the truncation settings and the KL pairing are covered by content, and a look-up never depends on
batch order, batch size or world size.

Shards are written under a temp name and renamed to the hash of their content: two processes
writing the same values produce the same name and leave one valid file. Each shard carries a
checksum of its tensors; a shard that fails it (truncated, corrupted) is set aside and its values
are recomputed. A start reads only each shard's keys; a shard's values are read (and checked) the
first time a run looks one of them up, so values of other data for the same model cost nothing. The cache is an optimisation: an error reading or writing it (a full disk, a
read-only or vanished folder) is one warning, and the run goes on with the values in memory.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .files import atomic_write

log = logging.getLogger("kto_cli")

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json")
WAIT_LINE_S = 60  # a line this often while waiting for another run's lock
USED = ".last-used"  # touched when a run opens a model's values: `kto-cache prune --older-than` reads it


def sequence_key(prompt: list, completion: list) -> bytes:
    """16 bytes identifying a (prompt ids, completion ids) pair."""
    ids = np.asarray(list(prompt) + [-1] + list(completion), dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


def file_digest(path: Path, memo: dict) -> str:
    st = path.stat()
    stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if stamp not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        memo[stamp] = h.hexdigest()
    return memo[stamp]


def folder_digest(folder: Path, memo_path: Path) -> str:
    """Hash of a model folder's weight and config files; each file is read once per (size, mtime)."""
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_digest(p, memo)}\n".encode())
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo_path, lambda tmp: tmp.write_text(json.dumps(memo)))
    except OSError as e:  # the next start hashes the files again
        warn_io("could not keep the file hashes", memo_path, e)
    return h.hexdigest()


def warn_io(what: str, where: Path, e: Exception) -> None:
    log.warning("reference cache: %s in %s (%s); going on without", what, where, getattr(e, "strerror", None) or e)


def _tensor_checksum(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


class RefCache:
    """Reference log-probs of one model (and precision), per token or per sequence."""

    def __init__(self, root: Path, model_key: str, per_token: bool, writable: bool, lock_wait: Optional[float] = None):
        self.dir = Path(root) / model_key / ("tok" if per_token else "seq")
        self.per_token, self.writable, self.lock_wait = per_token, writable, lock_wait
        self.entries = {}  # key bytes -> (seq value, per-token array or None), of the shards read
        self.where = {}  # key bytes -> the shard holding it, for every shard listed
        self.corrupt = 0
        self.read = set()  # shard names already listed
        self.refresh()
        if self.writable and self.dir.is_dir():
            try:
                (self.dir / USED).touch()
            except OSError:
                pass

    def refresh(self) -> None:
        """Reads the shards stored since the last look (by another run of a sweep, say)."""
        try:
            shards = sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []
        except OSError as e:
            return warn_io("could not list the stored values", self.dir, e)
        for shard in shards:
            if shard.name not in self.read:
                self._list(shard)

    def _list(self, shard: Path) -> None:
        """Notes which keys a shard holds (its keys tensor alone is read)."""
        self.read.add(shard.name)
        try:
            with safe_open(str(shard), "np") as f:
                keys = f.get_tensor("keys")
        except FileNotFoundError:  # set aside (or pruned) by another run since this one listed it
            return
        except Exception as e:
            return self._set_aside(shard, e)
        for k in keys:
            self.where.setdefault(k.tobytes(), shard)

    def _set_aside(self, shard: Path, e: Exception) -> None:
        """A damaged shard: never trusted, its values recomputed."""
        self.corrupt += 1
        log.warning("reference cache: %s is damaged (%s); set aside, its values will be recomputed",
                    shard, str(e).splitlines()[0] if str(e) else type(e).__name__)
        self.where = {k: s for k, s in self.where.items() if s != shard}
        try:
            os.replace(shard, shard.with_name(f"{shard.name}.corrupt-{os.getpid()}"))
        except OSError:  # another run set it aside first, or the folder is read-only
            pass

    def load_all(self) -> None:
        """Reads and checks every listed shard (kto-cache verify)."""
        for shard in sorted(set(self.where.values())):
            self._read(shard)

    @contextlib.contextmanager
    def computing(self, wait=None):
        """Held while a run finds the missing values, computes and stores them: runs of a sweep
        started together wait here, then find the first one's values instead of computing them
        again. An exclusive flock on a file beside the shards (released if the holder dies), which
        names its holder. wait(seconds waited, holder) -> bool is called about once a second while
        another run holds it (under torch.distributed: a collective, so every rank waits with
        rank 0); it returns whether to stop waiting. Past lock_wait seconds the run computes the
        values itself (the same values, under the same names: safe)."""
        if not self.writable:
            yield
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            f = open(self.dir / ".computing.lock", "a+b", buffering=0)
        except OSError as e:
            warn_io("could not take the lock", self.dir, e)
            self.writable = False
            yield
            return
        with f:
            held = self._acquire(f, wait)
            try:
                self.refresh()
                yield
            finally:
                if held:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _acquire(self, f, wait) -> bool:
        """Waits for the lock (see computing); whether this run holds it."""
        started, said = time.monotonic(), 0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            waited = time.monotonic() - started
            f.seek(0)
            holder = f.read().decode(errors="replace").strip() or "another run"
            if waited >= WAIT_LINE_S * (said + 1):
                said += 1
                wait_for = f"{waited / 60:.0f} min" if waited >= 60 else f"{waited:.0f} s"
                log.info("reference cache: waiting %s for %s, which is computing values for this model (%s)",
                         wait_for, holder, self.dir)
            if (wait(waited, holder) if wait else False) or (self.lock_wait is not None and waited >= self.lock_wait):
                log.warning("reference cache: stopped waiting for %s after %.0f s (reference.lock_wait); "
                            "computing the values here", holder, waited)
                return False
            time.sleep(1.0)
        try:  # who holds it, for the runs that wait (best effort: a full disk leaves it unnamed)
            f.seek(0), f.truncate()
            f.write(f"{socket.gethostname()}:{os.getpid()} (job {os.environ.get('SLURM_JOB_ID', 'none')})\n".encode())
        except OSError:
            pass
        return True

    def _read(self, shard: Path) -> None:
        """Loads a shard's values after checking its checksum."""
        try:
            arrays = load_file(str(shard))
            with safe_open(str(shard), "np") as f:
                checksum = (f.metadata() or {}).get("checksum")
            if checksum != _tensor_checksum(arrays):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:  # set aside (or pruned) by another run since this one listed it
            self.where = {k: s for k, s in self.where.items() if s != shard}
            return
        except Exception as e:  # truncated or corrupted
            return self._set_aside(shard, e)
        keys, seq = arrays["keys"], arrays["seq"]
        offsets = arrays.get("offsets")
        for i in range(len(seq)):
            tokens = arrays["tokens"][offsets[i]:offsets[i + 1]] if offsets is not None else None
            self.entries[keys[i].tobytes()] = (float(seq[i]), tokens)

    def get(self, key: bytes):
        if key not in self.entries and key in self.where:
            self._read(self.where[key])
        return self.entries.get(key)

    def put(self, keys: list, seq: torch.Tensor, tokens: Optional[list] = None) -> Optional[Path]:
        """Stores new values as one shard named by its content; returns its path (None where they
        could not be stored: this run keeps them in memory)."""
        if not self.writable or not keys:
            return None
        arrays = {"keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16).copy(),
                  "seq": seq.numpy().astype(np.float32)}
        if self.per_token:
            arrays["offsets"] = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)
            arrays["tokens"] = np.concatenate([t.numpy() for t in tokens]).astype(np.float32)
        checksum = _tensor_checksum(arrays)
        path = self.dir / f"{checksum[:32]}.safetensors"
        for i, k in enumerate(keys):
            self.entries[k] = (float(arrays["seq"][i]), tokens[i].numpy() if self.per_token else None)
            self.where.setdefault(k, path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # same content, same name: concurrent writers leave one valid file
            atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata={"checksum": checksum}))
        except (OSError, SafetensorError) as e:
            warn_io(f"could not store {len(keys)} values", self.dir, e)
            return None
        self.read.add(path.name)
        return path

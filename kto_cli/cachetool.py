"""kto-cache: what kto-cli's on-disk cache holds, checking it, and keeping it small.

    kto-cache du                        # size of the reference values by model key, and converted models
    kto-cache verify                    # checksum every reference shard; damaged ones are set aside
    kto-cache prune                     # remove temp files of dead writes and set-aside damaged shards
    kto-cache prune --older-than 30     # ... and the reference values of models (and tokenised data) no run used for 30 days
    kto-cache du --dir /shared/kto-cache/reference   # another cache (default: $KTO_CLI_CACHE or ~/.cache/kto-cli)
"""
import argparse
import fcntl
import shutil
import sys
import time
from pathlib import Path

from .models import cache_root
from .refcache import RefCache, USED

STALE_TEMP_S = 3600  # a temp file this old belongs to a write that died (a live one renames it in seconds)


def reference_root(where: Path) -> Path:
    """The folder holding <model key>/<seq|tok>/ shards: where itself, or its reference/ subfolder."""
    return where / "reference" if (where / "reference").is_dir() else where


def key_dirs(root: Path) -> list:
    """(model key, seq|tok folder) of every stored set of reference values."""
    return [(d.parent.name, d) for d in sorted(root.glob("*/*")) if d.is_dir() and d.name in ("seq", "tok")]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def last_used(folder: Path) -> float:
    """When a run last read this model's values (its USED stamp), else its newest file."""
    stamp = folder / USED
    if stamp.exists():
        return stamp.stat().st_mtime
    return max((f.stat().st_mtime for f in folder.iterdir()), default=folder.stat().st_mtime)


def du(where: Path) -> list:
    root = reference_root(where)
    lines = [f"{'model key / kind':<34}{'shards':>8}{'MiB':>10}  last used"]
    for key, d in key_dirs(root):
        shards = list(d.glob("*.safetensors"))
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(last_used(d)))
        lines.append(f"{key + '/' + d.name:<34}{len(shards):>8}{size(d) / 2**20:>10.1f}  {used}")
    temp, damaged = list(root.rglob("*.tmp-*")), list(root.rglob("*.corrupt-*"))
    lines.append(f"temp files: {len(temp)}, set-aside damaged shards: {len(damaged)} (kto-cache prune removes them)")
    data = [f for f in (where / "data").glob("*") if f.suffix in (".arrow", ".json", ".npy")]
    if data:
        lines.append(f"tokenised data: {sum(f.suffix == '.arrow' for f in data)} source(s), "
                     f"{sum(f.suffix == '.npy' for f in data)} KL-partner file(s), {sum(map(size, data)) / 2**20:.1f} MiB")
    if (where / "arrow").is_dir():
        lines.append(f"Arrow copies of Parquet files: {size(where / 'arrow') / 2**20:.1f} MiB")
    models = where / "models"
    if models.is_dir():
        for m in sorted(p for p in models.iterdir() if p.is_dir()):
            lines.append(f"converted model {m.name}: {size(m) / 2**20:.1f} MiB")
    return lines


def verify(where: Path) -> list:
    lines = []
    for key, d in key_dirs(reference_root(where)):
        cache = RefCache(d.parent.parent, key, d.name == "tok", writable=True)
        cache.load_all()  # reads and checks every shard
        lines.append(f"{key}/{d.name}: {len(cache.entries)} values, {cache.corrupt} damaged shard(s) set aside")
    return lines or ["no reference values stored"]


def busy(folder: Path) -> bool:
    """Whether a run holds this model's lock (computing values) now."""
    lock = folder / ".computing.lock"
    if not lock.exists():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def prune(where: Path, older_than_days=None, dry_run: bool = False) -> list:
    root, now, gone = reference_root(where), time.time(), []
    data = where / "data"
    for f in list(root.rglob("*.tmp-*")) + list(root.rglob("*.corrupt-*")) + list(data.glob("*.tmp-*")):
        if ".corrupt-" in f.name or now - f.stat().st_mtime > STALE_TEMP_S:
            gone.append(f)
    if older_than_days is not None:
        for _, d in key_dirs(root):
            if now - last_used(d) > older_than_days * 86400 and not busy(d):
                gone.append(d)
        # a run touches the tokenised files it maps (tables.open_table)
        old = [f for f in data.glob("*") if f.suffix in (".arrow", ".npy")
               and now - f.stat().st_mtime > older_than_days * 86400]
        gone += old + [f.with_suffix(".json") for f in old if f.with_suffix(".json").exists()]
    freed = sum(size(p) for p in gone)
    for p in gone if not dry_run else []:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    verb = "would remove" if dry_run else "removed"
    return [f"{verb} {p}" for p in gone] + [f"{verb} {len(gone)} item(s), {freed / 2**20:.1f} MiB"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kto-cache", description="kto-cli's on-disk cache: size, check, prune")
    p.add_argument("command", choices=["du", "verify", "prune"])
    p.add_argument("--dir", type=Path, help="the cache (default: $KTO_CLI_CACHE or ~/.cache/kto-cli)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="prune: also the values of models unused this long")
    p.add_argument("--dry-run", action="store_true", help="prune: list what would go")
    a = p.parse_args(argv)
    where = a.dir or cache_root()
    if not where.is_dir():
        raise SystemExit(f"kto-cache: error: {where} is not a folder")
    out = {"du": lambda: du(where), "verify": lambda: verify(where),
           "prune": lambda: prune(where, a.older_than, a.dry_run)}[a.command]()
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()

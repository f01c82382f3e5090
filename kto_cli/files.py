"""Files later trusted are written whole or not at all."""
import contextlib
import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Calls write(tmp) for a temp name beside path, then renames tmp to path (atomic on one file
    system): a crash never leaves a half-written file under `path` that a later run would trust,
    and two processes writing the same content leave one valid file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written temp file is left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: Path) -> list:
    """The records of a JSON-lines log, in order; [] when there is no file yet. A last line still
    being written (a run logging right now) is left out."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records

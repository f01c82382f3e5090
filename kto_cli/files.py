"""Files later trusted are written whole or not at all."""
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Calls write(tmp) for a temp name beside path, then renames tmp to path (atomic on one file
    system): a crash never leaves a half-written file under `path` that a later run would trust,
    and two processes writing the same content leave one valid file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    return path

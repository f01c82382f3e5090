"""Shared fixtures: composing configs from the shipped tree, tiny data files, a tiny tokenizer."""
import json
import random
import socket
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from kto_cli.config import register_configs, to_run_config

register_configs()


# What every in-process or launched tiny run starts from: the 2-layer random Llama, no progress bars.
# without the default job's recipe (SFT phase, on-policy data): tests ask for the phases they test
TINY_RUN = ("model=tiny", "trainer.progress=false", "recipe=none")


def make_config(*overrides: str):
    """The run config `kto-train OVERRIDES` would get, as dataclasses."""
    with initialize_config_module("kto_cli.conf", version_base=None):
        return to_run_config(compose("config", overrides=list(overrides)))


def free_port(lo: int = 0, hi: int = 0) -> int:
    """A TCP port nothing listens on now (in [lo, hi) when given), for a launcher's rendezvous:
    fixed ports collide when two test runs share a machine."""
    for port in ([0] if not lo else random.sample(range(lo, hi), min(64, hi - lo))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test gets an empty kto-cli cache (reference log-probs, converted models)."""
    monkeypatch.setenv("KTO_CLI_CACHE", str(tmp_path / "kto-cli-cache"))
    return tmp_path / "kto-cli-cache"


@pytest.fixture(scope="session")
def tiny_tok():
    from kto_cli.models import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, read_only=False) -> a tmpfs of that many bytes (a real full or read-only disk);
    skipped where this machine does not let the test mount one (not root, no CAP_SYS_ADMIN)."""
    mounts = []

    def mount(size: int, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})")
        mounts.append(where)
        return where
    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def boolean_mask_added(model, packed, layout):
    """The old mistake: the boolean mask handed to eager attention, which adds it (+0 / +1)."""
    from kto_cli.attention import dense_mask
    return {"attention_mask": dense_mask(packed["segment"], packed["branch"]).float(),
            "position_ids": packed["position_ids"]}

"""Shared fixtures: composing configs from the shipped tree, tiny data files, a tiny tokenizer."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from kto_cli.config import register_configs, to_run_config

register_configs()


def make_config(*overrides: str):
    """The run config `kto-train OVERRIDES` would get, as dataclasses."""
    with initialize_config_module("kto_cli.conf", version_base=None):
        return to_run_config(compose("config", overrides=list(overrides)))


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

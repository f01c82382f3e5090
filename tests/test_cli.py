"""The installed command: a smoke run, one-line errors, and a non-editable install run from elsewhere."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["model=tiny", "trainer.max_steps=2", "trainer.progress=false", "recipe=none", "dataset.max_train_rows=8",
         "dataset.max_eval_rows=4"]

pytestmark = pytest.mark.subprocess


def kto_train(args, cwd, exe=None, env=None):
    if exe is None:
        beside = Path(sys.executable).parent / "kto-train"
        exe = str(beside) if beside.exists() else shutil.which("kto-train")
    assert exe, "kto-train is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_run_writes_its_run_dir(tmp_path):
    out = kto_train([*SMOKE, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json", "reference_logps.safetensors"):
        assert (run / name).exists(), name
    assert "held-out metric" in out.stdout


@pytest.mark.parametrize("args, words", [
    (["loss.beta=abc"], "loss.beta=abc"),
    (["model=tiny", "dataset.train={bad}"], "BAD.jsonl: row 2: field 'label': expected true or false"),
    (["model=pythia1b"], "could not load 'EleutherAI/pythia-1b'"),
    (["model=tiny", "trainer.batch_size=6", "trainer.micro_batch_size=4"], "not a multiple"),
])
def test_user_errors_are_one_clear_line(tmp_path, args, words):
    bad = tmp_path / "BAD.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "b", "label": "yes"}\n')
    args = [a.format(bad=bad) for a in args]
    out = kto_train([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode != 0
    assert words in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_wheel_install_runs_from_another_directory(tmp_path):
    """A regular (non-editable) install, so the config tree must come from inside the package."""
    target, source = tmp_path / "site", tmp_path / "source"  # a copy: no stale build/ of the checkout is reused
    for name in ("kto_cli", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    env = {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import kto_cli; print(kto_cli.__file__)"], cwd=tmp_path,
                           env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = kto_train([*SMOKE, f"hydra.run.dir={work / 'run'}"], cwd=work, exe=str(target / "bin" / "kto-train"), env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (work / "run" / "final" / "model.safetensors").is_file()

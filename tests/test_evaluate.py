"""Evaluation by generation: the Wilson interval, pass@n, and kto-eval on a saved model giving the
answers the run itself gave at its end."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kto_cli.evaluate import read_samples, summarise, wilson

from conftest import TINY_RUN, make_config


def test_wilson_interval():
    """8 of 10: p = 0.8, z = 1.96 -> [0.4902, 0.9433] (the textbook values). 0 of 64: the upper end is
    (z^2/2n + z sqrt(z^2/4n^2)) / (1 + z^2/n) = (z^2/n) / (1 + z^2/n) = 0.060025 / 1.060025 = 0.056626."""
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson(0, 64)
    assert low == 0.0 and high == pytest.approx(0.056626, abs=1e-6)


def test_pass_at_n_counts_prompts_with_any_passing_sample():
    records = [{"score": s, "tokens": 3} for s in (0, 1, 0, 0, 0.5, 0)]  # 3 prompts x 2 samples
    out = summarise(records, prompts=3, n=2)
    assert out["gen/pass@2"] == pytest.approx(2 / 3) and out["gen/score"] == pytest.approx(1.5 / 6)


@pytest.mark.subprocess
def test_kto_eval_on_final_gives_the_runs_last_answers(tmp_path):
    from kto_cli.train import train
    common = [*TINY_RUN, "dataset.max_train_rows=8", "dataset.max_eval_rows=8", "eval.generation.max_new_tokens=6"]
    summary = train(make_config(*common, "trainer.max_steps=3", "trainer.lr=1e-3"), tmp_path / "run")
    exe = Path(sys.executable).parent / "kto-eval"
    out = subprocess.run([str(exe) if exe.exists() else shutil.which("kto-eval"), *common,
                          f"eval.model={tmp_path / 'run' / 'final'}", f"hydra.run.dir={tmp_path / 'eval'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kto-eval:" in out.stdout and "gen/score" in out.stdout
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["gen/score"] == summary["eval_after"]["gen/score"]
    run_last = [s["completion"] for s in read_samples(tmp_path / "run" / "samples.jsonl") if s["step"] == 3]
    assert [s["completion"] for s in read_samples(tmp_path / "eval" / "samples.jsonl")] == run_last
    missing = subprocess.run([str(exe) if exe.exists() else shutil.which("kto-eval"), *TINY_RUN, "dataset.eval=null",
                              f"hydra.run.dir={tmp_path / 'none'}"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "needs held-out prompts" in missing.stderr

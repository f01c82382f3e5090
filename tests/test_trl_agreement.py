"""With the same model, examples and batches, our KTO arithmetic (completion log-probs with the LM
head on completion positions only, kto_loss, AdamW) gives TRL KTOTrainer's losses and rewards.
Skipped where TRL is not installed (it is a benchmark-only dependency)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench_vs_trl.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_steps_match_trl(tmp_path):
    bench = load_bench()
    ours = bench.run_bare("tiny", 3, tmp_path / "bare")
    trl = bench.run_trl("tiny", 3, tmp_path / "trl", precompute=True)
    for a, b in zip(ours["first_steps"], trl["first_steps"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    assert len(ours["first_steps"]) == len(trl["first_steps"]) == 3

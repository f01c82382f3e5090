"""With the same model, examples, batches and KL pairs, our KTO arithmetic (completion log-probs
with the LM head on completion positions only, kto_reference_point, kto_loss, AdamW) gives TRL
KTOTrainer's losses, KL estimates and rewards. Three desirable examples to one undesirable and a
high learning rate move the policy towards the desirable completions after step 1, so steps 2 and 3
have KL > 0 (it is clamped at 0 and step 1 has policy == reference: loss 0.5, KL 0). Skipped where TRL is not installed (a benchmark-only dependency)."""
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
    mostly_desirable = ("dataset.undesirable_fraction=0.25",)
    ours = bench.run_bare("tiny", 3, tmp_path / "bare", lr=2e-3, trl_kl=True, overrides=mostly_desirable)
    trl = bench.run_trl("tiny", 3, tmp_path / "trl", precompute=True, lr=2e-3, overrides=mostly_desirable)
    assert len(ours["first_steps"]) == len(trl["first_steps"]) == 3
    assert ours["first_steps"][0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert all(step["kl"] > 1.0 for step in ours["first_steps"][1:])
    for a, b in zip(ours["first_steps"], trl["first_steps"]):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):  # rewards/*: None in a one-sided batch
            assert (a[key] is None) == (b[key] is None), key
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), key

"""kto-train, run through its own Trainer, gives TRL KTOTrainer's first steps: losses, KL estimates
and rewards, with KL > 0. Both see the same model, examples, batches (trainer.shuffle=false: data
order, as TRL's sequential sampler) and KL pairs (dataset.kl_partners=rotate: TRL's rotation
within each per-device batch). Three desirable examples to one undesirable and a high learning rate
move the policy after step 1 (loss 0.5, KL 0: policy == reference), so steps 2 and 3 have KL > 0."""
import importlib.util
from pathlib import Path

import pytest

from kto_cli.metrics import read_metrics
from kto_cli.train import train

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench_vs_trl.py"
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_steps_match_trl_through_the_trainer(tmp_path):
    bench = load_bench()
    mostly_desirable = ("dataset.undesirable_fraction=0.25",)
    cfg = bench.compose("tiny", 3, tmp_path, lr=2e-3,
                        overrides=(*mostly_desirable, "trainer.shuffle=false", "dataset.kl_partners=rotate"))
    train(cfg, tmp_path / "ours")
    ours = [{k: r.get(k) for k in KEYS} for r in read_metrics(tmp_path / "ours", "train")]
    trl = bench.run_trl("tiny", 3, tmp_path / "trl", precompute=True, lr=2e-3, overrides=mostly_desirable)["first_steps"]
    assert len(ours) == len(trl) == 3
    assert ours[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert all(step["kl"] > 1.0 for step in ours[1:])
    for step, (a, b) in enumerate(zip(ours, trl), start=1):
        for key in KEYS:  # rewards/*: absent from a one-sided batch
            assert (a[key] is None) == (b[key] is None), (step, key)
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), (step, key, a[key], b[key])

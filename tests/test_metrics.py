"""Metric sums over micro-batches, metrics.jsonl written and read back."""
import json

import pytest
import torch

from kto_cli.metrics import MetricSums, MetricsLog, read_metrics


def test_sums_are_per_value_means_with_margins():
    """Two micro-batches: rewards/chosen values 1, 2 then 3 average to 2 (not (1.5 + 3) / 2)."""
    sums = MetricSums()
    sums.add({"rewards/chosen": torch.tensor([1.0, 2.0]), "rewards/rejected": torch.tensor([0.5])})
    sums.add({"rewards/chosen": torch.tensor([3.0]), "rewards/rejected": torch.tensor([])})
    out = sums.means()
    assert out["rewards/chosen"] == pytest.approx(2.0) and out["rewards/margins"] == pytest.approx(1.5)


def test_read_metrics_by_split_and_while_being_written(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(0, "eval", {"loss": 0.5})
    log.write(1, "train", {"loss": 0.4, "kl": 0.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "train/loss": 0.3})[:9])  # a line cut mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    train = read_metrics(tmp_path, "train")
    assert len(train) == 1 and train[0]["loss"] == 0.4 and train[0]["kl"] == 0.0 and train[0]["step"] == 1
    assert MetricsLog.first_in(tmp_path / "metrics.jsonl", "eval") == {"loss": 0.5}
    assert read_metrics(tmp_path / "nothing-here") == []


def test_resumed_log_drops_steps_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(step, "train", {"loss": step})
    log.close()
    MetricsLog(tmp_path / "metrics.jsonl", resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

"""Trackers beside metrics.jsonl (logger=...): what TensorBoard, MLflow and W&B (offline) were given,
read back with their own readers, equals metrics.jsonl; a resumed run continues the same MLflow
run; a tracker that cannot start is one line before any model loads."""
import json

import pytest

from kto_cli.config import UserError
from kto_cli.metrics import read_metrics

from conftest import TINY_RUN, make_config

TINY = [*TINY_RUN, "dataset.max_train_rows=8", "dataset.max_eval_rows=4", "trainer.batch_size=4",
        "trainer.micro_batch_size=4", "eval.generation.max_new_tokens=4", "trainer.max_steps=3"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.slow
def test_every_tracker_holds_what_metrics_jsonl_holds(tmp_path, offline):
    for name in ("tensorboard", "mlflow", "wandb"):
        pytest.importorskip(name)
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kto_cli.train import train
    run = tmp_path / "run"
    overrides = [*TINY, "logger.tensorboard=true", "logger.mlflow=true", "logger.wandb=true",
                 f"logger.mlflow_uri={offline}", "logger.project=kto-test"]
    train(make_config(*overrides), run)
    logged = {}  # metrics.jsonl as (name -> [(step, value)])
    for record in read_metrics(run):
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                logged.setdefault(k, []).append((record["step"], pytest.approx(v, rel=1e-6)))
    assert {"train/loss", "eval/kl/raw", "eval/gen/score"} <= set(logged)

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert set(board.Tags()["scalars"]) == set(logged)
    for k, want in logged.items():
        assert [(e.step, e.value) for e in board.Scalars(k)] == want, k

    ids = json.loads((run / "trackers.json").read_text())
    client = mlflow.tracking.MlflowClient(offline)
    for k, want in logged.items():
        assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], k)] == want, k
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED" and mlrun.data.params["loss.beta"] == "0.1"

    records = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()  # W&B's own record file
    assert ids["wandb"].encode() in records and b"train/loss" in records and b"loss.beta" in records

    train(make_config(*overrides, "trainer.resume=auto"), run)  # resumes at the end: evaluates, exports
    experiment = client.get_experiment_by_name("kto-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ids["mlflow"]]


def test_a_tracker_that_cannot_start_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    """W&B online without an API key (a fresh HOME: no ~/.netrc), a library that is not installed."""
    pytest.importorskip("wandb")
    from kto_cli import train as train_mod
    monkeypatch.setattr(train_mod.Trainer, "load_model", lambda self: pytest.fail("the model loaded"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match=r"^logger=wandb: no W&B API key \(wandb login, or WANDB_API_KEY\); "
                                        r"WANDB_MODE=offline logs without"):
        train_mod.train(make_config(*TINY, "logger=wandb"), tmp_path / "a")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"^logger=tensorboard: the tensorboard library is not installed: "
                                        r"pip install tensorboard$"):
        train_mod.train(make_config(*TINY, "logger=[jsonl,tensorboard]"), tmp_path / "b")

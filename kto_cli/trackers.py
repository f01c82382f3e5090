"""Experiment trackers beside metrics.jsonl (which stays the source of truth): TensorBoard, MLflow
and Weights & Biases, each through its library's own API, on rank 0. They get metrics.jsonl's
metric names and steps, and the resolved config as hyperparameters; a resumed run continues the
same MLflow / W&B run (its id is kept in RUN/trackers.json)."""
import json
import logging
import os
from pathlib import Path

from .checkpoint import flat
from .config import LoggerConfig, UserError
from .files import atomic_write

log = logging.getLogger("kto_cli")

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def hyperparameters(config: dict) -> dict:
    """{"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}; values a tracker cannot take become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat(config).items()}


def start(name: str, kind, run_dir: Path, cfg: LoggerConfig, config: dict, ids: dict):
    """A tracker, or one line naming it when its library is missing or it cannot start."""
    import importlib.util
    if importlib.util.find_spec(name) is None:
        raise UserError(f"logger={name}: the {name} library is not installed: pip install {PACKAGES[name]}")
    try:
        return kind(run_dir, cfg, config, ids)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"logger={name}: could not start: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, ids: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, ids: dict):
        import mlflow
        uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        if uri.startswith("file:"):  # MLflow 3 keeps its file store (which cannot hold both kl and kl/raw) behind this
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.project)
        self.mlflow, self.run = mlflow, mlflow.start_run(run_id=ids.get("mlflow"), run_name=run_dir.name)
        if "mlflow" not in ids:
            mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})  # MLflow's limit on a value
        ids["mlflow"] = self.run.info.run_id

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, ids: dict):
        import netrc

        import wandb
        try:
            known = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            known = False
        if os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun") and not known \
                and not os.environ.get("WANDB_API_KEY"):  # else wandb asks for a key, or fails, mid-run
            raise UserError("logger=wandb: no W&B API key (wandb login, or WANDB_API_KEY); WANDB_MODE=offline "
                            "logs without a network or an account")
        self.run = wandb.init(project=cfg.project, name=run_dir.name, dir=str(run_dir), config=config,
                              id=ids.get("wandb"), resume="allow")
        ids["wandb"] = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers cfg asks for (none: every call is a no-op), started at set-up, before any model
    loads, so one that cannot start is one line then."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict):
        kinds = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
        path = Path(run_dir) / "trackers.json"
        ids = json.loads(path.read_text()) if path.is_file() else {}
        self.trackers = []
        try:
            for name, kind in kinds.items():
                if getattr(cfg, name):
                    self.trackers.append(start(name, kind, Path(run_dir), cfg, hyperparameters(config), ids))
        except UserError:
            self.close()  # the ones that started
            raise
        if self.trackers:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(ids)))

    def log(self, step: int, split: str, metrics: dict) -> None:
        """To every tracker; one that fails (a server gone) is a warning and is dropped: training
        goes on, and metrics.jsonl has every value."""
        values = {f"{split}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for t in list(self.trackers):
            try:
                t.log(step, values)
            except Exception as e:
                log.warning("logger: %s failed at step %d (%s); logging to it stops, metrics.jsonl goes on",
                            type(t).__name__, step, str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.trackers.remove(t)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []

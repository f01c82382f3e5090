"""kto-experiment: arms of training runs, each tuned on a validation split, compared on held-out
questions over seeds, and claims judged from the seeds' paired differences.

    kto-experiment paper_claims                                   # the KTO paper's claims (README)
    kto-experiment paper_claims --out runs/pc model=qwen2_5_1_5b   # every run gets the overrides
    kto-experiment my_spec.yaml --seeds 0,1

A spec (kto_cli/experiments/*.yaml) names the seeds, the overrides of every run, those that score a
model for tuning (validation), and the arms: an override list, a grid of values to choose from, and
the arm whose model (of the same seed) it starts from. An arm tries every grid point at the first
seed, keeps the one with the best validation score (ties: the first listed) and runs it at the
others; an arm without a grid is not scored on validation. Runs live in OUT/ARM/POINT/seedS, each a kto-train run dir; one with a summary.json is read,
not run again, so a stopped experiment resumes where it stopped. Writes OUT/report.{md,json,png}.
"""
import argparse
import gc
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import yaml

from .config import UserError
from .files import atomic_write

log = logging.getLogger("kto_cli")
SPECS = Path(__file__).resolve().parent / "experiments"
TESTS = ("better", "at_least", "close")


@dataclass
class Arm:
    name: str
    overrides: list = field(default_factory=list)
    grid: dict = field(default_factory=dict)  # override key -> the values to choose from
    start: Optional[str] = None  # the arm whose model (same seed) this one trains from; None: the model as loaded
    train: bool = True  # false: the starting model is evaluated as it is

    def points(self) -> list:
        """Every combination of the grid's values, as {key: value}, in the order listed ([{}]: no grid)."""
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]


@dataclass
class Spec:
    path: Path
    seeds: list
    overrides: list
    validation: list
    margin: float
    arms: dict  # name -> Arm, in run order
    claims: list  # {claim, a, b, test}


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "default"


def spec_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return SPECS / f"{name}.yaml"


def load_spec(name: str) -> Spec:
    """The spec file, checked: each mistake is one line naming the file and the key."""
    path = spec_path(name)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPECS.glob("*.yaml")))
        raise UserError(f"{name}: no such experiment file (shipped: {shipped})")
    raw = yaml.safe_load(path.read_text()) or {}

    def want(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise UserError(f"{path}: {key}: {what}")
    unknown = set(raw) - {"seeds", "overrides", "validation", "margin", "arms", "claims"}
    want(not unknown, ", ".join(sorted(unknown)), "unknown key")
    seeds = raw.get("seeds", [0])
    want(isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds), "seeds", "a list of integers")
    for key in ("overrides", "validation"):
        want(isinstance(raw.get(key, []), list), key, "a list of overrides")
    want(isinstance(raw.get("arms"), dict) and raw["arms"], "arms", "a mapping of arm names to arms")
    arms = {}
    for arm_name, body in raw["arms"].items():
        arms[arm_name] = parse_arm(arm_name, body or {}, arms, lambda ok, k, w: want(ok, f"arms.{arm_name}.{k}", w))
    claims = raw.get("claims", [])
    for i, c in enumerate(claims):
        want(isinstance(c, dict) and {"claim", "a", "b", "test"} <= set(c), f"claims[{i}]", "needs claim, a, b, test")
        want(c["a"] in arms and c["b"] in arms, f"claims[{i}]", f"arms {c['a']!r} and {c['b']!r} must both exist")
        want(c["test"] in TESTS, f"claims[{i}].test", f"one of {', '.join(TESTS)}")
    return Spec(path, seeds, list(raw.get("overrides", [])), list(raw.get("validation", [])),
                float(raw.get("margin", 0.05)), arms, claims)


def parse_arm(name: str, body: dict, earlier: dict, want) -> Arm:
    unknown = set(body) - {"overrides", "grid", "start", "train"}
    want(not unknown, ", ".join(sorted(unknown)), "unknown key")
    grid = body.get("grid", {})
    want(isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values()), "grid",
         "a mapping of override keys to non-empty lists of values")
    start = body.get("start")
    want(start is None or start in earlier, "start", "must name an arm listed before it")
    want(start is None or earlier[start].train, "start", f"arm {start!r} trains nothing to start from")
    want(isinstance(body.get("overrides", []), list), "overrides", "a list of overrides")
    return Arm(name, list(body.get("overrides", [])), grid, start, bool(body.get("train", True)))


def compose(overrides: list):
    """The RunConfig kto-train would get from these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    from .config import register_configs, to_run_config
    register_configs()
    try:
        with initialize_config_module("kto_cli.conf", version_base=None):
            return to_run_config(hydra_compose("config", overrides=list(overrides)))
    except HydraException as e:
        raise UserError(f"{' '.join(overrides)}: {e}".splitlines()[0]) from None


class Experiment:
    """Runs a spec's arms in order in `out`, each run in its own dir, then writes the report."""

    def __init__(self, spec: Spec, out: Path, extra: list, keep_models: bool = False):
        self.spec, self.out, self.extra, self.keep_models = spec, out, list(extra), keep_models
        self.starts = {a.start for a in spec.arms.values() if a.start}  # arms whose models others need

    def overrides(self, arm: Arm, point: dict, seed: int, validation: bool = False) -> list:
        return [*self.spec.overrides, *arm.overrides, *(f"{k}={v}" for k, v in point.items()),
                *(self.spec.validation if validation else []), *self.extra, f"seed={seed}"]

    def run_dir(self, arm: Arm, point: dict, seed: int) -> Path:
        return self.out / arm.name / point_name(point) / f"seed{seed}"

    def check(self) -> None:
        """Composes every run's config (and its validation one) before anything trains: a wrong
        override fails here, naming it."""
        for arm in self.spec.arms.values():
            for point in arm.points():
                compose(self.overrides(arm, point, self.spec.seeds[0]))
            compose(self.overrides(arm, arm.points()[0], self.spec.seeds[0], validation=True))

    def run(self) -> dict:
        self.check()
        started = time.perf_counter()
        for arm in self.spec.arms.values():
            self.run_arm(arm)
        log.info("experiment: all runs done in %.0f s (this invocation)", time.perf_counter() - started)
        from .experiment_report import write_report
        return write_report(self)

    def run_arm(self, arm: Arm) -> None:
        first, rest = self.spec.seeds[0], self.spec.seeds[1:]
        if not arm.train:  # greedy answers of an untrained model do not depend on the seed
            self.evaluate(arm, {}, first, "heldout")
            self.evaluate(arm, {}, first, "validation")
            return
        for point in arm.points():
            self.train_run(arm, point, first)
            if len(arm.points()) > 1:  # a choice to make
                self.evaluate(arm, point, first, "validation")
            if arm.name not in self.starts and not self.keep_models:
                shutil.rmtree(self.run_dir(arm, point, first) / "final", ignore_errors=True)
        best = self.chosen(arm)
        for seed in rest:
            self.train_run(arm, best, seed)
            if arm.name not in self.starts and not self.keep_models:
                shutil.rmtree(self.run_dir(arm, best, seed) / "final", ignore_errors=True)

    def chosen(self, arm: Arm) -> dict:
        """The grid point with the best validation score at the first seed (the first listed on a tie)."""
        points = arm.points()
        scores = [self.validation_score(arm, p) for p in points]
        return points[max(range(len(points)), key=lambda i: (scores[i] if scores[i] is not None else -1, -i))]

    def validation_score(self, arm: Arm, point: dict) -> Optional[float]:
        path = self.run_dir(arm, point, self.spec.seeds[0]) / "validation" / "eval.json"
        return json.loads(path.read_text())["gen/score"] if path.is_file() else None

    def start_model(self, arm: Arm, seed: int) -> Optional[Path]:
        """The final/ folder of the run (this seed, chosen grid point) that `arm` starts from."""
        if not arm.start:
            return None
        start = self.spec.arms[arm.start]
        folder = self.run_dir(start, self.chosen(start), seed) / "final"
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: arm {arm.name} starts from this model, which is missing "
                            f"(delete {folder.parent} to train it again)")
        return folder

    def config(self, arm: Arm, point: dict, seed: int, validation: bool = False):
        from .train import from_model
        cfg = compose(self.overrides(arm, point, seed, validation))
        return from_model(cfg, self.start_model(arm, seed)) if arm.start and not validation else cfg

    def recorded(self, arm: Arm, point: dict, seed: int) -> list:
        """The run's overrides as a kto-train command line would give them, its start model included."""
        folder = self.start_model(arm, seed)
        model = ["model.source=hf", f"model.name_or_path={folder}", "model.gguf_file=null"] if folder else []
        return self.overrides(arm, point, seed) + model

    def train_run(self, arm: Arm, point: dict, seed: int) -> None:
        """One kto-train run in its dir (read back if it finished before); checkpoints are dropped
        after, as nothing resumes a finished run."""
        from .train import train
        run_dir = self.run_dir(arm, point, seed)
        if (run_dir / "summary.json").is_file():
            return
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
        cfg = self.config(arm, point, seed)
        record_overrides(run_dir, self.recorded(arm, point, seed))
        log.info("experiment: %s %s seed %d: training in %s", arm.name, point_name(point), seed, run_dir)
        with run_log(run_dir / "kto-train.log"):
            train(cfg, run_dir)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        gc.collect()

    def evaluate(self, arm: Arm, point: dict, seed: int, split: str) -> None:
        """kto-eval of the run's final model (or, for an arm that trains nothing, its starting model)
        on the held-out or the validation questions, into RUN/<split>/eval.json."""
        from .evaluate import evaluate_saved
        run_dir = self.run_dir(arm, point, seed)
        where = run_dir / split
        if (where / "eval.json").is_file():
            return
        cfg = self.config(arm, point, seed, validation=split == "validation")
        model = run_dir / "final" if arm.train else self.start_model(arm, seed)
        if model:
            cfg = replace(cfg, eval=replace(cfg.eval, model=str(model)))
        if not arm.train:
            record_overrides(run_dir, self.recorded(arm, point, seed))
        started = time.perf_counter()
        with run_log(where / "kto-eval.log"):
            metrics = evaluate_saved(cfg, where)
        atomic_write(where / "eval.json", lambda tmp: tmp.write_text(json.dumps(
            {**metrics, "seconds": time.perf_counter() - started}, indent=2)))
        gc.collect()


def record_overrides(run_dir: Path, overrides: list) -> None:
    """As Hydra keeps them (RUN/.hydra/overrides.yaml), for kto-sweep-report."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


class run_log:
    """Copies the kto_cli log to a run's own file while it runs."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(self.handler)

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kto-experiment", description="arms x grid x seeds, tuned on validation, "
                                "compared on held-out questions")
    p.add_argument("spec", help="a shipped experiment (paper_claims) or a spec .yaml file")
    p.add_argument("overrides", nargs="*", help="kto-train overrides for every run, e.g. model=tiny")
    p.add_argument("--out", type=Path, help="where the runs and the report go (default: experiments/SPEC)")
    p.add_argument("--seeds", help="comma-separated seeds instead of the spec's")
    p.add_argument("--keep-models", action="store_true", help="keep every run's final/ (default: only start models)")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from .cli import tune_allocator
    tune_allocator()
    try:
        spec = load_spec(a.spec)
        if a.seeds:
            if not all(s.strip().lstrip("-").isdigit() for s in a.seeds.split(",")):
                raise UserError(f"--seeds {a.seeds}: comma-separated integers")
            spec.seeds = [int(s) for s in a.seeds.split(",")]
        out = a.out or Path("experiments") / spec.path.stem
        result = Experiment(spec, out, a.overrides, a.keep_models).run()
    except UserError as e:
        print(f"kto-experiment: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(result["md"].read_text())
    print(f"\nwrote {result['md']}, {result['json']}, {result['png']}")


if __name__ == "__main__":
    main()

"""kto-sweep-report: one table and one plot for a sweep's run dirs.

    kto-train -m model=tiny loss.beta=0.05,0.1,0.5 loss.desirable_weight=1,1.33
    kto-sweep-report multirun/2026-11-28/10-00-00        # sweep.csv, sweep.md, sweep.png in that dir

A point is any folder under the sweep dir holding a kto-train config.yaml; its swept values come from
Hydra's .hydra/overrides.yaml. It works during a sweep too: unfinished points report their latest
held-out evaluation and the steps done so far.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml

from .metrics import read_metrics

# held-out metrics in the table and the plot, in this order
METRICS = ("rewards/accuracies", "logps/accuracies", "rewards/margins", "loss")
HIGHER_IS_BETTER = {"rewards/accuracies": True, "logps/accuracies": True, "rewards/margins": True, "loss": False}


def read_point(run_dir: Path) -> dict:
    """Overrides and results of one run dir (missing files leave fields empty)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    swept = dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o and not o.startswith("hydra"))
    evals = read_metrics(run_dir, "eval")
    steps = max((r["step"] for r in read_metrics(run_dir, "train")), default=0)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    point = {"run": run_dir.name, "swept": swept, "status": "done" if summary else "running", "steps": steps,
             "wall_s": summary["wall_seconds"] if summary else None}
    last = evals[-1] if evals else {}
    for m in METRICS:
        point[f"final {m}"] = last.get(m)
        values = [r[m] for r in evals if m in r]
        point[f"best {m}"] = (max if HIGHER_IS_BETTER[m] else min)(values) if values else None
    return point


def find_points(sweep_dir: Path) -> list:
    dirs = sorted({p.parent for p in sweep_dir.rglob("config.yaml") if ".hydra" not in p.parts},
                  key=lambda d: (len(d.parts), int(d.name) if d.name.isdigit() else math.inf, str(d)))
    return [read_point(d) for d in dirs]


def columns(points: list) -> tuple:
    """(the overrides that differ between points, the result columns)."""
    keys = sorted({k for p in points for k in p["swept"]})
    if len(points) > 1:  # overrides every point shares (model=..., trainer.resume=auto) are not swept
        keys = [k for k in keys if len({p["swept"].get(k) for p in points}) > 1]
    results = ["status", "steps"] + [f"{w} {m}" for m in METRICS for w in ("final", "best")] + ["wall_s"]
    return keys, results


def fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_tables(points: list, out: Path) -> tuple:
    keys, results = columns(points)
    header = ["run", *keys, *results]
    rows = [[p["run"], *(p["swept"].get(k, "") for k in keys), *(fmt(p[r]) for r in results)] for p in points]
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def as_number(v: str):
    try:
        return float(v)
    except ValueError:
        return None


def write_plot(points: list, out: Path) -> Path:
    """Each final metric against the first swept key, one line per value of the other swept keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, _ = columns(points)
    x_key = next((k for k in keys if all(as_number(p["swept"].get(k, "x")) is not None for p in points)),
                 keys[0] if keys else None)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS):
        series = {}
        for p in points:
            label = ", ".join(f"{k}={p['swept'][k]}" for k in keys if k != x_key and k in p["swept"]) or "all"
            x = p["swept"].get(x_key, p["run"]) if x_key else p["run"]
            series.setdefault(label, []).append((as_number(x) if as_number(x) is not None else x, p[f"final {metric}"]))
        for label, xy in series.items():
            xy = sorted((x, y) for x, y in xy if y is not None)
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=label)
        ax.set_title(f"held-out {metric}")
        ax.set_xlabel(x_key or "run")
        if x_key and all(isinstance(as_number(p["swept"].get(x_key, "")), float) and as_number(p["swept"][x_key]) > 0
                         for p in points) and len({p["swept"][x_key] for p in points}) > 2:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if len(series) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(sweep_dir: Path, out: Path = None) -> dict:
    out = out or sweep_dir
    points = find_points(sweep_dir)
    if not points:
        raise SystemExit(f"kto-sweep-report: error: no kto-train run dirs (config.yaml) under {sweep_dir}")
    csv_path, md_path = write_tables(points, out)
    png = write_plot(points, out)
    return {"points": points, "csv": csv_path, "md": md_path, "png": png}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kto-sweep-report", description="table and plot of a sweep's runs")
    p.add_argument("sweep_dir", type=Path, help="the multirun dir (hydra.sweep.dir), or any folder of run dirs")
    p.add_argument("--out", type=Path, help="where to write sweep.csv/.md/.png (default: the sweep dir)")
    a = p.parse_args(argv)
    if not a.sweep_dir.is_dir():
        raise SystemExit(f"kto-sweep-report: error: {a.sweep_dir} is not a folder")
    r = report(a.sweep_dir, a.out)
    sys.stdout.write(r["md"].read_text())
    print(f"\nwrote {r['csv']}, {r['md']}, {r['png']}")


if __name__ == "__main__":
    main()

"""kto-sweep-report: one table and one plot for a sweep's run dirs.

    kto-train -m model=tiny loss.beta=0.05,0.1,0.5 loss.desirable_weight=1,1.33
    kto-sweep-report multirun/2026-11-28/10-00-00        # sweep.csv, sweep.md, sweep.png in that dir

A point is any folder under the sweep dir holding a kto-train config.yaml; its swept values come from
Hydra's .hydra/overrides.yaml. It works during a sweep too: unfinished points report their latest
held-out evaluation and the steps done so far. Where points differ in their seed (`seed=0,1,2` in
the sweep), sweep_seeds.csv/.md hold each setting's mean over seeds with its 95% interval, and the
plot shows those.
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
METRICS = ("gen/score", "rewards/accuracies", "logps/accuracies", "rewards/margins", "loss")
HIGHER_IS_BETTER = {"gen/score": True, "rewards/accuracies": True, "logps/accuracies": True, "rewards/margins": True,
                    "loss": False}
SEED_KEYS = ("seed", "trainer.seed")


# two-sided 95% quantiles of Student's t by degrees of freedom; beyond 10, 1.96 + 2.5/df is within 0.002
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_interval(values: list) -> tuple:
    """(mean, low, high): the mean of independent runs' values (seeds) with its 95% t interval;
    the interval is NaN for fewer than two values."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96 + 2.5 / (n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


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
    if "seeds" in points[0]:  # seed groups: each final metric's mean and interval
        return keys, ["seeds"] + [f"{w} {m}" for m in METRICS for w in ("final", "low", "high")]
    results = ["status", "steps"] + [f"{w} {m}" for m in METRICS for w in ("final", "best")] + ["wall_s"]
    return keys, results


def seed_groups(points: list) -> list:
    """Points that differ only in their seed, as one point each: the mean over seeds of each final
    metric ("final M") with its 95% t interval ("low M", "high M")."""
    groups = {}
    for p in points:
        rest = tuple(sorted((k, v) for k, v in p["swept"].items() if k not in SEED_KEYS))
        groups.setdefault(rest, []).append(p)
    out = []
    for rest, members in groups.items():
        g = {"run": "+".join(m["run"] for m in members), "swept": dict(rest), "seeds": len(members)}
        for m in METRICS:
            values = [p[f"final {m}"] for p in members if p[f"final {m}"] is not None]
            g[f"final {m}"], g[f"low {m}"], g[f"high {m}"] = mean_interval(values) if values else (None,) * 3
        out.append(g)
    return out


def seeded(points: list) -> bool:
    return any(len({p["swept"].get(k) for p in points}) > 1 for k in SEED_KEYS)


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_tables(points: list, out: Path, stem: str = "sweep") -> tuple:
    keys, results = columns(points)
    header = ["run", *keys, *results]
    rows = [[p["run"], *(p["swept"].get(k, "") for k in keys), *(fmt(p[r]) for r in results)] for p in points]
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
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
    """Each final metric against the first swept key, one line per value of the other swept keys
    (seed groups: the means, with their intervals as error bars)."""
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
            x = as_number(x) if as_number(x) is not None else x
            series.setdefault(label, []).append((x, p[f"final {metric}"], p.get(f"low {metric}"), p.get(f"high {metric}")))
        for label, xy in series.items():
            xy = sorted((v for v in xy if v[1] is not None), key=lambda v: v[0])
            if not xy:
                continue
            ys = [v[1] for v in xy]
            err = [[y - (lo if lo is not None and not math.isnan(lo) else y) for _, y, lo, _ in xy],
                   [(hi if hi is not None and not math.isnan(hi) else y) - y for _, y, _, hi in xy]]
            ax.errorbar([v[0] for v in xy], ys, yerr=err, marker="o", capsize=3, label=label)
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
    groups = seed_groups(points) if seeded(points) else None
    seeds_md = write_tables(groups, out, "sweep_seeds")[1] if groups else None
    png = write_plot(groups or points, out)
    return {"points": points, "groups": groups, "csv": csv_path, "md": md_path, "seeds_md": seeds_md, "png": png}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="kto-sweep-report", description="table and plot of a sweep's runs")
    p.add_argument("sweep_dir", type=Path, help="the multirun dir (hydra.sweep.dir), or any folder of run dirs")
    p.add_argument("--out", type=Path, help="where to write sweep.csv/.md/.png (default: the sweep dir)")
    a = p.parse_args(argv)
    if not a.sweep_dir.is_dir():
        raise SystemExit(f"kto-sweep-report: error: {a.sweep_dir} is not a folder")
    r = report(a.sweep_dir, a.out)
    sys.stdout.write(r["md"].read_text())
    if r["seeds_md"]:
        sys.stdout.write("\nover seeds (mean, 95% interval):\n" + r["seeds_md"].read_text())
    print(f"\nwrote {r['csv']}, {r['md']}, {r['seeds_md'] or ''}, {r['png']}".replace(", ,", ","))


if __name__ == "__main__":
    main()

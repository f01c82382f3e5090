"""kto-experiment's report: per arm, the validation score of each grid point and the one kept, the
held-out score over seeds (mean, 95% t interval, each seed), the implicit-reward accuracy, the
time spent; per claim, the seeds' paired difference and a verdict. report.md, .json and .png.
"""
import json
import math
from pathlib import Path

from .files import atomic_write
from .metrics import read_metrics
from .report import mean_interval

VERDICT_RULES = {  # the 95% interval of the seeds' mean difference (a - b), against the margin m
    "better": "holds when it lies above 0, does not hold when it lies at or below 0",
    "at_least": "holds when it lies above -m, does not hold when it lies below -m",
    "close": "holds when it lies within [-m, m], does not hold when it lies outside",
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_results(exp, arm, point: dict, seed: int) -> dict:
    """Held-out metrics and seconds of one run (an untrained arm's: its kto-eval at the first seed)."""
    run_dir = exp.run_dir(arm, point, seed if arm.train else exp.spec.seeds[0])
    if not arm.train:
        held = read_json(run_dir / "heldout" / "eval.json")
        return {"score": held.get("gen/score"), "seconds": held.get("seconds", 0.0) if seed == exp.spec.seeds[0] else 0}
    summary = read_json(run_dir / "summary.json")
    after = summary.get("eval_after", {})
    curve = [(r["step"], r["gen/score"]) for r in read_metrics(run_dir, "eval") if "gen/score" in r] if summary else []
    return {"score": after.get("gen/score"), "rewards_acc": after.get("rewards/accuracies"),
            "logps_acc": after.get("logps/accuracies"), "seconds": summary.get("wall_seconds", 0.0), "curve": curve}


def mean_curve(seeds: dict) -> list:
    """(step, mean held-out score over the seeds that evaluated at it, how many) at each step evaluated."""
    at = {}
    for r in seeds.values():
        for step, score in r.get("curve", []):
            at.setdefault(step, []).append(score)
    return [(step, sum(v) / len(v), len(v)) for step, v in sorted(at.items())]


def arm_row(exp, arm) -> dict:
    points = arm.points()
    from .experiment import point_name
    tuning = {point_name(p): exp.validation_score(arm, p) for p in points}
    best = exp.chosen(arm)
    seeds = {s: seed_results(exp, arm, best, s) for s in exp.spec.seeds}
    first = exp.spec.seeds[0]
    seconds = sum(r["seconds"] for r in seeds.values())
    seconds += sum(read_json(exp.run_dir(arm, p, first) / "summary.json").get("wall_seconds", 0.0)
                   for p in points if p != best and arm.train)
    seconds += sum(read_json(exp.run_dir(arm, p, first) / "validation" / "eval.json").get("seconds", 0.0)
                   for p in points)
    ran = any(r["score"] is not None for r in seeds.values())
    curve = mean_curve(seeds)
    row = {"arm": arm.name, "start": arm.start or "base", "validation": tuning,
           "chosen": point_name(best) if ran else "not run yet", "seeds": seeds, "seconds": seconds, "curve": curve}
    for key in ("score", "rewards_acc", "logps_acc"):  # shares: the interval is clipped to [0, 1]
        values = [r[key] for r in seeds.values() if r.get(key) is not None]
        mean, low, high = mean_interval(values) if values else (None,) * 3
        row[key] = None if mean is None else (mean, max(0.0, low), min(1.0, high)) if not math.isnan(low) else (mean, low, high)
    return row


def claim_row(claim: dict, rows: dict, margin: float) -> dict:
    """The claim's seed-by-seed differences in held-out score, their mean and 95% interval, the verdict."""
    a, b = rows[claim["a"]]["seeds"], rows[claim["b"]]["seeds"]
    diffs = [a[s]["score"] - b[s]["score"] for s in a if a[s]["score"] is not None and b[s]["score"] is not None]
    mean, low, high = mean_interval(diffs)
    return {**claim, "differences": diffs, "mean": mean, "low": low, "high": high,
            "verdict": verdict(claim["test"], low, high, margin)}


def verdict(test: str, low: float, high: float, margin: float) -> str:
    if math.isnan(low):
        return "inconclusive (fewer than 2 seeds)"
    holds, fails = {"better": (low > 0, high <= 0), "at_least": (low > -margin, high < -margin),
                    "close": (-margin <= low and high <= margin, low > margin or high < -margin)}[test]
    return "holds" if holds else "does not hold" if fails else "inconclusive"


def pct(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def interval(mi) -> str:
    if mi is None:
        return ""
    mean, low, high = mi
    return f"**{pct(mean)}**" + ("" if math.isnan(low) else f" [{pct(low)}, {pct(high)}]")


def markdown(rows: list, claims: list, spec) -> str:
    seeds = spec.seeds
    lines = [f"Held-out score: exact-match accuracy (%) of greedy answers; mean over seeds {', '.join(map(str, seeds))} "
             "with its 95% t interval. Validation: the score at the first seed of each grid point tried.", "",
             "| arm | starts from | validation (grid point: score) | kept | held-out score | "
             f"per seed ({' / '.join(map(str, seeds))}) | implicit-reward accuracy | log-prob accuracy | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuning = "; ".join(f"{k}: {pct(v)}" for k, v in r["validation"].items() if v is not None)
        per_seed = " / ".join(pct(r["seeds"][s]["score"]) for s in seeds)
        lines.append(f"| {r['arm']} | {r['start']} | {tuning} | {r['chosen']} | {interval(r['score'])} | {per_seed} | "
                     f"{interval(r['rewards_acc'])} | {interval(r['logps_acc'])} | {r['seconds'] / 60:.1f} |")
    lines += by_step(rows)
    lines += ["", f"Claims: the held-out score of arm a minus that of arm b, seed by seed (percentage points), "
              f"mean and 95% t interval; margin m = {100 * spec.margin:.0f} points. "
              + " ".join(f"{t}: {rule}." for t, rule in VERDICT_RULES.items()), "",
              "| claim | a - b | per seed | mean [95% interval] | test | verdict |", "|---|---|---|---|---|---|"]
    for c in claims:
        per_seed = " / ".join(f"{100 * d:+.1f}" for d in c["differences"])
        span = "" if math.isnan(c["low"]) else f" [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"
        mean = "" if math.isnan(c["mean"]) else f"{100 * c['mean']:+.1f}"
        lines.append(f"| {c['claim']} | {c['a']} - {c['b']} | {per_seed} | {mean}{span} | {c['test']} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def evaluated_while_training(rows: list) -> bool:
    """Some arm evaluated between its start and its end (online rounds, trainer.eval_every)."""
    return any(len([step for step, _, _ in r["curve"] if step > 0]) > 1 for r in rows)


def by_step(rows: list) -> list:
    """Markdown lines: each arm's mean held-out score at every step some arm evaluated at (online
    rounds evaluate at each round's end); none when no arm evaluated while training."""
    steps = sorted({step for r in rows for step, _, _ in r["curve"]})
    if not evaluated_while_training(rows):
        return []
    out = ["", "Held-out score (%) by training step, mean over the seeds:", "",
           "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for r in rows:
        at = {step: mean for step, mean, _ in r["curve"]}
        if at:
            out.append(f"| {r['arm']} | " + " | ".join(pct(at.get(s)) for s in steps) + " |")
    return out


def plot(rows: list, path: Path) -> None:
    """Held-out score and implicit-reward accuracy by arm: the mean, its interval, each seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = evaluated_while_training(rows)
    fig, axes = plt.subplots(1, 3 if curves else 2, figsize=(16.5 if curves else 11, 0.45 * len(rows) + 1.6),
                             gridspec_kw={"width_ratios": [1, 1, 1.2] if curves else [1, 1]})
    for ax, key, title in ((axes[0], "score", "held-out score (exact answers)"),
                           (axes[1], "rewards_acc", "held-out implicit-reward accuracy")):
        for y, r in enumerate(rows):
            mi = r[key]
            if mi is None:
                continue
            mean, low, high = mi
            xerr = None if math.isnan(low) else [[mean - low], [high - mean]]
            ax.errorbar([mean], [y], xerr=xerr, fmt="o", color="C0", capsize=4)
            seeds = [v[key] for v in r["seeds"].values() if v.get(key) is not None]
            ax.plot(seeds, [y] * len(seeds), "x", color="C1", alpha=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [f"{r['arm']} ({r['chosen']})" for r in rows], fontsize=8)
    axes[1].set_yticks(range(len(rows)), [])
    for ax in axes[:2]:
        ax.set_ylim(len(rows) - 0.5, -0.5)
    if curves:
        started = {r["start"] for r in rows} - {"base"}  # arms that train on from others: theirs alone
        for k, r in enumerate(rows):
            if r["curve"] and (r["start"] in started or not started):
                axes[2].plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], "o-", color=f"C{k}",
                             label=r["arm"], markersize=4)
        axes[2].set_title("held-out score by training step (mean over seeds)", fontsize=10)
        axes[2].set_xlabel("step", fontsize=9)
        axes[2].set_ylim(0, 1)
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_report(exp) -> dict:
    rows = [arm_row(exp, arm) for arm in exp.spec.arms.values()]
    by_arm = {r["arm"]: r for r in rows}
    claims = [claim_row(c, by_arm, exp.spec.margin) for c in exp.spec.claims]
    out = exp.out
    md, js, png = out / "report.md", out / "report.json", out / "report.png"
    atomic_write(md, lambda tmp: tmp.write_text(markdown(rows, claims, exp.spec)))
    record = {"spec": str(exp.spec.path), "overrides": exp.extra, "seeds": exp.spec.seeds, "arms": rows,
              "claims": claims}
    atomic_write(js, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    atomic_write(png, lambda tmp: plot(rows, tmp))
    return {"md": md, "json": js, "png": png, "arms": by_arm, "claims": claims}

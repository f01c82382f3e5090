"""Measures what the shared reference cache saves, for the tiny model and SmolLM2-135M.

    python scripts/bench_reference_cache.py                  # both models; prints a Markdown table
    python scripts/bench_reference_cache.py --models tiny --steps 24

For each model, three kto-train runs with the same data, seed and steps:
  (a) reference.cache=off                   the reference pass runs, nothing is stored
  (b) first run of a sweep (empty cache)    the reference pass runs and fills the cache
  (c) a later run of the sweep (beta 0.3)   every reference value comes from the cache
Each run is its own process; wall time is measured around it, the reference-pass time and peak
RSS come from the run's summary.json. Allocator settings: kto-train's own (mallopt, see cli.py),
the same for every run.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {"a": ("no cache", ["reference.cache=off"]),
        "b": ("sweep, first run", []),
        "c": ("sweep, later run", ["loss.beta=0.3"])}


def run(model: str, steps: int, extra: list, cache: Path, out: Path) -> dict:
    exe = Path(sys.executable).parent / "kto-train"
    args = [str(exe), f"model={model}", f"trainer.max_steps={steps}", "trainer.progress=false", "recipe=none",
            f"reference.cache_dir={cache}", f"hydra.run.dir={out}", *extra]
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "reference_s": summary["reference_seconds"], "computed": summary["reference"]["computed"],
            "reused": summary["reference"]["reused"], "peak_rss_mb": summary["peak_rss_mb"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2_135m"])
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cache = Path(tmp) / f"cache-{model}"
            for key, (label, extra) in RUNS.items():
                r = run(model, args.steps, extra, cache, Path(tmp) / f"{model}-{key}")
                rows.append((model, f"({key}) {label}", r))
                print(model, key, r, flush=True)
    print("\n| model | run | wall s | reference pass s | computed / reused | peak RSS MB |\n|---|---|---|---|---|---|")
    for model, label, r in rows:
        print(f"| {model} | {label} | {r['wall_s']:.1f} | {r['reference_s']:.1f} | {r['computed']} / {r['reused']} "
              f"| {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

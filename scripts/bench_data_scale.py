"""Start-up at scale: time to the first training step and peak memory of kto-train on 10k, 100k and
1M rows, the first run (empty caches) and a second one (the tokenised data cached).

    python scripts/bench_data_scale.py                          # 10k, 100k, 1M rows
    python scripts/bench_data_scale.py --rows 10000 100000 --code /tmp/before   # another install

The rows are the shipped arith data's kind (a system message, a question, a right and a wrong
answer; ~166 bytes a row), drawn with a fixed seed into --data. Each run is its own kto-train
process: `model=tiny_smollm2` (SmolLM2's tokenizer and chat template, a 2-layer model), 2 steps,
no held-out split, reference.cache=off, its own empty KTO_CLI_CACHE and HF_DATASETS_CACHE for the
first run, kept for the second; the model converted from GGUF once beforehand and shared (its
conversion is no part of either run). Time to first step: from starting the process to the first step's
line in metrics.jsonl. Peak memory: the process's peak RSS (getrusage of the waited child).
--code runs the kto_cli installed in that folder (pip install --no-deps --target DIR CHECKOUT).
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_arith_data  # noqa: E402

RUN = ["model=tiny_smollm2", "recipe=none", "trainer.max_steps=2", "dataset.eval=null", "reference.cache=off",
       "trainer.progress=false"]


def make_rows(path: Path, n: int) -> Path:
    if not path.exists():
        rng = random.Random(n)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for _ in range(n):
                question, right, wrong = rng.choice(make_arith_data.KINDS)(rng)
                f.write(json.dumps(make_arith_data.row(question, right, wrong)) + "\n")
        tmp.rename(path)
    return path


def warm_model(where: Path) -> Path:
    """The GGUF model converted once, for every run to share."""
    env = {**os.environ, "KTO_CLI_CACHE": str(where / "warm")}
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import make_config; "
            "from kto_cli.models import load_tokenizer; load_tokenizer(make_config('model=tiny_smollm2').model)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=Path(__file__).resolve().parent.parent,
                   capture_output=True)
    return where / "warm" / "models"


def run(data: Path, where: Path, caches: Path, code: str) -> dict:
    """One kto-train process: seconds to its first step, wall seconds, peak RSS in MB."""
    if where.exists():
        shutil.rmtree(where)
    env = {**os.environ, "KTO_CLI_CACHE": str(caches / "kto-cli"), "HF_DATASETS_CACHE": str(caches / "hf")}
    if code:
        env["PYTHONPATH"] = code
    cmd = [sys.executable, "-c", "import sys; from kto_cli.cli import train_main; sys.argv[0] = 'kto-train'; train_main()",
           *RUN, f"dataset.train={data}", f"hydra.run.dir={where}"]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=caches, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if status:
        sys.exit(f"{' '.join(cmd)}: exited {status}: {proc.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    first = min(r["time"] for r in rows if "train/loss" in r)
    return {"first_step_s": round(first - start, 1), "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--data", type=Path, default=Path("/tmp/kto-bench-data"))
    p.add_argument("--code", default="", help="a folder holding another kto_cli install (the 'before' side)")
    p.add_argument("--once", action="store_true", help="the first run only (code without a data cache)")
    p.add_argument("--cached", action="store_true", help="the cached run only, on the caches an earlier run left")
    p.add_argument("--out", type=Path, default=None, help="append the results here as JSON lines")
    args = p.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    for n in args.rows:
        data = make_rows(args.data / f"arith_{n}.jsonl", n)
        caches = args.data / f"caches_{n}"
        if not args.cached:
            shutil.rmtree(caches, ignore_errors=True)
            (caches / "kto-cli").mkdir(parents=True)
            (caches / "kto-cli" / "models").symlink_to(warm_model(args.data))
        result = {"rows": n, "mb": round(data.stat().st_size / 2**20, 1), "code": args.code or "this checkout"}
        for name in ("cached",) if args.cached else ("first", "cached")[: 1 if args.once else 2]:
            result[name] = run(data, args.data / f"run_{n}", caches, args.code)
        print(json.dumps(result), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

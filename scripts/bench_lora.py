"""LoRA against full fine-tuning, side by side on the same model, data, batch and steps: peak
memory, training tokens/s, checkpoint size and the first losses.

    python scripts/bench_lora.py                                  # SmolLM2-135M, 12 steps, r=16
    python scripts/bench_lora.py --model tiny_smollm2 --steps 30 --rank 8

Each configuration is its own kto-train process (peak RSS is that process's); both read the
reference log-probs from one cache entry (the base model's), so neither pays the reference pass
inside its training time. tokens/s is the mean over the steps after the first (the first pays
first-touch page faults of the optimizer state).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(name: str, overrides: list, where: Path) -> dict:
    run_dir = where / name
    cmd = ["kto-train", *overrides, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name}: kto-train exited {out.returncode}: {out.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = max((run_dir / "checkpoints").glob("step_*"))
    return {"config": name, "peak_rss_mb": round(summary["peak_rss_mb"]),
            "tokens_per_s": round(sum(r["train/tokens/s"] for r in train[1:]) / max(1, len(train) - 1), 1),
            "checkpoint_mb": round(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20, 1),
            "losses": [round(r["train/loss"], 4) for r in train[:4]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    common = [f"model={args.model}", "recipe=none", f"trainer.max_steps={args.steps}", "trainer.progress=false",
              "eval.generate=false", "eval.before_training=false", f"trainer.save_every={args.steps}"]
    with tempfile.TemporaryDirectory() as where:
        rows = [run("full", common, Path(where)),
                run(f"lora_r{args.rank}", [*common, f"model.lora.r={args.rank}", f"model.lora.alpha={2 * args.rank}"],
                    Path(where))]
    print(f"{args.model}, {args.steps} steps, batch and lengths of recipe=none")
    print(f"{'config':<12}{'peak RSS MB':>12}{'tokens/s':>10}{'checkpoint MB':>15}  first losses")
    for r in rows:
        print(f"{r['config']:<12}{r['peak_rss_mb']:>12}{r['tokens_per_s']:>10}{r['checkpoint_mb']:>15}  {r['losses']}")


if __name__ == "__main__":
    main()

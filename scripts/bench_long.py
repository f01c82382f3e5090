"""Long sequences: peak memory and step time of kto-train's row layouts and of TRL's KTOTrainer,
side by side on the same synthetic data (KTO, batch 8 unless --batch, fp32 on CPU, bf16 on a GPU,
each configuration in its own process).

    pip install trl                                     # for the TRL rows only
    python scripts/bench_long.py                        # tiny_smollm2 at 256, 1024, 4096; smollm2_135m at 1024
    python scripts/bench_long.py --runs tiny_smollm2:1024 --configs separate prefix --steps 4
    python scripts/bench_long.py --runs smollm2_135m:1024 --batch 2     # batch 8 needs ~20 GB here
    python scripts/bench_long.py --configs separate prefix --repeat 3   # medians of 3 interleaved runs
    python scripts/bench_long.py --runs tiny_smollm2:2048 --set model.tiny.hidden_size=2048 ...   # a bigger model

Data: rows of random single-token words, prompt and completion each about half of the length (the
chat template's header included), chosen and rejected completions, unpaired into 16 examples. The
length is tokens per sequence (prompt + completion); kto-train's dataset.max_length and TRL's
max_length are set above it, so nothing is truncated.

Configurations:
  separate        trainer.shared_prompt=false: each example and each KL sequence its own row
  shared_dense    the example and its KL sequence in one row, a dense (B, 1, L, L) mask
  shared_blocks   the same row, attention by blocks (attention.py: no L x L mask)
  prefix          the default: the KL sequence on the prompt's cached keys and values
  packed          trainer.packing=true: shared-prompt groups packed into rows, by blocks
  trl_default     KTOTrainer with a reference model
  trl_precompute  KTOTrainer with precompute_ref_log_probs=True
step_s is the median time of the steps after the first; tokens/s counts the policy batches' prompt
and completion tokens over it; peak RSS is the process's, peak GPU memory torch's peak allocation.
MFU (on a GPU, over --peak-tflops) counts 6N FLOPs per policy token and 2N per KL token (the same
number), N = parameters; attention FLOPs are left out, so at 2,048 tokens it understates.
Allocator: run with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 for equal footing (kto-train
sets these itself).
"""
import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_trl as vs  # noqa: E402

DATA = Path(tempfile.gettempdir()) / "kto-bench-long"
ROWS = 8  # paired rows -> 16 examples, two batches of 8
OURS = {"separate": ["trainer.shared_prompt=false"],
        "shared_dense": ["trainer.kl_prefix=false", "trainer.attention_blocks=null"],
        "shared_blocks": ["trainer.kl_prefix=false", "trainer.attention_blocks=0"],
        "prefix": [],
        "packed": ["trainer.packing=true", "trainer.attention_blocks=0"]}
CONFIGS = [*OURS, "trl_default", "trl_precompute"]
DEFAULT_RUNS = ["tiny_smollm2:256", "tiny_smollm2:1024", "tiny_smollm2:4096", "smollm2_135m:1024"]


def words(tokenizer) -> list:
    """Ids of single-token words (a space and letters) that stay one token when strung together."""
    ids = []
    for i in range(1000, 20000):
        s = tokenizer.decode([i])
        if s.startswith(" ") and s[1:].isalpha() and tokenizer.encode(s, add_special_tokens=False) == [i]:
            ids.append(i)
    return ids


def make_data(length: int) -> Path:
    """DATA/<length>.jsonl: ROWS rows whose rendered prompt and completions are ~length/2 tokens each."""
    path = DATA / f"{length}.jsonl"
    if path.exists():
        return path
    from kto_cli.models import load_tokenizer
    tok = load_tokenizer(vs.compose("tiny_smollm2", 1, DATA).model)
    vocab, rng = words(tok), random.Random(length)
    text = lambda n: tok.decode(rng.choices(vocab, k=n)).strip()  # noqa: E731
    header = len(tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)) - 1
    rows = [{"prompt": [{"role": "user", "content": text(length // 2 - header)}],
             "chosen": text(length // 2 - 2), "rejected": text(length // 2 - 2)} for _ in range(ROWS)]
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)
    return path


def overrides(length: int) -> list:
    """Beyond what bench_vs_trl.compose sets (max_length and max_train_rows, from vs.MAX_LENGTH, vs.ROWS)."""
    return [f"dataset.train={make_data(length)}", f"dataset.max_prompt_length={length // 2 + 64}"]


def parameters(model: str, extra: list) -> int:
    """The model's parameter count: a config-built model on the meta device (no weights), a
    pretrained one loaded."""
    import torch
    from kto_cli.config import ModelSource
    from kto_cli.models import load_model, load_tokenizer
    cfg = vs.compose(model, 1, DATA, overrides=tuple(extra))
    tok = load_tokenizer(cfg.model)
    with torch.device("meta") if cfg.model.source == ModelSource.tiny else torch.device("cpu"):
        return sum(p.numel() for p in load_model(cfg.model, tok).parameters())


def one(config: str, model: str, length: int, steps: int, extra: list, batch: int) -> None:
    import torch
    vs.MAX_LENGTH, vs.ROWS, vs.BATCH = length + 64, 2 * ROWS, batch
    with tempfile.TemporaryDirectory() as tmp:
        if config in OURS:
            r = vs.run_ours(model, steps, Path(tmp), (*overrides(length), *extra, *OURS[config]))
            from kto_cli.metrics import read_metrics
            ends = [rec["time"] for rec in read_metrics(Path(tmp), "train")]
        else:
            r = vs.run_trl(model, steps, Path(tmp), config == "trl_precompute", overrides=(*overrides(length), *extra))
            ends = r["ends"]
    r["step_s"] = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    r["tokens_per_s"] = r["tokens"] / steps / r["step_s"]
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps({k: v for k, v in r.items() if k != "ends"}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="model:length")
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration, interleaved; medians reported")
    p.add_argument("--set", nargs="*", default=[], help="config overrides for every run (kto-train and TRL's model)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(a.one[0], a.one[1], int(a.one[2]), a.steps, a.set, a.batch)
    spread = " (min-max)" if a.repeat > 1 else ""
    print(f"| model | length | config | mean tokens/seq | step s{spread} | tokens/s | peak RSS MB{spread} | peak GPU MB | MFU |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    for run in a.runs:
        model, length = run.split(":")
        make_data(int(length))
        n = parameters(model, a.set)
        results = {config: [] for config in a.configs}
        for _ in range(a.repeat):  # round-robin, so a slow spell of the machine touches every configuration
            for config in a.configs:
                results[config].append(measure(config, model, length, a))
        for config, rs in results.items():
            print(row(model, n, length, config, rs, a), flush=True)


def measure(config: str, model: str, length: str, a) -> dict:
    """One configuration's run in its own process: its RESULT, or {"why": ...} where it failed."""
    out = subprocess.run([sys.executable, __file__, "--one", config, model, length, "--steps", str(a.steps),
                          "--batch", str(a.batch), "--set", *a.set], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if line:
        return json.loads(line[0][7:])
    return {"why": "killed (out of memory?)" if out.returncode < 0 else f"failed: {out.stderr.strip()[-300:]}"}


def row(model: str, n: int, length: str, config: str, rs: list, a) -> str:
    """A table row: medians over the repeats, with their range where there are several."""
    ok = [r for r in rs if "why" not in r]
    if not ok:
        return f"| {model} | {length} | {config} | | {rs[0]['why']} | | | | |"
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    span = lambda key, f: f" ({f(min(r[key] for r in ok))}-{f(max(r[key] for r in ok))})" if len(ok) > 1 else ""  # noqa: E731
    secs, mb = "{:.2f}".format, "{:,.0f}".format
    seq, gpu, tps = ok[0]["tokens"] / a.steps / a.batch, ok[0]["peak_gpu_mb"], med("tokens_per_s")
    mfu = f"{100 * 8 * n * tps / (a.peak_tflops * 1e12):.1f}%" if gpu is not None else ""
    failed = f", {len(rs) - len(ok)} failed" if len(ok) < len(rs) else ""
    return (f"| {model} ({n / 1e6:,.0f}M) | {length} | {config} | {seq:.0f} | {secs(med('step_s'))}{span('step_s', secs)}{failed} | "
            f"{tps:,.0f} | {mb(med('peak_rss_mb'))}{span('peak_rss_mb', mb)} | {'' if gpu is None else mb(med('peak_gpu_mb'))} | {mfu} |")

if __name__ == "__main__":
    main()

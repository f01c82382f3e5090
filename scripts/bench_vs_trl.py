"""kto-train side by side with TRL's KTOTrainer and a bare PyTorch loop, on the same model, examples,
batch size, lengths, precision and steps (KTO, beta 0.1, lr 1e-5 constant, fp32, CPU).

    pip install trl                                    # for this benchmark only
    python scripts/bench_vs_trl.py                     # tiny_smollm2 and smollm2_135m, 12 steps each
    python scripts/bench_vs_trl.py --models tiny_smollm2 --steps 30 --repeats 3

Models: tiny_smollm2 is a 2-layer, hidden-64 Llama with SmolLM2's 49,152-token vocabulary (the LM
head dominates); smollm2_135m is SmolLM2-135M-Instruct.

Each configuration runs in its own process (peak RSS is that process's):
  trl_default     KTOTrainer with a reference model, reference log-probs every step
  trl_precompute  KTOTrainer with precompute_ref_log_probs=True
  bare            a hand-written loop with cached reference log-probs: forward with grad on the
                  examples, forward without grad on their KL partners, the completion log-prob
                  gather (LM head on completion positions only), backward, AdamW
  ours            kto-train (reference.cache=off: its reference pass is inside time-to-first-step)
  ours_packed     the same with trainer.packing=true (padding-free rows)
tokens/s counts prompt + completion tokens of the policy batches over the training steps' time;
steady tokens/s leaves out the first step (on CPU it pays the first-touch page faults of the
optimizer state and gradients, ~6 s for SmolLM2-135M here).
Allocator: glibc defaults in every configuration except `ours`, which tunes mallopt at start as
kto-train always does; run with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 for equal footing.
"""
import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, MAX_LENGTH, LR, ROWS = 8, 128, 1e-5, 48


def compose(model: str, steps: int, out: Path, lr: float = LR, overrides: tuple = ()):
    from hydra import compose as hydra_compose, initialize_config_module

    from kto_cli.config import register_configs, to_run_config
    register_configs()
    overrides = [f"model={model}", f"trainer.max_steps={steps}", f"trainer.batch_size={BATCH}",
                 f"trainer.micro_batch_size={BATCH}", f"trainer.lr={lr}", "trainer.schedule=constant",
                 "trainer.warmup_ratio=0", "trainer.progress=false", "dataset.eval=null",
                 f"dataset.max_train_rows={ROWS}", f"dataset.max_length={MAX_LENGTH}", "reference.cache=off", "recipe=none", *overrides]
    with initialize_config_module("kto_cli.conf", version_base=None):
        return to_run_config(hydra_compose("config", overrides=overrides))


def setup(model_name: str, steps: int, out: Path, lr: float = LR, overrides: tuple = ()):
    """The model, tokenizer and examples every configuration uses."""
    from kto_cli.data import build_splits
    from kto_cli.models import load_model, load_tokenizer
    cfg = compose(model_name, steps, out, lr, overrides)
    tok = load_tokenizer(cfg.model)
    split, _, _ = build_splits(cfg.dataset, tok, True)
    return cfg, tok, split, lambda: load_model(cfg.model, tok)


def mean_tokens(split) -> float:
    return sum(len(p) + len(c) for p, c in (split.sequence(i) for i in range(len(split)))) / len(split)


def run_ours(model_name: str, steps: int, out: Path, overrides: tuple = ()) -> dict:
    from kto_cli.cli import tune_allocator
    tune_allocator()
    from kto_cli.train import train
    cfg, _, split, _ = setup(model_name, steps, out, overrides=overrides)
    start = time.perf_counter()
    summary = train(cfg, out)
    from kto_cli.metrics import read_metrics
    records = read_metrics(out, "train")
    first = records[:3]
    ends = [r["time"] for r in records]  # wall clock as each step was logged
    return {"train_s": summary["train_seconds"], "first_step_s": summary["wall_seconds"] - summary["train_seconds"],
            "total_s": time.perf_counter() - start, "tokens": steps * BATCH * mean_tokens(split),
            "steady_s": ends[-1] - ends[0],
            "first_steps": [{k: r.get(k) for k in ("loss", "kl", "rewards/chosen", "rewards/rejected")}
                            for r in first]}


def rotated_kl(split) -> list:
    """TRL's KL sequences: each batch of BATCH rows in data order pairs prompt i with completion i-1
    (the first with the last), where kto-train uses a seeded derangement by default
    (dataset.kl_partners=rotate gives TRL's)."""
    from kto_cli.data import rotated_partners
    partners = rotated_partners(len(split), BATCH)
    return [(split.sequence(i)[0], split.sequence(j)[1]) for i, j in enumerate(partners)]


def run_bare(model_name: str, steps: int, out: Path, lr: float = LR, trl_kl: bool = False, overrides: tuple = ()) -> dict:
    import torch
    from kto_cli.data import collate
    from kto_cli.logprobs import Runner, completion_logps, logps_of
    from kto_cli.losses import kl_estimate, kto_loss
    start = time.perf_counter()
    cfg, tok, split, load = setup(model_name, steps, out, lr, overrides)
    model = load()
    n = len(split)
    seqs = [split.sequence(i) for i in range(n)]
    kl_seqs = rotated_kl(split) if trl_kl else [split.kl_sequence(i) for i in range(n)]
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    run = Runner(tok.pad_token_id, "cpu", off, 16)
    ref, _, _ = logps_of(model, seqs, run)
    ref_kl, _, _ = logps_of(model, kl_seqs, run)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    model.train()
    first_step_at = time.perf_counter()
    first, ends = [], []
    for step in range(steps):
        idx = [(step * BATCH + k) % n for k in range(BATCH)]
        with torch.no_grad():
            kl = completion_logps(model, collate([kl_seqs[i] for i in idx], tok.pad_token_id)).seq
        kl = kl_estimate((kl - ref_kl[idx]).sum(), torch.tensor(BATCH))
        logps = completion_logps(model, collate([seqs[i] for i in idx], tok.pad_token_id)).seq
        loss, m = kto_loss(logps, ref[idx], split.desirable(idx), kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step < 3:
            mean = lambda v: v.mean().item() if v.numel() else None  # noqa: E731
            first.append({"loss": loss.item(), "kl": m["kl"].item(), "rewards/chosen": mean(m["rewards/chosen"]),
                          "rewards/rejected": mean(m["rewards/rejected"])})
        ends.append(time.perf_counter())
    end = time.perf_counter()
    return {"train_s": end - first_step_at, "first_step_s": first_step_at - start, "total_s": end - start,
            "tokens": steps * BATCH * mean_tokens(split), "steady_s": ends[-1] - ends[0], "first_steps": first}


def run_trl(model_name: str, steps: int, out: Path, precompute: bool, lr: float = LR, overrides: tuple = ()) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import KTOConfig, KTOTrainer
    start = time.perf_counter()
    cfg, tok, split, load = setup(model_name, steps, out, lr, overrides)
    rows = [{"prompt": e.prompt, "completion": [{"role": "assistant", "content": e.completion}], "label": e.desirable}
            for e in split.examples]
    model = load()
    times = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.setdefault("first", time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.setdefault("ends", []).append(time.perf_counter())

    gpu = torch.cuda.is_available()  # bf16 there, as kto-train's precision=auto; fp32 on CPU
    args = KTOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=lr,
                     lr_scheduler_type="constant", warmup_steps=0, beta=0.1, logging_steps=1, report_to=[],
                     bf16=gpu, fp16=False, gradient_checkpointing=False, max_length=MAX_LENGTH,
                     precompute_ref_log_probs=precompute, save_strategy="no", disable_tqdm=True, seed=0,
                     use_cpu=not gpu, dataloader_num_workers=0)
    trainer = KTOTrainer(model=model, ref_model=None if precompute else copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[FirstStep()])
    trainer.train()
    end = time.perf_counter()
    logs = [h for h in trainer.state.log_history if "loss" in h][:3]
    return {"train_s": end - times["first"], "first_step_s": times["first"] - start, "total_s": end - start,
            "tokens": steps * BATCH * mean_tokens(split), "steady_s": times["ends"][-1] - times["ends"][0], "ends": times["ends"],
            "first_steps": [{k: h.get(k) for k in ("loss", "kl", "rewards/chosen", "rewards/rejected")} for h in logs]}


RUNNERS = {"trl_default": lambda m, s, o: run_trl(m, s, o, False), "trl_precompute": lambda m, s, o: run_trl(m, s, o, True),
           "bare": run_bare, "ours": run_ours,
           "ours_packed": lambda m, s, o: run_ours(m, s, o, ("trainer.packing=true",))}


def one(config: str, model: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = RUNNERS[config](model, steps, Path(tmp))
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["tokens_per_s"] = r["tokens"] / r["train_s"]
    r["steady_tokens_per_s"] = r["tokens"] * (steps - 1) / steps / r["steady_s"]
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny_smollm2", "smollm2_135m"])
    p.add_argument("--configs", nargs="+", default=list(RUNNERS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(a.one[0], a.one[1], a.steps)
    table = []
    for model in a.models:
        for config in a.configs:
            runs = []
            for _ in range(a.repeats):
                out = subprocess.run([sys.executable, __file__, "--one", config, model, "--steps", str(a.steps)],
                                     capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    print(f"{model} {config} failed:\n{out.stderr[-3000:]}", flush=True)
                    break
                runs.append(json.loads(line[0][7:]))
                print(model, config, runs[-1], flush=True)
            if runs:
                runs.sort(key=lambda r: r["tokens_per_s"])
                table.append((model, config, runs[len(runs) // 2]))  # the median run
    print("\n| model | config | tokens/s | steady tokens/s | time to first step s | total s | peak RSS MB | first steps loss / kl |")
    print("|---|---|---|---|---|---|---|---|")
    for model, config, r in table:
        firsts = ", ".join(f"{f['loss']:.4f}/{(f.get('kl') or 0):.4f}" for f in r["first_steps"])
        print(f"| {model} | {config} | {r['tokens_per_s']:.0f} | {r['steady_tokens_per_s']:.0f} | {r['first_step_s']:.1f} | {r['total_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {firsts} |")


if __name__ == "__main__":
    main()

"""Evaluation by generation: the model answers the held-out prompts, a verifier scores each answer,
and the run logs the score with a 95% interval and keeps every sample in samples.jsonl.

What a model *says* is the measure: held-out implicit-reward accuracy can rise while the answers
stay the same.
"""
import json
import math
from pathlib import Path

from . import distributed as dist
from .config import GenerationConfig, UserError, VerifierConfig
from .data import Split
from .files import read_jsonl
from .generate import generate
from .verifiers import check_rows, make_verifier

read_samples = read_jsonl  # samples.jsonl back as records, in order


def wilson(successes: float, n: int, z: float = 1.96) -> tuple:
    """The Wilson score interval of a proportion (successes may be fractional: mean scores)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class GenerationEval:
    """The held-out prompts (one per distinct prompt, in split order), their rows and the verifier;
    checked when built, before any model loads."""

    def __init__(self, split: Split, tokenizer, generation: GenerationConfig, verifier: VerifierConfig,
                 max_prompts=None):
        self.tokenizer, self.cfg = tokenizer, generation
        self.verifier = make_verifier(verifier)
        self.examples = split.distinct_prompts()[:max_prompts]
        self.split = split
        check_rows(self.verifier, [(split.examples[i].where, split.examples[i].row or {}) for i in self.examples])

    def __call__(self, model, step: int, samples_path=None, synced: bool = False, between_batches=None) -> dict:
        """Generates, scores, appends to samples_path (rank 0) and returns the eval/gen/* metrics.
        between_batches: see generate (nothing is written when it stops the job)."""
        prompts = [self.split.sequence(i)[0] for i in self.examples]
        samples = generate(model, self.tokenizer, prompts, self.cfg, synced=synced, between_batches=between_batches)
        records, errors = [], 0
        for s in samples:
            e = self.split.examples[self.examples[s.prompt]]
            score, detail = self.verifier.score(e.prompt, s.text, e.row or {})
            errors += detail.startswith("error")
            records.append({"step": step, "prompt": e.prompt, "completion": s.text, "score": score,
                            "detail": detail, "tokens": s.tokens})
        if samples_path is not None and dist.is_main():
            with open(samples_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return summarise(records, len(self.examples), self.cfg.n, self.verifier.threshold) | {"gen/errors": errors}


def summarise(records: list, prompts: int, n: int, threshold: float = 0.5) -> dict:
    """Mean score with its Wilson interval, mean length, and pass@n (a prompt passes when any of its
    n samples scores at least the verifier's threshold)."""
    total = sum(r["score"] for r in records)
    low, high = wilson(total, len(records))
    out = {"gen/score": total / max(1, len(records)), "gen/score_low": low, "gen/score_high": high,
           "gen/length": sum(r["tokens"] for r in records) / max(1, len(records))}
    if n > 1:
        out[f"gen/pass@{n}"] = sum(any(r["score"] >= threshold for r in records[k * n:(k + 1) * n])
                                   for k in range(prompts)) / max(1, prompts)
    return out


def evaluate_saved(cfg, run_dir: Path) -> dict:
    """kto-eval: the generation evaluation of a saved model (eval.model, else the `model` group) on
    the held-out prompts the same overrides would train with; writes samples.jsonl and eval.json."""
    from dataclasses import replace

    import torch

    from .config import ModelConfig, ModelSource
    from .models import load_model
    from .train import Trainer
    if cfg.eval.model:
        cfg = replace(cfg, model=ModelConfig(source=ModelSource.hf, name_or_path=cfg.eval.model,
                                             attn_implementation=cfg.model.attn_implementation))
    tr = Trainer(replace(cfg, eval=replace(cfg.eval, generate=True)), run_dir)
    tr.load_inputs()
    gen = tr.generation_eval()
    if gen is None:
        raise UserError("kto-eval needs held-out prompts: set dataset.eval or dataset.eval_fraction")
    model = load_model(cfg.model, tr.tokenizer).to(tr.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_samples(run_dir / "samples.jsonl", 0)
    with torch.no_grad(), tr.autocast():
        metrics = gen(model, 0, run_dir / "samples.jsonl")
    (run_dir / "eval.json").write_text(json.dumps({"model": cfg.model.name_or_path, **metrics}, indent=2))
    print(f"kto-eval: {cfg.model.name_or_path}: gen/score {metrics['gen/score']:.4f} (95% interval "
          f"[{metrics['gen/score_low']:.2f}, {metrics['gen/score_high']:.2f}]) over {len(gen.examples)} prompts, "
          f"{metrics['gen/length']:.1f} tokens per answer; samples in {run_dir / 'samples.jsonl'}", flush=True)
    return metrics


def keep_samples(path: Path, up_to_step: int) -> None:
    """A resumed run keeps the samples up to its checkpoint's step (a fresh one: none)."""
    if Path(path).is_file():
        kept = [r for r in read_jsonl(path) if up_to_step > 0 and r["step"] <= up_to_step]
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def examples_at(records: list, step: int, k: int = 3) -> list:
    """The first k (prompt, completion, score) of a step's samples."""
    return [(r["prompt"], r["completion"], r["score"]) for r in records if r["step"] == step][:k]


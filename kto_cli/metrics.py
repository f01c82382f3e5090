"""Metrics: sums over micro-batches and ranks, metrics.jsonl (written and read back), the summary."""
import json
import time
from pathlib import Path
from typing import Optional

import torch

from . import distributed as dist
from .files import read_jsonl
from .losses import pair_wins


class MetricSums:
    """Sums and counts of per-example metric values, over micro-batches (and, later, ranks)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics: dict) -> None:
        if not metrics:
            return
        sums = torch.stack([v.detach().float().sum() for v in metrics.values()]).tolist()  # one device sync
        for (k, v), total in zip(metrics.items(), sums):
            self.sums[k] = self.sums.get(k, 0.0) + total
            self.counts[k] = self.counts.get(k, 0) + v.numel()

    def means(self, across_ranks: bool = False) -> dict:
        """Means over every value added here (and on every rank, with across_ranks: a collective)."""
        keys = sorted(self.sums)
        if across_ranks and dist.world() > 1:
            both = dist.all_sum(torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys], dtype=torch.float64))
            self.sums = dict(zip(keys, both[:len(keys)].tolist()))
            self.counts = dict(zip(keys, both[len(keys):].tolist()))
        out = {k: self.sums[k] / self.counts[k] for k in keys if self.counts[k]}
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def pair_accuracy(split, scores: torch.Tensor) -> Optional[float]:
    """Share of held-out pairs whose chosen completion scores above the rejected one (ties: 1/2)."""
    pairs = torch.from_numpy(split.pairs())  # (P, 2)
    if not len(pairs):
        return None
    return float(pair_wins(scores[pairs[:, 0]], scores[pairs[:, 1]]).mean())


def read_metrics(where: Path, split: Optional[str] = None) -> list:
    """The records of a run's metrics.jsonl (where: the run dir or the file), in order. With split
    ("train" or "eval"), only that split's records, their keys without the "split/" prefix, plus
    "step" and "time". [] when there is no file yet; a last line still being written is left out."""
    records = read_jsonl(Path(where) / "metrics.jsonl" if Path(where).is_dir() else Path(where))
    if split is None:
        return records
    prefix = f"{split}/"
    return [{"step": r["step"], "time": r.get("time"), **{k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}}
            for r in records if any(k.startswith(prefix) for k in r)]


class MetricsLog:
    """metrics.jsonl in the run dir, one JSON object per logged step, flushed as written; the same
    values go to the trackers (kto_cli/trackers.py), if any."""

    def __init__(self, path: Path, resume_step: int = 0, trackers=None):
        """resume_step > 0 keeps the records up to that step (a crashed run may have logged past its
        last checkpoint; those steps are about to be run again)."""
        self.path, self.trackers = path, trackers
        kept = []
        if resume_step:
            kept = [json.dumps(r) for r in read_metrics(path) if r["step"] <= resume_step]
        self.f = open(path, "w", encoding="utf-8")
        self.f.writelines(line + "\n" for line in kept)
        self.f.flush()  # readers (an online round's record check) see the kept records at once

    @staticmethod
    def first_in(path: Path, split: str) -> dict:
        """A split's record at step 0, without its prefix, step and time ({} if none was logged)."""
        records = [r for r in read_metrics(path, split) if r["step"] == 0]
        return {k: v for k, v in records[0].items() if k not in ("step", "time")} if records else {}

    def close(self) -> None:
        self.f.close()
        if self.trackers is not None:
            self.trackers.close()

    def write(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": step, "time": time.time(), **{f"{split}/{k}": v for k, v in metrics.items()}}
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.trackers is not None:
            self.trackers.log(step, split, metrics)


def peak_gpu_mb() -> Optional[float]:
    """This process's peak GPU memory held by tensors (None without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


SUMMARY_KEYS = ("gen/score", "gen/length", "loss", "rewards/margins", "rewards/accuracies", "logps/accuracies",
                "logps/chosen", "logps/rejected", "kl", "kl/raw")


def summary_columns(summary: dict) -> list:
    """(heading, held-out metrics, example answers) at each point of the job: before training and
    after it, and with an SFT phase first, the base model (its metrics that no loss defines)."""
    columns = [("before", summary["eval_before"], summary.get("examples_before", [])),
               ("after", summary["eval_after"], summary.get("examples_after", []))]
    sft = summary.get("sft_phase")
    if sft:
        base = {k: v for k, v in sft["eval_before"].items() if k.startswith(("gen/", "logps/"))}
        columns = [("base", base, sft["examples_before"]), ("after sft", *columns[0][1:]), columns[1]]
    return columns


def print_summary(summary: dict, run_dir: Path) -> None:
    columns = summary_columns(summary)
    sft = summary.get("sft_phase")
    phase = f"{sft['steps']} sft steps in {sft['train_seconds']:.0f} s, then " if sft else ""
    lines = [f"\nkto-train: {phase}{summary['steps']} steps in {summary['train_seconds']:.0f} s "
             f"(wall {summary['wall_seconds']:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MB)"]
    after = summary["eval_after"]
    if after:
        lines.append(f"{'held-out metric':<22}" + "".join(f"{name:>11}" for name, _, _ in columns))
        for k in SUMMARY_KEYS:
            if k in after:
                lines.append(f"{k:<22}" + "".join(f"{m[k]:>11.4f}" if k in m else f"{'':>11}" for _, m, _ in columns))
        if "gen/score" in after:
            lines.append("gen/score 95% interval  " + " -> ".join(
                f"[{m.get('gen/score_low', float('nan')):.2f}, {m.get('gen/score_high', float('nan')):.2f}]"
                for _, m, _ in columns))
    for answers in zip(*(examples for _, _, examples in columns)):
        question = answers[0][0] if isinstance(answers[0][0], str) else answers[0][0][-1]["content"]
        lines.append(f"  {question!r}: " + " -> ".join(repr(a[1]) for a in answers) + f" (score {answers[-1][2]:g})")
    lines.append(f"run dir: {run_dir}   model: {run_dir / 'final'}")
    print("\n".join(lines), flush=True)

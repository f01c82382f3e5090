"""On-policy training data: the policy answers training prompts, the verifier labels each answer
desirable (score >= verifier.threshold) or not, and the loss trains on those labelled answers.
KTO needs nothing more than that yes/no; sft trains on the passing answers (rejection sampling);
paired losses pair a prompt's passing and failing answers.

    kto-train online.prompts=128 online.generation.n=4      # the default job does this after its SFT phase
"""
import json
import logging
import random
import time
from dataclasses import replace
from pathlib import Path

from . import distributed as dist
from .config import RunConfig, UnpairMode, UserError
from .data import distinct_prompts
from .files import atomic_write
from .generate import generate
from .verifiers import check_rows, make_verifier

log = logging.getLogger("kto_cli")


def chosen_prompts(split, count: int, seed: int) -> list:
    """Example indices of `count` distinct prompts of the split, a seeded choice, in split order."""
    first = distinct_prompts(split.examples)
    return sorted(random.Random(seed).sample(first, min(count, len(first))))


def labelled_rows(cfg: RunConfig, run_dir: Path) -> list:
    """The policy's answers to cfg.online.prompts training prompts, as (prompt, completion, label) rows."""
    from .models import load_model
    from .objectives.sft import SFTLossConfig
    from .train import Trainer, pick_device
    # the prompts as tokenized for plain SFT: no control tokens (csft's), which the model has not learned
    tr = Trainer(replace(cfg, loss=SFTLossConfig()), run_dir)
    tr.load_inputs()
    split, verifier = tr.splits["train"], make_verifier(cfg.verifier)
    picked = chosen_prompts(split, cfg.online.prompts, cfg.trainer.seed)
    check_rows(verifier, [(split.examples[i].where, split.examples[i].row or {}) for i in picked])
    model = load_model(cfg.model, tr.tokenizer).to(pick_device(cfg.trainer.device))
    with tr.autocast():
        samples = generate(model, tr.tokenizer, [split.sequence(i)[0] for i in picked], cfg.online.generation)
    rows, left_out = [], 0
    for s in samples:
        # Trained on, an answer ends with the end of the turn: one cut at max_new_tokens would teach
        # (or, labelled wrong, unteach) stopping where the model did not stop; an empty one has no tokens.
        if not s.text or not s.finished:
            left_out += 1
            continue
        e = split.examples[picked[s.prompt]]
        score, detail = verifier.score(e.prompt, s.text, e.row or {})
        rows.append({"prompt": e.prompt, "completion": s.text, "label": score >= verifier.threshold,
                     "score": score, "detail": detail})
    if not rows:
        raise UserError(f"online: all {left_out} answers were empty or cut at online.generation.max_new_tokens="
                        f"{cfg.online.generation.max_new_tokens}: nothing to train on; raise it")
    if left_out:
        log.info("online: %d answers left out (empty, or cut at online.generation.max_new_tokens)", left_out)
    return rows


def online_data(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The run's config training on on-policy answers, sampled once into run_dir/online/train.jsonl
    (rank 0 samples and writes it; a resumed run reads it back)."""
    if dist.env_ranks()[2] > 1 and cfg.deepspeed.stage is not None:
        from .backend import init_deepspeed_distributed
        init_deepspeed_distributed()  # rank 0 samples, the others wait for its file
    path = run_dir / "online" / "train.jsonl"
    if dist.is_main() and not (cfg.trainer.resume and path.is_file()):
        started = time.perf_counter()
        rows = labelled_rows(cfg, run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))
        passed = sum(r["label"] for r in rows)
        log.info("online: %d answers to %d training prompts in %.0f s, %d (%.1f%%) pass the verifier: %s",
                 len(rows), cfg.online.prompts, time.perf_counter() - started, passed,
                 100 * passed / max(1, len(rows)), path)
        if passed in (0, len(rows)):
            log.warning("online: every answer is labelled %s: the loss sees one kind only", bool(passed))
    dist.barrier()
    path = Path(dist.broadcast(str(path)))
    data = replace(cfg.dataset, train=str(path), train_split="train", max_train_rows=None, unpair=UnpairMode.both,
                   pair_by_prompt=cfg.dataset.pair_by_prompt or needs_pairs(cfg))
    return replace(cfg, dataset=data, online=replace(cfg.online, prompts=0))


def needs_pairs(cfg: RunConfig) -> bool:
    from .objectives import objective_class
    return objective_class(cfg.loss).needs.paired

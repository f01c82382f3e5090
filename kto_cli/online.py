"""Online training in rounds: each round the policy answers online.prompts training prompts
(online.generation.n sampled answers each), the verifier labels every answer desirable (score >=
verifier.threshold) or not, and the loss trains online.steps_per_round steps on that round's
answers. KTO needs nothing more than that yes/no; sft trains on the passing answers (rejection
sampling); paired losses pair a prompt's passing and failing answers.

    kto-train online.prompts=128 online.rounds=4 online.steps_per_round=16     # online KTO
    kto-train online.prompts=128 online.rounds=4 online.steps_per_round=16 loss=dpo online.reference=round

RUN/rounds/N/samples.jsonl holds round N's answers that are trained on (prompt, completion, label,
score, detail), round.json what its sampling gave, reference_logps.safetensors their reference
log-probs; a resumed run reads them back instead of sampling again.
"""
import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

from . import distributed as dist
from . import objectives
from .config import OnlineReference, RunConfig, UnpairMode, UserError, config_digest
from .data import build_splits, held_out_split, load_prompts
from .files import atomic_write
from .generate import generate
from .metrics import read_metrics
from .train import Trainer
from .verifiers import check_rows, make_verifier

log = logging.getLogger("kto_cli")


def chosen_prompts(split, count: int, seed: int) -> list:
    """Example indices of `count` distinct prompts of the split, a seeded choice, in split order."""
    first = split.distinct_prompts()
    return sorted(random.Random(seed).sample(first, min(count, len(first))))


def round_steps(cfg: RunConfig) -> int:
    """Optimizer steps per round: online.steps_per_round, else trainer.max_steps split evenly over
    the rounds, else trainer.epochs passes over a round's prompts x n answers."""
    o, t = cfg.online, cfg.trainer
    if o.steps_per_round:
        return o.steps_per_round
    if t.max_steps:
        return t.max_steps // o.rounds
    return max(1, math.ceil(t.epochs * o.prompts * o.generation.n / t.batch_size))


def round_key(cfg: RunConfig) -> str:
    """What a round's answers and reference depend on, besides the weights."""
    t = cfg.trainer
    return config_digest(cfg, ("model", "dataset", "loss", "verifier", "online")) + f"-{t.seed}-{t.batch_size}"


def needs_pairs(cfg: RunConfig) -> bool:
    return objectives.objective_class(cfg.loss).needs.paired


class OnlineTrainer(Trainer):
    """A Trainer whose training data are its policy's own labelled answers, made afresh each round.
    The reference of a round's answers is the initial policy (online.reference=initial), its
    weights swapped in for the pass, or the policy at the round's start (round); either way its
    log-probs are computed once per round and no second model is held."""

    def load_data(self) -> dict:
        """The training prompts (self.prompts, checked against the verifier before any model loads)
        and the held-out split; each round's answers become the train split."""
        cfg = self.cfg
        self.prompts = load_prompts(cfg.dataset, self.tokenizer, cfg.model.use_chat_template)
        self.data_digest = self.prompts.digest()  # the answers of each round are checked by its own files
        self.verifier = make_verifier(cfg.verifier)
        check_rows(self.verifier, [(e.where, e.row or {}) for e in self.prompts.examples])
        held = held_out_split(cfg.dataset, self.tokenizer, cfg.model.use_chat_template, cfg.trainer.micro_batch_size)
        self.per_round, self.round, self.start, self.initial = round_steps(cfg), None, 0, None
        self.eval_prepared, self.weights_gone = False, ""
        if cfg.online.steps_per_round and cfg.trainer.max_steps not in (None, self.total_steps()):
            log.info("online: %d rounds of %d steps (online.steps_per_round; trainer.max_steps=%d is not used)",
                     cfg.online.rounds, self.per_round, cfg.trainer.max_steps)
        return {"eval": held} if held is not None else {}

    def total_steps(self) -> int:
        return self.cfg.online.rounds * self.per_round

    def use_data(self, span=None, reference_file: str = "", cache: bool = True) -> None:
        """At set-up (span None) the rounds bring the data: only the initial weights are kept (on the
        CPU) when later reference passes need them back; each round calls the Trainer's."""
        if span is not None:
            return super().use_data(span, reference_file, cache)
        o, cfg = self.cfg.online, self.cfg
        if self.need.reference and o.reference == OnlineReference.initial and cfg.deepspeed.stage != 3 \
                and (o.rounds > 1 or cfg.trainer.resume) and not cfg.model.lora.r:  # LoRA: the base, adapters off
            self.initial = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def reference(self, path: Path, cache: bool = True, weights_gone: str = ""):
        """As the Trainer's, the summary's reference figures summed over the rounds this process ran."""
        before = self.reference_report or {}
        self.reference_report = None
        ref = super().reference(path, cache, weights_gone or self.weights_gone)
        now = self.reference_report or {}
        self.reference_report = {k: before.get(k, 0) + now.get(k, 0) for k in before.keys() | now.keys()}
        return ref

    def resume(self) -> int:
        """The step to start from; a fresh run drops any rounds an earlier run left in its dir."""
        if not self.cfg.trainer.resume and dist.is_main():
            shutil.rmtree(self.run_dir / "rounds", ignore_errors=True)
        self.start = super().resume()
        return self.start

    def ready(self, step: int, preemption) -> bool:
        """Enters the round of `step` (its answers sampled, or read back); whether it has data to train on."""
        r = min(step // self.per_round, self.cfg.online.rounds - 1)  # a finished run resumed: the last round
        if r != self.round:
            self.enter_round(r, preemption)
        return len(self.units["train"]) > 0

    def eval_due(self, done: int) -> bool:
        return super().eval_due(done) or (self.cfg.online.eval_each_round and done % self.per_round == 0)

    # ---------------------------------------------------------------- a round

    def enter_round(self, r: int, preemption) -> None:
        """Round r's answers as the train split, with its reference log-probs. Sampled unless an
        earlier attempt of this run wrote them; a signal during sampling stops the run with the
        checkpoint of the round's first step, so a resumed run starts with these answers."""
        folder = self.run_dir / "rounds" / str(r + 1)
        if not dist.broadcast((folder / "samples.jsonl").is_file()):
            self.sample_round(r, folder)
            if preemption.requested():
                self.stop(r * self.per_round, preemption)
        self.round = r
        self.check_round(folder)
        self.log_round(r, folder)
        split = self.round_split(folder / "samples.jsonl")
        self.splits["train"], self.units["train"] = split, objectives.units(split, self.need) if split else []
        if not len(self.units["train"]):
            log.warning("online round %d: no %s among its answers: its %d steps are skipped", r + 1,
                        "pairs of a passing and a failing answer to one prompt" if self.need.paired else
                        "passing answers" if self.need.desirable_only else "answers", self.per_round)
            return
        held = {"eval": self.splits["eval"]} if not self.eval_prepared and "eval" in self.splits else {}
        self.objective.prepare({"train": split} | held, self.tokenizer,
                               (int(split.labels.sum()), int((~split.labels).sum())))
        self.eval_prepared = True
        initial = self.cfg.online.reference == OnlineReference.initial
        moved = self.start > r * self.per_round  # resumed mid-round: the policy is past the round's start
        swap = initial and self.initial is not None and (r > 0 or moved)
        # the model holds the reference's weights (else only the round's file can give its values)
        ok = (swap or (r == 0 and not moved) or bool(self.cfg.model.lora.r)) if initial else not moved
        self.weights_gone = "" if ok else f"the policy has trained past round {r + 1}'s start" if moved else \
            "under ZeRO-3 no copy of the initial weights is kept"
        with self.initial_weights() if swap else contextlib.nullcontext():
            self.use_data((r * self.per_round, self.per_round, self.cfg.trainer.seed + r),
                          f"rounds/{r + 1}/reference_logps.safetensors", cache=initial or r == 0)

    def sample_round(self, r: int, folder: Path) -> None:
        """The policy's answers to round r's prompts, each rank its share of the batches (under
        ZeRO-3 all ranks make all, in step), labelled by the verifier; rank 0 writes them."""
        o, started = self.cfg.online, time.perf_counter()
        picked = chosen_prompts(self.prompts, o.prompts, self.cfg.trainer.seed + r)
        zero3 = self.world > 1 and self.cfg.deepspeed.stage == 3
        with self.autocast():
            samples = generate(self.model, self.tokenizer, [self.prompts.sequence(i)[0] for i in picked],
                               replace(o.generation, seed=o.generation.seed + r), synced=zero3,
                               shard=(0, 1) if zero3 else (self.rank, self.world))
        mine = [(s.prompt, self.labelled(picked[s.prompt], s)) for s in samples]
        parts = [mine] if zero3 else dist.gather(mine)
        answers = [a for _, a in sorted((x for part in parts for x in part), key=lambda x: x[0])]  # stable
        rows = [a for a in answers if a is not None]
        if not rows and r == 0:
            raise UserError(f"online: all {len(answers)} answers were empty or cut at online.generation.max_new_tokens="
                            f"{o.generation.max_new_tokens}: nothing to train on; raise it")
        passed = sum(a["label"] for a in rows)
        stats = {"round": r + 1, "prompts": len(picked), "answers": len(answers), "kept": len(rows), "passed": passed,
                 "pass_rate": passed / max(1, len(rows)), "sampling_seconds": time.perf_counter() - started,
                 "config": round_key(self.cfg)}
        if dist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / "round.json", lambda tmp: tmp.write_text(json.dumps(stats)))
            atomic_write(folder / "samples.jsonl", lambda tmp: tmp.write_text(
                "".join(json.dumps(a) + "\n" for a in rows), encoding="utf-8"))
        dist.barrier()
        log.info("online round %d: %d answers to %d prompts in %.0f s; %d kept (the others empty or cut at "
                 "online.generation.max_new_tokens), %d (%.1f%%) pass the verifier", r + 1, len(answers), len(picked),
                 stats["sampling_seconds"], len(rows), passed, 100 * stats["pass_rate"])

    def labelled(self, i: int, sample) -> dict:
        """A training row of an answer to prompt i, or None for one not trained on: an empty answer has
        no tokens, and one cut at max_new_tokens would teach (or, labelled wrong, unteach) stopping
        where the model did not stop."""
        if not sample.text or not sample.finished:
            return None
        e = self.prompts.examples[i]
        score, detail = self.verifier.score(e.prompt, sample.text, e.row or {})
        return {"prompt": e.prompt, "completion": sample.text, "label": score >= self.verifier.threshold,
                "score": score, "detail": detail}

    def round_split(self, path: Path):
        """The round's answers as a tokenized Split (None when there are none), KL partners drawn
        among them, paired by prompt for the losses that need pairs."""
        if not path.read_text(encoding="utf-8").strip():
            return None
        data = replace(self.cfg.dataset, train=str(path), train_split="train", eval=None, eval_fraction=0.0,
                       max_train_rows=None, unpair=UnpairMode.both, mix=[], cache=False,
                       pair_by_prompt=self.cfg.dataset.pair_by_prompt or needs_pairs(self.cfg))
        return build_splits(data, self.tokenizer, self.cfg.model.use_chat_template,
                            kl_block=self.cfg.trainer.micro_batch_size)[0]

    def check_round(self, folder: Path) -> None:
        """A round written by an earlier attempt is reused only under the settings that made it."""
        written = json.loads((folder / "round.json").read_text()).get("config")
        if written != round_key(self.cfg):
            raise UserError(f"{folder}: written by a run with other model, data, loss, verifier, online or "
                            "trainer seed/batch settings: resume with the run's own settings, or start it afresh")

    def log_round(self, r: int, folder: Path) -> None:
        """Round r's sampling record in metrics.jsonl (split "online", at the round's first step)
        unless an earlier attempt logged it; every finished round's in the summary."""
        if not dist.is_main():
            return
        stats = {k: v for k, v in json.loads((folder / "round.json").read_text()).items() if k != "config"}
        if not any(rec.get("round") == r + 1 for rec in read_metrics(self.run_dir, "online")):
            self.log_metrics(r * self.per_round, "online", stats)
        rounds = [json.loads((self.run_dir / "rounds" / str(k) / "round.json").read_text()) for k in range(1, r + 2)]
        self.summary_extra["rounds"] = [{k: v for k, v in d.items() if k != "config"} for d in rounds]

    def reference_weights(self):
        """online.reference=initial: the initial policy (with LoRA, the base: adapters off; else the
        swap in enter_round); round: the policy as it is at the round's start."""
        initial = self.cfg.online.reference == OnlineReference.initial
        return super().reference_weights() if initial else contextlib.nullcontext()

    @contextlib.contextmanager
    def initial_weights(self):
        """The policy's initial weights in place of its present ones (kept on the CPU meanwhile)."""
        present = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.initial)
        try:
            yield
        finally:
            self.model.load_state_dict(present)


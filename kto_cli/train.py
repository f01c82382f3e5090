"""The training loop: data -> reference pass -> policy steps -> metrics, checkpoints, final/.

    kto-train model=tiny                      # smoke run in seconds
    kto-train                                 # SmolLM2-135M-Instruct on the shipped arithmetic data
"""
import contextlib
import functools
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import distributed as dist
from . import attention, logprobs, objectives
from . import reference as reference_mod
from .backend import DeepSpeedBackend, Policy, TorchBackend, accumulation, ds_config
from .checkpoint import (Diverged, checkpoints, export_final, latest_checkpoint, load_checkpoint, read_state,
                         refuse_changes, save_checkpoint)
from .config import CacheMode, ModelSource, Precision, RunConfig, UnpairMode, UserError, config_digest, fingerprint
from .data import build_splits, collate
from .evaluate import GenerationEval, examples_at, keep_samples, read_samples
from .files import atomic_write
from .logprobs import (Layout, Logps, Runner, completion_logps, completion_logps_and_values, packed_batch,
                       logps_of, packed_logps, prefix_batch, prefix_logps, to_device)
from .losses import kl_estimate
from .metrics import MetricSums, MetricsLog, pair_accuracy, peak_gpu_mb, peak_rss_mb, print_summary
from .trackers import Trackers
from .models import adapters_off, add_lora, load_model, load_tokenizer
from . import preemption as preempt
from .preemption import Preemption
from .reference import open_cache
from .sampling import batch_indices, data_order, length_grouped, total_steps, visited_indices

log = logging.getLogger("kto_cli")


# ---------------------------------------------------------------- set-up helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: Precision):
    enabled = precision == Precision.bf16
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class MicroStep:
    loss: torch.Tensor  # () to backpropagate
    metrics: dict  # name -> 1-D tensor of per-example (or per-batch) values
    tokens: int  # tokens the forward computed (throughput)
    idx: list  # the example indices of the micro-batch (paired: chosen ones, then rejected)
    logps: torch.Tensor  # (B,) their policy log-probs, detached


class Trainer:
    """Holds one run's data, model and optimizer; every loss goes through the same steps, doing
    only the work its objective's Needs (kto_cli/objectives/) ask for."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.deepspeed = cfg.deepspeed.stage is not None
        self.device = pick_device(cfg.trainer.device)
        # under DeepSpeed the engine holds bf16 weights itself; autocast is for plain PyTorch
        self.autocast = autocast_for(self.device, Precision.fp32 if self.deepspeed else cfg.trainer.precision)
        self.show_progress = cfg.trainer.progress
        self.objective = objectives.create(cfg.loss)
        self.need = self.objective.needs
        self.value_head = self.ref = None
        self.reference_report = None
        self.summary_extra = {}  # what a kind of run adds to its summary (online: its rounds)
        self.span = None  # (first step, steps, seed) of the steps training on the present data
        self.bad_steps = []  # the skipped steps in a row, up to the last one
        self.eval_pending = None  # the resumed step, when a signal stopped its evaluation
        # Fault injection for tests: at these steps (1-based) rank 0's loss is NaN.
        self.nan_steps = {int(s) for s in os.environ.get("KTO_CLI_INJECT_NAN", "").split(",") if s}

    def setup(self) -> None:
        cfg, need = self.cfg, self.need
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.trainer.seed)
        self.start_processes()
        self.run_dir = Path(dist.broadcast(str(self.run_dir)))  # rank 0's
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        self.load_inputs()
        self.gen_eval = self.generation_eval()
        self.check_resume()
        self.tracked = self.start_trackers()
        self.model = self.load_model()
        if len(self.tokenizer) > self.model.get_input_embeddings().weight.shape[0]:  # control tokens
            self.model.resize_token_embeddings(len(self.tokenizer))
        if cfg.model.lora.r:
            add_lora(self.model, cfg.model.lora)
        if cfg.trainer.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if need.value_head:
            self.value_head = self.objective.value_head(self.model.config.hidden_size).to(self.device)
        self.layout = self.choose_layout()
        self.steps = self.total_steps()
        policy = Policy(self.model, self.value_head)
        if self.deepspeed:
            self.backend = DeepSpeedBackend(policy, cfg, self.steps, self.ds_config)
            self.model, self.value_head = self.backend.policy.lm, self.backend.policy.value_head
        else:
            self.backend = TorchBackend(policy, cfg, self.steps)
        self.use_data()
        preempt.check(self.run_dir, "after loading the model and the reference log-probs (kept for resuming)")

    def total_steps(self) -> int:
        return total_steps(self.cfg, len(self.units["train"]))

    def use_data(self, span: Optional[tuple] = None, reference_file: str = "reference_logps.safetensors",
                 cache: bool = True) -> None:
        """What training on the train split needs: its batch order, the start-up check (on a run's
        first data) and its reference log-probs (kept in reference_file of the run dir, from the
        shared cache unless cache=False). span: (first step, steps, seed) of the steps that train
        on it, the seed ordering its batches; default: the whole run, the trainer's seed."""
        t = self.cfg.trainer
        first_data = self.span is None
        self.span = span or (0, self.steps, t.seed)
        self.order = length_grouped(self.unit_lengths("train"), t.micro_batch_size * self.world) \
            if t.group_by_length else (None if t.shuffle else data_order)
        if first_data:
            self.check_layout()
        self.ref = self.reference(self.run_dir / reference_file, cache) if self.need.reference else None

    def choose_layout(self) -> Layout:
        """Shared-prompt and packed rows where the model's attention reads their 4D mask exactly;
        separate rows otherwise (trainer.packing=true is refused, being asked for explicitly)."""
        t, m = self.cfg.trainer, self.cfg.model
        kernel = logprobs.attention_kernel(self.model)
        if kernel == "flex_attention" and self.device.type == "cpu":
            raise UserError("model.attn_implementation=flex_attention: PyTorch has no flex-attention backward on "
                            "CPU; train with sdpa or eager there (kto-precompute accepts flex_attention)")
        problem = logprobs.layout_problem(self.model, self.cfg.dataset.max_length)
        pack_problem = logprobs.layout_problem(self.model, self.cfg.dataset.max_length, shared=False)
        if pack_problem and t.packing:
            raise UserError(f"trainer.packing=true needs a custom attention mask, but for this model {pack_problem}: "
                            "set trainer.packing=false")
        # KTO's KL sequence on its prompt's cache needs only a padding mask: flash attention (which
        # applies sliding windows itself) takes it where it takes no shared-prompt row
        prefix = t.shared_prompt and t.kl_prefix and self.need.kl and not self.need.paired and not t.packing \
            and (not problem or kernel.startswith("flash_attention"))
        if problem and t.shared_prompt and not prefix and (self.need.kl or self.need.paired or self.need.reference):
            log.info("trainer.shared_prompt: separate rows instead, since for this model %s", problem)
        # row capacity of packed batches: 0 = the micro-batch's longest sequence group; None = one per row
        layout = Layout(shared_prompt=t.shared_prompt and (not problem or prefix),
                        capacity=(t.pack_length or 0) if t.packing else None, full_logits=not m.sparse_head,
                        head_chunk=0 if self.cfg.deepspeed.stage == 3 else Layout.head_chunk,
                        blocks=t.attention_blocks, kl_prefix=prefix)
        if layout.kl_prefix and t.gradient_checkpointing:  # transformers hands checkpointed layers no cache
            log.info("rows: each example's KL sequence as a separate row without gradient (gradient checkpointing)")
        elif layout.kl_prefix:
            log.info("rows: each example's KL sequence continues its prompt's cached keys and values")
        elif layout.shared_prompt or layout.capacity is not None:
            log.info("rows: %s%s, attention by %s", "shared prompts" if layout.shared_prompt else "separate",
                     ", packed" if layout.capacity is not None else "", attention.form(kernel, layout.blocks))
        return layout

    def check_layout(self) -> None:
        """The start-up self-check: on this rank's first micro-batch, the log-probs training computes
        (its row layout, LM head and attention kernel) equal a plain forward with full logits, else
        the run stops here with one line. fp32 weights are checked in fp32, by the worst sequence;
        bf16 weights (or a kernel that needs half precision) under training's precision, by the
        mean over the batch's tokens, with a looser tolerance."""
        t, need = self.cfg.trainer, self.need
        units = self.units["train"]
        first = units[batch_indices(0, len(units), t.batch_size, self.span[2], self.order)].tolist()
        mine = first[self.rank * t.micro_batch_size:(self.rank + 1) * t.micro_batch_size]
        split = self.splits["train"]
        pairs = [(split.sequence(u[0]), split.sequence(u[1])) if need.paired else
                 (split.sequence(u), split.kl_sequence(u)) if need.kl else (split.sequence(u), None) for u in mine]
        groups = [(a[0], [a[1]] + ([b[1]] if b else [])) for a, b in pairs]
        kernel = logprobs.attention_kernel(self.model)
        loose = next(self.model.parameters()).dtype == torch.bfloat16 or kernel.startswith("flash")
        tolerance = 5e-2 if loose else 1e-3
        layout = self.layout if need.kl or need.paired else replace(
            self.layout, shared_prompt=False, capacity=None if need.per_token else self.layout.capacity)
        self.model.eval()

        def difference(lay: Layout) -> float:
            with self.autocast() if loose else contextlib.nullcontext():
                return max(dist.gather(float(self.backend(logprobs.check_layout, groups, self.pad_id, lay, mean=loose))))
        diff = difference(layout)
        if diff <= tolerance and self.layout.shared_prompt and not (need.kl or need.paired) \
                and ((need.reference and not need.per_token) or not self.cfg.eval.loss_metrics):
            # the reference pass and eval.loss_metrics=false run a prompt once for several completions
            # although this loss does not: check those rows too, an example and its KL partner each
            groups = [(split.sequence(u)[0], [split.sequence(u)[1], split.kl_sequence(u)[1]]) for u in mine]
            layout = replace(self.layout, capacity=None)
            diff = difference(layout)
        if diff <= tolerance:
            log.info("start-up check: log-probs as trained equal a plain forward (difference %.2g nats per token)", diff)
            return
        separate = replace(layout, shared_prompt=False, capacity=None)
        if layout != separate and difference(separate) <= tolerance:
            culprit, fix = "shared-prompt/packed rows", "trainer.shared_prompt=false trainer.packing=false"
        elif not layout.full_logits:
            culprit, fix = "the sparse LM head", "model.sparse_head=false"
        else:
            culprit, fix = f"the {kernel} attention kernel", "another model.attn_implementation"
        raise UserError(f"start-up check: for {self.cfg.model.name_or_path} ({kernel} attention) {culprit} give "
                        f"log-probs {diff:.3g} nats per token away from a plain forward (tolerance {tolerance:g}): "
                        f"set {fix}")

    def start_processes(self) -> None:
        """Ranks from the launcher; under DeepSpeed, the process group and this rank's device."""
        self.rank, local_rank, self.world = dist.env_ranks()
        if not self.deepspeed:
            if self.world > 1:
                raise UserError(f"kto-train runs as {self.world} processes but deepspeed=none trains in one: "
                                "choose a ZeRO config, e.g. deepspeed=zero2")
            return
        from .backend import init_deepspeed_distributed, local_device
        self.ds_config = ds_config(self.cfg, self.world)  # checks the batch sizes before anything loads
        init_deepspeed_distributed(self.cfg.deepspeed.timeout_s)
        mine = config_digest(self.cfg)
        if not all(h == mine for h in dist.gather(mine)):
            raise UserError("the processes composed different configs (different command lines or config "
                            "files per node?); every rank must run the same overrides")
        self.device = local_device(local_rank)
        if self.rank > 0:  # one copy of each info line: rank 0's
            log.setLevel(logging.WARNING)
            self.show_progress = False

    def load_model(self):
        """The policy; under ZeRO-3 a pretrained one is built already sharded (zero.Init through
        transformers' HfDeepSpeedConfig), so a model larger than one device's memory loads."""
        cfg = self.cfg
        if self.deepspeed and cfg.deepspeed.stage == 3 and cfg.deepspeed.zero_init and cfg.model.source != ModelSource.tiny:
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # transformers holds a weak reference
        model = load_model(cfg.model, self.tokenizer)
        return model if self.deepspeed else model.to(self.device)

    def load_inputs(self) -> None:
        """The tokenizer (with the objective's special tokens), the tokenized splits and their units:
        all a run needs before a model loads (kto-precompute, tests)."""
        self.tokenizer = load_tokenizer(self.cfg.model)
        if self.objective.special_tokens():
            self.tokenizer.add_special_tokens({"additional_special_tokens": self.objective.special_tokens()})
        self.pad_id = self.tokenizer.pad_token_id
        self.splits = self.load_data()
        self.units = {name: objectives.units(split, self.need) for name, split in self.splits.items()}

    def generation_eval(self):
        """Held-out prompts and the verifier, checked before any model loads (None without them)."""
        e = self.cfg.eval
        if not e.generate or "eval" not in self.splits:
            return None
        return GenerationEval(self.splits["eval"], self.tokenizer, e.generation, self.cfg.verifier, e.max_prompts)

    def load_data(self) -> dict:
        cfg = self.cfg
        train, held, report = build_splits(cfg.dataset, self.tokenizer, cfg.model.use_chat_template,
                                           kl_block=cfg.trainer.micro_batch_size)
        log.info("data: %s", report)
        if report["skipped_rows"]:
            log.warning("skipped %d bad rows (dataset.skip_bad_rows=true)", report["skipped_rows"])
        objectives.check_data(cfg.loss.name, self.need, train, cfg.dataset.train, cfg.dataset.unpair == UnpairMode.one)
        splits = {"train": train, **({"eval": held} if held is not None else {})}
        self.data_digest = train.digest()
        self.objective.prepare(splits, self.tokenizer, (report["desirable"], report["undesirable"]))
        return splits

    def unit_lengths(self, name: str) -> list:
        """Tokens of each unit (the longer side of a pair)."""
        lengths, units = self.splits[name].lengths(), self.units[name]
        return (lengths[units].max(axis=1) if self.need.paired else lengths[units]).tolist()

    def used_examples(self, name: str) -> list:
        """Example indices that training (all of eval) will use: the reference pass computes only these."""
        if name == "eval":
            return list(range(len(self.splits["eval"])))
        t, units, (_, steps, seed) = self.cfg.trainer, self.units["train"], self.span
        positions = visited_indices(steps, len(units), t.batch_size, seed, self.order)
        return np.unique(units[np.asarray(positions, np.int64)]).tolist()

    def kl_splits(self) -> set:
        """The splits whose examples' KL partners are used: training's for KTO's reference point,
        the held-out one's for its loss metrics."""
        if not self.need.kl:
            return set()
        return {name for name in self.splits if name == "train" or self.cfg.eval.loss_metrics}

    def reference(self, path: Path, cache: bool = True, weights_gone: str = "") -> reference_mod.ReferenceLogps:
        """Reference log-probs of the examples this run uses: from the shared cache where present
        (and cache is true), computed on the model's present weights (the policy's initial ones)
        otherwise. Kept in `path` for resuming. weights_gone: why the present weights are not the
        reference's (a resumed online round): then only `path` can give the values."""
        fp = fingerprint(self.cfg)
        used = {name: (split, self.used_examples(name)) for name, split in self.splits.items()}
        ref = reference_mod.load(path, fp) if self.cfg.trainer.resume else None
        complete = ref is not None and all(not ref.seq(n)[idx].isnan().any() for n, (_, idx) in used.items()) \
            and all(ref.kl(n) is not None and not ref.kl(n)[used[n][1]].isnan().any() for n in self.kl_splits())
        if dist.broadcast(complete):  # every rank decides as rank 0 does
            log.info("reference log-probs: reused %s", path)
            return ref
        if weights_gone:
            raise UserError(f"{path}: missing or without values this run needs, and {weights_gone}: "
                            "resume with the settings the run started with, or start it afresh")
        started = time.perf_counter()
        run = Runner(self.pad_id, self.device, self.autocast, self.cfg.reference.batch_size, self.backend, self.layout)
        with self.reference_weights():
            ref, report = reference_mod.reference_pass(
                lambda: self.model, used, self.kl_splits(), self.need.per_token,
                open_cache(self.cfg, self.tokenizer) if cache else None, run,
                self.show_progress, shard=(self.rank, self.world), exchange=self.world > 1, after_piece=self.after_piece)
        log.info("reference log-probs: %d reused from the cache, %d computed", report["reused"], report["computed"])
        self.reference_report = {**report, "seconds": time.perf_counter() - started}
        if dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            reference_mod.save(ref, path, fp)
        return ref

    def reference_weights(self):
        """The reference's weights in the model during a reference pass: the initial policy's, which
        with LoRA adapters is the base model with the adapters off."""
        return adapters_off(self.model)

    def after_piece(self, done: int, total: int, save) -> None:
        """Between pieces of the reference pass: on a scheduler's signal, the values so far are
        stored (in the cache: a requeued job computes only the rest) and the job stops."""
        preemption = Preemption.active
        if preemption is not None and preemption.requested():
            save()
            kept = "stored in the reference cache" if self.cfg.reference.cache == CacheMode.readwrite else \
                "lost: reference.cache is not readwrite"
            preemption.stop(self.run_dir, f"in the reference pass, {done} of {total} values computed ({kept})")

    def forward(self, name: str, idx: list, kl: bool = False, source: str = "policy") -> tuple:
        """(Logps, tokens in the batch) of examples idx of split `name`, or of their KL sequences.
        source="reference" reads the pre-pass instead of running the model (the policy before its
        first step is the reference)."""
        split = self.splits[name]
        seqs = [split.kl_sequence(i) if kl else split.sequence(i) for i in idx]
        if source == "reference":
            lengths = torch.tensor([len(c) - (not p) for p, c in seqs], device=self.device)  # tokens scored
            values = self.ref.kl(name) if kl else self.ref.seq(name)
            return Logps(seq=values[idx].to(self.device), lengths=lengths), 0
        want_tokens, layout = not kl and self.need.per_token, self.layout
        with self.autocast(), (torch.no_grad() if kl else contextlib.nullcontext()):
            if self.layout.capacity is not None and not want_tokens:
                packed = to_device(packed_batch([(p, [c]) for p, c in seqs], self.pad_id, self.layout.capacity),
                                   self.device)
                slots = self.backend(packed_logps, packed, grad_slots=() if kl else (0,), layout=layout)
                return slots[0], packed["slot_tokens"][0]
            batch = {k: v.to(self.device) for k, v in collate(seqs, self.pad_id).items()}
            if want_tokens and self.need.value_head:
                lp = self.backend(completion_logps_and_values, batch, self.value_head, layout)
            else:
                lp = self.backend(completion_logps, batch, per_token=want_tokens, layout=layout)
        return lp, int(batch["attention_mask"].sum())

    def shared_forward(self, name: str, idx: list) -> tuple:
        """One forward for two sequences per unit, sharing their prompt's computation
        (logprobs.packed_batch): KTO's example + KL sequence (the KL one without gradient; by default
        on the prompt's cached keys and values, logprobs.prefix_logps), or a pair's chosen + rejected
        (truncation keeps a prompt's tokens the same for all its completions). Returns (Logps of idx
        in order, KL log-probs or None, tokens)."""
        split, paired = self.splits[name], self.need.paired
        if paired:
            P = len(idx) // 2
            units = [(split.sequence(c), split.sequence(r)) for c, r in zip(idx[:P], idx[P:])]
        else:
            units = [(split.sequence(i), split.kl_sequence(i)) for i in idx]
        if self.layout.kl_prefix:
            batch = to_device(prefix_batch([a for a, _ in units], [b[1] for _, b in units], self.pad_id), self.device)
            with self.autocast():
                lp, kl = self.backend(prefix_logps, batch, layout=self.layout)
            return lp, kl, int(batch["attention_mask"].sum())
        packed = to_device(packed_batch([(a[0], [a[1], b[1]]) for a, b in units], self.pad_id, self.layout.capacity),
                           self.device)
        with self.autocast():
            first, second = self.backend(packed_logps, packed, grad_slots=(0, 1) if paired else (0,),
                                         layout=self.layout)
        tokens = sum(packed["slot_tokens"]) if paired else packed["slot_tokens"][0]  # as two separate batches
        if paired:
            return Logps(seq=torch.cat([first.seq, second.seq]), lengths=torch.cat([first.lengths, second.lengths])), \
                None, tokens
        return first, second.seq, tokens

    def micro_step(self, name: str, units: list, source: str = "policy", across_ranks: bool = True) -> "MicroStep":
        """One micro-batch's loss and metrics (and what evaluation and throughput need of it).
        across_ranks: this micro-batch is one of every rank's in this accumulation round, and
        cross-rank statistics (KTO's KL estimate, token counts) sum over all of them."""
        need, ref = self.need, self.ref
        idx = [u[0] for u in units] + [u[1] for u in units] if need.paired else list(units)
        sharable = self.layout.shared_prompt and source == "policy" and (need.kl or need.paired) and not need.per_token
        kl, shared = None, self.shared_forward(name, idx) if sharable else None
        reduce, ranks = (dist.all_sum, self.world) if across_ranks else (objectives.single_process, 1)
        if need.kl:  # the KTO reference point, from the examples' KL partners, without gradient
            kl_logps = shared[1] if shared else self.forward(name, idx, kl=True, source=source)[0].seq  # (B,)
            kl_ratio = kl_logps - ref.kl(name)[idx].to(self.device)  # (B,)
            total = reduce(torch.stack([kl_ratio.sum().float(), torch.tensor(float(len(idx)), device=self.device)]))  # (2,)
            kl = kl_estimate(total[0], total[1])
        lp, tokens = (shared[0], shared[2]) if shared else self.forward(name, idx, source=source)
        ref_logps = {}
        if need.reference:
            ref_logps["seq"] = ref.seq(name)[idx].to(self.device)
            if need.per_token:
                ref_logps["tokens"] = ref.tokens(name)[idx].to(self.device)
        desirable = self.splits[name].desirable(idx).to(self.device)
        loss, metrics = self.objective.loss(objectives.LossInputs(lp, ref_logps, desirable, kl, lp.values, reduce, ranks))
        return MicroStep(loss, metrics, tokens, idx, lp.seq.detach())

    def optimizer_step(self, step: int) -> dict:
        """One optimizer step on the global batch: with W ranks and micro-batches of m units, round k
        of the accumulation gives rank r units [(kW + r)m, (kW + r + 1)m) of it, so a run with W
        ranks computes what one process with micro-batches of W*m computes."""
        t, units, (first, _, seed) = self.cfg.trainer, self.units["train"], self.span
        self.model.train()
        batch = units[batch_indices(step - first, len(units), t.batch_size, seed, self.order)].tolist()
        accum, m = accumulation(self.cfg, self.world), t.micro_batch_size
        sums, tokens, start, lr = MetricSums(), 0, time.perf_counter(), self.backend.lr()
        for k in range(accum):
            lo = (k * self.world + self.rank) * m
            micro = self.micro_step("train", batch[lo:lo + m])
            if step + 1 in self.nan_steps and dist.is_main():
                micro.loss, micro.metrics["loss"] = micro.loss * math.nan, micro.metrics["loss"] * math.nan
            # a loss of inf can have finite gradients: made NaN, the step is surely skipped
            self.backend.backward(micro.loss if torch.isfinite(micro.loss) else micro.loss * math.nan, accum)
            sums.add(micro.metrics)
            tokens += micro.tokens
        grad_norm, applied = self.backend.step()
        tokens = float(dist.all_sum(torch.tensor(float(tokens))))
        out = sums.means(across_ranks=True)
        elapsed = time.perf_counter() - start
        skipped = {} if dist.all_max(int(not applied)) == 0 else {"skipped": 1.0}  # every rank agrees
        return {**out, "grad_norm": grad_norm, "lr": lr, "tokens/s": tokens / elapsed, **skipped}

    def check_finite(self, done: int, metrics: dict) -> None:
        """After a step: a skipped one gets a line; trainer.max_bad_steps of them in a row stop the run."""
        if "skipped" not in metrics:
            self.bad_steps = []
            return
        self.bad_steps.append(done)
        log.warning("step %d: loss=%s, grad_norm=%s, skipped (%d in a row)", done, f"{metrics.get('loss', math.nan):.4g}",
                    f"{metrics['grad_norm']:.4g}", len(self.bad_steps))
        if len(self.bad_steps) >= self.cfg.trainer.max_bad_steps:
            raise Diverged(f"steps {self.bad_steps[0]}-{done}: {len(self.bad_steps)} in a row with a non-finite loss "
                           f"or gradient (trainer.max_bad_steps={self.cfg.trainer.max_bad_steps})", self.run_dir)

    @torch.no_grad()
    def evaluate(self, step: int, initial: bool = False) -> dict:
        """The loss and its metrics on the held-out split (eval.loss_metrics), how often the chosen
        completion beats the rejected one, by implicit reward (losses with a reference) and by
        log-prob, and what the model answers to the held-out prompts, scored by the verifier
        (samples.jsonl). Before training the policy is the reference, so where the pre-pass has its
        log-probs no forward pass is needed."""
        split = self.splits["eval"]
        source = "reference" if initial and self.ref is not None and not self.need.value_head else "policy"
        self.model.eval()
        # the loss needs reference values (an online round without usable answers has none yet)
        with_loss = self.cfg.eval.loss_metrics and (self.ref is not None or not self.need.reference)
        out, logps = self.eval_loss(source) if with_loss else ({}, self.eval_logps(source))
        scores = {"logps/accuracies": logps}
        if self.ref is not None and "rewards/accuracies" not in out:
            scores["rewards/accuracies"] = logps - self.ref.eval
        for key, score in scores.items():
            acc = pair_accuracy(split, score)
            if acc is not None:
                out[key] = acc
        return out if initial and not self.cfg.eval.before_training else out | self.evaluate_generation(step)

    def eval_loss(self, source: str) -> tuple:
        """(The loss's metrics, (N,) log-probs of every held-out example), micro-batch by micro-batch."""
        split, units, bs = self.splits["eval"], self.units["eval"], self.cfg.trainer.eval_batch_size
        sums, logps = MetricSums(), torch.full((len(split),), float("nan"))
        for start in range(0, len(units), bs):
            micro = self.micro_step("eval", units[start:start + bs].tolist(), source, across_ranks=False)
            sums.add(micro.metrics)
            logps[micro.idx] = micro.logps.float().cpu()
        missing = logps.isnan().nonzero().squeeze(1).tolist()  # e.g. the rejected side, for sft
        for start in range(0, len(missing), bs):
            idx = missing[start:start + bs]
            logps[idx] = self.forward("eval", idx, source=source)[0].seq.float().cpu()
        return sums.means(), logps

    def eval_logps(self, source: str) -> torch.Tensor:
        """(N,) log-probs of every held-out example, as the reference pass computes them: a prompt
        once for all its completions (a pair's two sides), no KL partners, no loss."""
        if source == "reference":
            return self.ref.eval.clone()
        split = self.splits["eval"]
        run = Runner(self.pad_id, self.device, self.autocast, self.cfg.trainer.eval_batch_size, self.backend,
                     self.layout)
        return logps_of(self.model, [split.sequence(i) for i in range(len(split))], run)[0]

    def evaluate_generation(self, step: int) -> dict:
        """eval/gen/*: every rank generates the same answers (under ZeRO-3 in step, each forward
        gathering the shards); rank 0 writes them."""
        if self.gen_eval is None:
            return {}
        synced = self.world > 1 and self.cfg.deepspeed.stage == 3
        with self.autocast():
            return self.gen_eval(self.model, step, self.run_dir / "samples.jsonl", synced=synced,
                                 between_batches=self.eval_interruptible(step))

    def eval_interruptible(self, step: int):
        """Where a scheduler's signal may stop an evaluation part-way (None: it runs to its end): the
        one before training (nothing to keep yet), one between steps (its step's checkpoint is
        written, marked so that the resumed run evaluates first) and the final one (its checkpoint
        is written)."""
        preemption, final = Preemption.active, step == self.steps and step > 0
        if preemption is None or (final and not self.cfg.trainer.final_checkpoint):
            return None

        def check():
            if not preemption.requested():
                return
            if 0 < step < self.steps:
                self.stop(step, preemption, saved=self.eval_pending == step, eval_pending=True)
            if self.metrics_log is not None:
                self.metrics_log.close()
            preemption.stop(self.run_dir, "in the final evaluation; the final checkpoint is kept" if final
                            else "in the evaluation before training", self.steps if final else None)
        return check

    # ---------------------------------------------------------------- the run

    def train(self, started: float, sft_phase: Optional[dict] = None) -> dict:
        """Evaluate, train from the resumed step to the end (stopping cleanly on a scheduler's
        signal), evaluate again, export; the summary (with that of the job's SFT phase, if any)."""
        start_step = self.resume()
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", start_step, self.tracked) if dist.is_main() else None
        if dist.is_main():  # samples past the checkpoint are about to be made again
            keep_samples(self.run_dir / "samples.jsonl", start_step)
        last, first_step_at = {}, time.perf_counter()
        with tqdm(total=self.steps, initial=start_step, desc=self.cfg.loss.name, unit="step",
                  disable=not self.show_progress) as bar, Preemption() as preemption:
            self.ready(start_step, preemption)  # (an online round's data and reference values)
            if self.eval_pending is not None:  # the evaluation a signal stopped, before this run's first step
                self.log_metrics(start_step, "eval", self.evaluate(start_step))
            before = self.evaluate_before(start_step)
            preemption.check(self.run_dir, "after the evaluation before training")
            for step in range(start_step, self.steps):
                if not self.ready(step, preemption):  # nothing to train on: evaluation and checkpoints go on
                    bar.update(1)
                    self.after_step(step + 1, {}, preemption)
                    continue
                last = self.optimizer_step(step)
                self.check_finite(step + 1, last)
                bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "kl", "rewards/margins") if k in last})
                bar.update(1)
                self.after_step(step + 1, last, preemption)
        return self.finish(before, last, time.perf_counter() - first_step_at, started, sft_phase)

    def start_trackers(self) -> Optional[Trackers]:
        """logger=...: the trackers beside metrics.jsonl (rank 0's), given the resolved config; one
        that cannot start stops every rank with rank 0's line."""
        tracked, error = None, None
        if dist.is_main():
            try:
                tracked = Trackers(self.run_dir, self.cfg.logger,
                                   OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True))
            except UserError as e:
                error = e
        if dist.all_max(int(error is not None)):
            raise error or UserError("logger: a tracker could not start on rank 0 (its line is in rank 0's log)")
        return tracked

    def ready(self, step: int, preemption: Preemption) -> bool:
        """Before a step: whether it trains (online rounds make their data here; on a signal while
        they do, that step's checkpoint is written and the run stops)."""
        return True

    def resume(self) -> int:
        """The step to start from: 0, or that of the checkpoint trainer.resume names (auto: the
        newest one that loads; a damaged one is a warning and the one before it is tried)."""
        t = self.cfg.trainer
        if not t.resume:
            return 0
        paths = dist.broadcast(self.resume_candidates())  # rank 0's view
        if not paths:
            log.info("trainer.resume=auto: no checkpoint in %s, starting from step 0", self.run_dir)
            return 0
        for k, path in enumerate(paths):
            error = None
            try:
                step = load_checkpoint(path, self.backend, self.identity(), t.resume_force)
            except UserError:
                raise
            except Exception as e:  # truncated or corrupted files
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not dist.all_max(int(error is not None)):  # every rank loaded it
                log.info("resumed from %s at step %d", path, step)
                self.eval_pending = step if read_state(path).get("eval_pending") else None
                return step
            if k + 1 == len(paths):
                raise UserError(f"{path}: damaged ({error or 'on another rank'}) and no earlier checkpoint to resume from")
            log.warning("%s is damaged (%s); resuming from %s instead", path, error or "on another rank", paths[k + 1])

    def check_resume(self) -> None:
        """Before the model loads: a checkpoint to resume written under other settings is one line
        now, not after the model and the reference pass (a damaged one is left to resume())."""
        paths = self.resume_candidates()
        if not paths or self.cfg.trainer.resume_force:
            return
        try:
            state = read_state(paths[0])
        except Exception:  # unreadable: resume() falls back to an earlier checkpoint
            return
        refuse_changes(paths[0], state, self.identity())

    def resume_candidates(self) -> list:
        """The checkpoints trainer.resume names, newest first (auto: all of this run's)."""
        t = self.cfg.trainer
        return checkpoints(self.run_dir) if t.resume == "auto" else [Path(t.resume)] if t.resume else []

    def identity(self) -> dict:
        """What a checkpoint records and a resume compares (kto_cli/checkpoint.py changes())."""
        config = OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True)
        return {"config": config, "fingerprint": fingerprint(self.cfg), "data": self.data_digest,
                "world": self.world, "stage": self.cfg.deepspeed.stage}

    def evaluate_before(self, start_step: int) -> dict:
        """Held-out metrics of the initial policy; a resumed run reads them from its log."""
        if start_step > 0:
            return MetricsLog.first_in(self.run_dir / "metrics.jsonl", "eval")
        free = self.ref is not None and not self.need.value_head  # the pre-pass holds the initial log-probs
        wanted = self.cfg.eval.before_training or free
        before = self.evaluate(0, initial=True) if "eval" in self.splits and wanted else {}
        self.log_metrics(0, "eval", before)
        return before

    def log_metrics(self, step: int, split: str, metrics: dict) -> None:
        if metrics and self.metrics_log is not None:
            self.metrics_log.write(step, split, metrics)

    def after_step(self, done: int, metrics: dict, preemption: Preemption) -> None:
        """Log, evaluate and checkpoint on their intervals; on a scheduler's signal, checkpoint and stop."""
        t, final = self.cfg.trainer, done == self.steps
        if done % t.log_every == 0 or final:
            self.log_metrics(done, "train", metrics)
        if self.eval_due(done) and not final and "eval" in self.splits:
            self.log_metrics(done, "eval", self.evaluate(done))
        saved = bool(t.save_every and done % t.save_every == 0 and not final)
        if saved:
            save_checkpoint(self.run_dir, done, self.backend, self.identity(), self.cfg.trainer.keep_checkpoints)
        if preemption.requested() and not final:
            self.stop(done, preemption, saved)

    def eval_due(self, done: int) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(every and done % every == 0)

    def stop(self, done: int, preemption: Preemption, saved: bool = False, eval_pending: bool = False) -> None:
        """On a scheduler's signal: the checkpoint of step `done` (unless saved), then Preempted.
        eval_pending: the signal came in step `done`'s evaluation, which the resumed run does first."""
        path = self.run_dir / "checkpoints" / f"step_{done:07d}"
        if not saved:
            path = save_checkpoint(self.run_dir, done, self.backend, {**self.identity(), "eval_pending": eval_pending},
                                   self.cfg.trainer.keep_checkpoints)
        if self.metrics_log is not None:
            self.metrics_log.close()
        when = f"in the evaluation after step {done}" if eval_pending else f"after step {done}"
        preemption.stop(self.run_dir, f"{when}; checkpoint {path}", done)

    def finish(self, before: dict, last: dict, train_time: float, started: float,
               sft_phase: Optional[dict] = None) -> dict:
        """The final checkpoint, evaluation and final/, and the summary. A signal that came during
        the last step stops the run with the final checkpoint (resuming, it evaluates and exports);
        one that comes later lets the job finish (the rest is the evaluation's log and the export)."""
        preemption = Preemption.active
        if preemption is not None and preemption.requested():
            self.stop(self.steps, preemption)
        if self.cfg.trainer.final_checkpoint:  # before the evaluation: a job killed during it keeps the steps
            save_checkpoint(self.run_dir, self.steps, self.backend, self.identity(), self.cfg.trainer.keep_checkpoints)
        after = self.evaluate(self.steps) if "eval" in self.splits else {}
        self.log_metrics(self.steps, "eval", after)
        if self.metrics_log is not None:
            self.metrics_log.close()
        self.objective.export(self.tokenizer)
        lora = self.cfg.model.lora
        export_final(self.run_dir, self.backend, self.model, self.tokenizer, lora if lora.r else None,
                     self.cfg.model.name_or_path)
        ref = self.reference_report or {}
        samples = read_samples(self.run_dir / "samples.jsonl") if dist.is_main() else []
        summary = {"steps": self.steps, "train_seconds": train_time, "wall_seconds": time.perf_counter() - started,
                   "reference_seconds": ref.get("seconds", 0.0), "reference": ref, "processes": self.world,
                   "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), "last_train": last,
                   "eval_before": before, "eval_after": after,
                   "examples_before": examples_at(samples, 0), "examples_after": examples_at(samples, self.steps)}
        if sft_phase:
            summary["sft_phase"] = sft_phase
        summary |= self.summary_extra
        if dist.is_main():
            atomic_write(self.run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        return summary

    def cleanup(self) -> None:
        """Drops the model, optimizer and reference values (between phases of one job)."""
        self.model = self.backend = self.ref = self.value_head = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sft_phase(cfg: RunConfig) -> RunConfig:
    """The run's SFT phase (trainer.sft_steps): loss=sft for that many steps, resumed with the run."""
    t = cfg.trainer
    return replace(cfg, loss=objectives.sft.SFTLossConfig(),
                   trainer=replace(t, max_steps=t.sft_steps, sft_steps=0, resume="auto" if t.resume else None))


def finished_phase(cfg: RunConfig, folder: Path) -> Optional[dict]:
    """The summary of a phase that a resumed job finished before it stopped (its final/ and summary
    written under this config), else None: it runs (again)."""
    if not (cfg.trainer.resume and (folder / "summary.json").is_file() and (folder / "final").is_dir()):
        return None
    saved = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    now = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    saved["trainer"]["resume"] = now["trainer"]["resume"] = None  # the first attempt ran without resume
    if saved != now:
        return None
    log.info("%s: finished before the job stopped, kept", folder)
    return json.loads((folder / "summary.json").read_text())


def from_model(cfg: RunConfig, folder: Path) -> RunConfig:
    """The run's loss phase: the same config, training (and taking its reference) from `folder`."""
    model = replace(cfg.model, source=ModelSource.hf, name_or_path=str(folder), gguf_file=None, revision=None)
    return replace(cfg, model=model, trainer=replace(cfg.trainer, sft_steps=0))


def train(cfg: RunConfig, run_dir: Path) -> dict:
    """Runs the whole job in run_dir (rank 0's, under several processes): its SFT phase in
    run_dir/sft when trainer.sft_steps asks for one, then the loss: on the dataset, or with
    online.prompts, in rounds on the policy's own answers (kto_cli/online.py). Returns the summary it also
    writes to summary.json. Only rank 0 writes logs, the summary and final/."""
    with Preemption():  # from here to the end, a scheduler's signal stops the job where it can resume
        started, first = time.perf_counter(), None
        if cfg.trainer.sft_steps:
            first = finished_phase(sft_phase(cfg), run_dir / "sft")
            if first is None:
                phase = Trainer(sft_phase(cfg), run_dir / "sft")
                phase.setup()
                first = phase.train(started)
                phase.cleanup()
                preempt.check(run_dir, "after the SFT phase (its final/ is kept)")
            first = {k: first[k] for k in ("steps", "train_seconds", "eval_before", "eval_after",
                                            "examples_before", "examples_after")} | {"run_dir": str(run_dir / "sft")}
            cfg = from_model(cfg, run_dir / "sft" / "final")
        from .online import OnlineTrainer  # it builds on Trainer
        tr = (OnlineTrainer if cfg.online.prompts else Trainer)(cfg, run_dir)
        tr.setup()
        summary = tr.train(started, first)
    if dist.is_main():
        print_summary(summary, tr.run_dir)
    return summary

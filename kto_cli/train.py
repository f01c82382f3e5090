"""The training loop: data -> reference pass -> policy steps -> metrics, checkpoints, final/.

    kto-train model=tiny                      # smoke run in seconds
    kto-train                                 # SmolLM2-135M-Instruct on the shipped arithmetic data
"""
import contextlib
import functools
import hashlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from . import distributed as dist
from . import logprobs, objectives
from . import reference as reference_mod
from .backend import DeepSpeedBackend, Policy, TorchBackend, accumulation, ds_config
from .checkpoint import export_final, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import CacheMode, KTOLossConfig, ModelSource, Precision, RunConfig, UnpairMode, UserError
from .data import Split, build_splits, collate
from .logprobs import Layout, Logps, completion_logps, packed_batch, packed_logps, to_device
from .losses import kl_estimate, pair_wins
from .models import cache_root, load_model, load_tokenizer, model_key
from .refcache import RefCache

log = logging.getLogger("kto_cli")

# The KTO paper's recommended range for lambda_D * n_D / (lambda_U * n_U).
KTO_WEIGHT_RANGE = (1.0, 4.0 / 3.0)


# ---------------------------------------------------------------- set-up helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: Precision):
    enabled = precision == Precision.bf16
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def kto_weights(loss: KTOLossConfig, n_desirable: int, n_undesirable: int) -> tuple:
    """(lambda_D, lambda_U), with lambda_D set from the data when asked; warns outside the paper's range."""
    w_d, w_u = loss.desirable_weight, loss.undesirable_weight
    if n_desirable == 0 or n_undesirable == 0:
        log.warning("training data has %d desirable and %d undesirable examples; KTO learns best from both",
                    n_desirable, n_undesirable)
        return w_d, w_u
    if loss.auto_desirable_weight:
        w_d = w_u * n_undesirable / n_desirable
        log.info("loss.auto_desirable_weight: lambda_D = %.4f (lambda_U = %.4f)", w_d, w_u)
    ratio = w_d * n_desirable / (w_u * n_undesirable)
    if not KTO_WEIGHT_RANGE[0] - 1e-9 <= ratio <= KTO_WEIGHT_RANGE[1] + 1e-9:
        lo, hi = (w_u * n_undesirable / n_desirable * r for r in KTO_WEIGHT_RANGE)
        log.warning("lambda_D*n_D/(lambda_U*n_U) = %.3f is outside [1, 4/3], the range the KTO paper recommends "
                    "(n_D=%d, n_U=%d): set loss.desirable_weight between %.3f and %.3f, or "
                    "loss.auto_desirable_weight=true", ratio, n_desirable, n_undesirable, lo, hi)
    return w_d, w_u


def total_steps(cfg: RunConfig, n_train: int) -> int:
    t = cfg.trainer
    return t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * n_train / t.batch_size))


def batch_indices(step: int, n: int, batch_size: int, seed: int, order=None) -> list:
    """The units of an optimizer step: a stream of per-epoch orders (order(n, seed, epoch), a seeded
    shuffle by default) that depends only on the seed, so a resumed run sees the same batches."""
    order = order or epoch_permutation
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(order(n, seed, epoch)[k])
    return out


def visited_indices(steps: int, n: int, batch_size: int, seed: int, order=None) -> list:
    """Every unit some step of the run will use, sorted."""
    if steps * batch_size >= n:
        return range(n)
    return sorted(set((order or epoch_permutation)(n, seed, 0)[: steps * batch_size]))


def data_order(n: int, seed: int, epoch: int) -> list:
    """trainer.shuffle=false: every epoch in data order."""
    return list(range(n))


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped(lengths: list, batch_size: int, span: int = 64):
    """An epoch order in which each batch holds units of similar length (less padding): the seeded
    shuffle is cut into blocks of span batches, each block sorted by length and cut into batches,
    and the batches shuffled again, so long batches do not all come last."""
    @functools.lru_cache(maxsize=4)
    def order(n: int, seed: int, epoch: int) -> list:
        perm = epoch_permutation(n, seed, epoch)
        block = batch_size * span
        batches = []
        for start in range(0, n, block):
            chunk = sorted(perm[start:start + block], key=lambda i: lengths[i])
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
    return order


def open_cache(cfg: RunConfig, tokenizer) -> Optional[RefCache]:
    """The shared reference cache for this model and precision (None with reference.cache=off)."""
    r = cfg.reference
    if r.cache == CacheMode.off:
        return None
    root = Path(r.cache_dir) if r.cache_dir else cache_root() / "reference"
    key = model_key(cfg.model, len(tokenizer), precision_tag(cfg))
    return RefCache(root, key, objectives.needs(cfg.loss.name).per_token, writable=r.cache == CacheMode.readwrite)


def precision_tag(cfg: RunConfig) -> str:
    """How the reference values were computed: bf16 autocast over fp32 weights (plain PyTorch) and
    bf16 weights (DeepSpeed) give different numbers."""
    p = cfg.trainer.precision.value
    return f"{p}-weights" if cfg.deepspeed.stage is not None and cfg.trainer.precision == Precision.bf16 else p


def config_digest(cfg: RunConfig, groups: tuple = ()) -> str:
    """A hash of the config (of only these groups, when given)."""
    keep = {k: v for k, v in asdict(cfg).items() if not groups or k in groups}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg: RunConfig) -> str:
    """What a checkpoint must agree with to be resumed (not the step counts or logging)."""
    return config_digest(cfg, ("model", "dataset", "loss"))


# ---------------------------------------------------------------- metrics

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


def pair_accuracy(split: Split, scores: torch.Tensor) -> Optional[float]:
    """Share of held-out pairs whose chosen completion scores above the rejected one (ties: 1/2)."""
    pairs = split.pairs()
    if not pairs:
        return None
    return float(pair_wins(scores[[p[0] for p in pairs]], scores[[p[1] for p in pairs]]).mean())


# ---------------------------------------------------------------- the steps

def logps_and_values(lm, batch: dict, value_head, full_logits: bool = False) -> Logps:
    """ppo: per-token log-probs and the value head on the hidden states that predicted them, in
    one forward (under ZeRO-3 the value head must run inside the engine's forward too)."""
    lp = completion_logps(lm, batch, per_token=True, hidden=True, full_logits=full_logits)
    lp.values = value_head(lp.hidden.float()).squeeze(-1)  # (B, L)
    return lp


class Trainer:
    """Holds one run's data, model and optimizer; every loss goes through the same steps, doing
    only the work its Needs (kto_cli/objectives.py) ask for."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.deepspeed = cfg.deepspeed.stage is not None
        self.device = pick_device(cfg.trainer.device)
        # under DeepSpeed the engine holds bf16 weights itself; autocast is for plain PyTorch
        self.autocast = autocast_for(self.device, Precision.fp32 if self.deepspeed else cfg.trainer.precision)
        self.show_progress = cfg.trainer.progress
        self.need = objectives.needs(cfg.loss.name)
        self.value_head = None
        self.reference_report = None

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
        self.tokenizer = load_tokenizer(cfg.model)
        if need.control_tokens:
            self.tokenizer.add_special_tokens({"additional_special_tokens": [cfg.loss.good_token, cfg.loss.bad_token]})
        self.pad_id = self.tokenizer.pad_token_id
        self.splits = self.load_data()
        self.units = {name: objectives.units(split, need) for name, split in self.splits.items()}
        self.params = objectives.hyperparameters(cfg.loss)
        if isinstance(cfg.loss, KTOLossConfig):
            self.params["desirable_weight"], self.params["undesirable_weight"] = kto_weights(cfg.loss, *self.label_counts)
        self.model = self.load_model()
        if len(self.tokenizer) > self.model.get_input_embeddings().weight.shape[0]:  # control tokens
            self.model.resize_token_embeddings(len(self.tokenizer))
        if cfg.trainer.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if need.value_head:
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 1).to(self.device)
        self.layout = self.choose_layout()
        self.order = length_grouped(self.unit_lengths("train"), cfg.trainer.micro_batch_size * self.world) \
            if cfg.trainer.group_by_length else (None if cfg.trainer.shuffle else data_order)
        self.steps = total_steps(cfg, len(self.units["train"]))
        policy = Policy(self.model, self.value_head)
        if self.deepspeed:
            self.backend = DeepSpeedBackend(policy, cfg, self.steps, self.ds_config)
            self.model, self.value_head = self.backend.policy.lm, self.backend.policy.value_head
        else:
            self.backend = TorchBackend(policy, cfg, self.steps)
        self.check_layout()
        self.ref = self.reference() if need.reference else None

    def choose_layout(self) -> Layout:
        """Shared-prompt and packed rows where the model's attention reads their 4D mask exactly;
        separate rows otherwise (trainer.packing=true is refused, being asked for explicitly)."""
        t, m = self.cfg.trainer, self.cfg.model
        kernel = logprobs.attention_kernel(self.model)
        if kernel == "flex_attention" and self.device.type == "cpu":
            raise UserError("model.attn_implementation=flex_attention: PyTorch has no flex-attention backward on "
                            "CPU; train with sdpa or eager there (kto-precompute accepts flex_attention)")
        problem = logprobs.layout_problem(self.model, self.cfg.dataset.max_length)
        if problem and t.packing:
            raise UserError(f"trainer.packing=true needs a custom attention mask, but for this model {problem}: "
                            "set trainer.packing=false")
        if problem and t.shared_prompt and (self.need.kl or self.need.paired or self.need.reference):
            log.info("trainer.shared_prompt: separate rows instead, since for this model %s", problem)
        # row capacity of packed batches: 0 = the micro-batch's longest sequence group; None = one per row
        return Layout(shared_prompt=t.shared_prompt and not problem,
                      capacity=(t.pack_length or 0) if t.packing else None, full_logits=not m.sparse_head)

    def check_layout(self) -> None:
        """The start-up self-check: on this rank's first micro-batch, the log-probs training computes
        (its row layout, LM head and attention kernel) equal a plain forward with full logits, else
        the run stops here with one line. fp32 weights are checked in fp32, by the worst sequence;
        bf16 weights (or a kernel that needs half precision) under training's precision, by the
        mean over the batch's tokens, with a looser tolerance."""
        t, need = self.cfg.trainer, self.need
        units = self.units["train"]
        first = [units[p] for p in batch_indices(0, len(units), t.batch_size, t.seed, self.order)]
        mine = first[self.rank * t.micro_batch_size:(self.rank + 1) * t.micro_batch_size]
        split = self.splits["train"]
        pairs = [(split.sequence(u[0]), split.sequence(u[1])) if need.paired else
                 (split.sequence(u), split.kl_sequence(u)) if need.kl else (split.sequence(u), None) for u in mine]
        groups = [(a[0], [a[1]] + ([b[1]] if b else [])) for a, b in pairs]
        kernel = logprobs.attention_kernel(self.model)
        loose = next(self.model.parameters()).dtype == torch.bfloat16 or kernel.startswith("flash")
        tolerance = 5e-2 if loose else 1e-3
        layout = self.layout if need.kl or need.paired else Layout(
            False, None if need.per_token else self.layout.capacity, self.layout.full_logits)
        self.model.eval()

        def difference(lay: Layout) -> float:
            with self.autocast() if loose else contextlib.nullcontext():
                return max(dist.gather(float(self.backend(logprobs.check_layout, groups, self.pad_id, lay, mean=loose))))
        diff = difference(layout)
        if diff <= tolerance:
            log.info("start-up check: log-probs as trained equal a plain forward (difference %.2g nats per token)", diff)
            return
        separate = Layout(False, None, layout.full_logits)
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
        init_deepspeed_distributed()
        mine = config_digest(self.cfg)
        if not all(h == mine for h in dist.gather(mine)):
            raise UserError("the processes composed different configs (different command lines or config "
                            "files per node?); every rank must run the same overrides")
        self.device = local_device(local_rank)
        if self.cfg.deepspeed.stage == 3:  # the LM head's calls may not depend on a rank's data
            logprobs.HEAD_CHUNK = 0
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

    def load_data(self) -> dict:
        cfg = self.cfg
        train, held, report = build_splits(cfg.dataset, self.tokenizer, cfg.model.use_chat_template,
                                           kl_block=cfg.trainer.micro_batch_size)
        log.info("data: %s", report)
        if report["skipped_rows"]:
            log.warning("skipped %d bad rows (dataset.skip_bad_rows=true)", report["skipped_rows"])
        objectives.check_data(cfg.loss.name, self.need, train, cfg.dataset.train, cfg.dataset.unpair == UnpairMode.one)
        self.label_counts = (report["desirable"], report["undesirable"])
        if self.need.control_tokens:
            good, bad = self.tokenizer.convert_tokens_to_ids([cfg.loss.good_token, cfg.loss.bad_token])
            train.add_control_tokens(good, bad)
            if held is not None:
                held.add_control_tokens(good, None)  # evaluated as sampled: conditioned on "good"
        return {"train": train, **({"eval": held} if held is not None else {})}

    def unit_lengths(self, name: str) -> list:
        """Tokens of each unit (the longer side of a pair)."""
        split = self.splits[name]
        size = lambda i: sum(map(len, split.sequence(i)))  # noqa: E731
        return [max(size(u[0]), size(u[1])) if self.need.paired else size(u) for u in self.units[name]]

    def used_examples(self, name: str) -> list:
        """Example indices that training (all of eval) will use: the reference pass computes only these."""
        if name == "eval":
            return list(range(len(self.splits["eval"])))
        t, units = self.cfg.trainer, self.units["train"]
        positions = visited_indices(self.steps, len(units), t.batch_size, t.seed, self.order)
        return sorted({i for p in positions for i in (units[p] if self.need.paired else (units[p],))})

    def reference(self) -> reference_mod.ReferenceLogps:
        """Reference log-probs of the examples this run uses: from the shared cache where present,
        computed on the policy's initial weights otherwise. Kept in the run dir for resuming."""
        path = self.run_dir / "reference_logps.safetensors"
        fp = fingerprint(self.cfg)
        used = {name: (split, self.used_examples(name)) for name, split in self.splits.items()}
        ref = reference_mod.load(path, fp) if self.cfg.trainer.resume else None
        complete = ref is not None and all(not ref.get(n)[idx].isnan().any() for n, (_, idx) in used.items())
        if dist.broadcast(complete):  # every rank decides as rank 0 does
            log.info("reference log-probs: reused %s", path)
            return ref
        started = time.perf_counter()
        ref, report = reference_mod.reference_pass(
            lambda: self.model, used, self.need.kl, self.need.per_token, open_cache(self.cfg, self.tokenizer),
            self.cfg.reference.batch_size, self.pad_id, self.device, self.autocast, self.show_progress,
            shard=(self.rank, self.world), exchange=self.world > 1, call=self.backend, layout=self.layout)
        log.info("reference log-probs: %d reused from the cache, %d computed", report["reused"], report["computed"])
        self.reference_report = {**report, "seconds": time.perf_counter() - started}
        if dist.is_main():
            reference_mod.save(ref, path, fp)
        return ref

    def forward(self, name: str, idx: list, kl: bool = False, source: str = "policy") -> tuple:
        """(Logps, tokens in the batch) of examples idx of split `name`, or of their KL sequences.
        source="reference" reads the pre-pass instead of running the model (the policy before its
        first step is the reference)."""
        split = self.splits[name]
        seqs = [split.kl_sequence(i) if kl else split.sequence(i) for i in idx]
        if source == "reference":
            lengths = torch.tensor([len(c) - (not p) for p, c in seqs], device=self.device)  # tokens scored
            return Logps(seq=self.ref.get(name, "_kl" if kl else "")[idx].to(self.device), lengths=lengths), 0
        want_tokens, full = not kl and self.need.per_token, self.layout.full_logits
        with self.autocast(), (torch.no_grad() if kl else contextlib.nullcontext()):
            if self.layout.capacity is not None and not want_tokens:
                packed = to_device(packed_batch([(p, [c]) for p, c in seqs], self.pad_id, self.layout.capacity),
                                   self.device)
                slots = self.backend(packed_logps, packed, grad_slots=() if kl else (0,), full_logits=full)
                return slots[0], packed["slot_tokens"][0]
            batch = {k: v.to(self.device) for k, v in collate(seqs, self.pad_id).items()}
            if want_tokens and self.need.value_head:
                lp = self.backend(logps_and_values, batch, self.value_head, full)
            else:
                lp = self.backend(completion_logps, batch, per_token=want_tokens, full_logits=full)
        return lp, int(batch["attention_mask"].sum())

    def shared_forward(self, name: str, idx: list) -> tuple:
        """One forward for two sequences per unit, sharing their prompt's computation
        (logprobs.packed_batch): KTO's example + KL sequence (the KL one without gradient), or a
        pair's chosen + rejected (truncation keeps a prompt's tokens the same for all its
        completions). Returns (Logps of idx in order, KL log-probs or None, tokens)."""
        split, paired = self.splits[name], self.need.paired
        if paired:
            P = len(idx) // 2
            units = [(split.sequence(c), split.sequence(r)) for c, r in zip(idx[:P], idx[P:])]
        else:
            units = [(split.sequence(i), split.kl_sequence(i)) for i in idx]
        packed = to_device(packed_batch([(a[0], [a[1], b[1]]) for a, b in units], self.pad_id, self.layout.capacity),
                           self.device)
        with self.autocast():
            first, second = self.backend(packed_logps, packed, grad_slots=(0, 1) if paired else (0,),
                                         full_logits=self.layout.full_logits)
        tokens = sum(packed["slot_tokens"]) if paired else packed["slot_tokens"][0]  # as two separate batches
        if paired:
            return Logps(seq=torch.cat([first.seq, second.seq]), lengths=torch.cat([first.lengths, second.lengths])), \
                None, tokens
        return first, second.seq, tokens

    def micro_step(self, name: str, units: list, source: str = "policy", across_ranks: bool = True) -> tuple:
        """(loss, metrics, tokens, example indices, their policy log-probs) of one micro-batch.
        across_ranks: this micro-batch is one of every rank's in this accumulation round, and
        cross-rank statistics (KTO's KL estimate, token counts) sum over all of them."""
        need, ref = self.need, self.ref
        idx = [u[0] for u in units] + [u[1] for u in units] if need.paired else list(units)
        sharable = self.layout.shared_prompt and source == "policy" and (need.kl or need.paired) and not need.per_token
        kl, shared = None, self.shared_forward(name, idx) if sharable else None
        reduce, ranks = (dist.all_sum, self.world) if across_ranks else (objectives.single_process, 1)
        if need.kl:  # the KTO reference point, from the examples' KL partners, without gradient
            kl_logps = shared[1] if shared else self.forward(name, idx, kl=True, source=source)[0].seq  # (B,)
            kl_ratio = kl_logps - ref.get(name, "_kl")[idx].to(self.device)  # (B,)
            total = reduce(torch.stack([kl_ratio.sum().float(), torch.tensor(float(len(idx)), device=self.device)]))  # (2,)
            kl = kl_estimate(total[0], total[1])
        lp, tokens = (shared[0], shared[2]) if shared else self.forward(name, idx, source=source)
        ref_logps = {}
        if need.reference:
            ref_logps["seq"] = ref.get(name)[idx].to(self.device)
            if need.per_token:
                ref_logps["tokens"] = ref.get(name, "_tokens")[idx].to(self.device)
        values = lp.values if need.value_head else None  # (B, L)
        desirable = self.splits[name].desirable(idx).to(self.device)
        loss, metrics = objectives.compute(self.cfg.loss.name, self.params, lp, ref_logps, desirable, kl, values,
                                           reduce, ranks)
        return loss, metrics, tokens, idx, lp.seq.detach()

    def optimizer_step(self, step: int) -> dict:
        """One optimizer step on the global batch: with W ranks and micro-batches of m units, round k
        of the accumulation gives rank r units [(kW + r)m, (kW + r + 1)m) of it, so a run with W
        ranks computes what one process with micro-batches of W*m computes."""
        t, units = self.cfg.trainer, self.units["train"]
        self.model.train()
        batch = [units[p] for p in batch_indices(step, len(units), t.batch_size, t.seed, self.order)]
        accum, m = accumulation(self.cfg, self.world), t.micro_batch_size
        sums, tokens, start, lr = MetricSums(), 0, time.perf_counter(), self.backend.lr()
        for k in range(accum):
            lo = (k * self.world + self.rank) * m
            loss, metrics, n_tok, _, _ = self.micro_step("train", batch[lo:lo + m])
            self.backend.backward(loss, accum)
            sums.add(metrics)
            tokens += n_tok
        grad_norm = self.backend.step()
        tokens = float(dist.all_sum(torch.tensor(float(tokens))))
        out = sums.means(across_ranks=True)
        elapsed = time.perf_counter() - start
        return {**out, "grad_norm": grad_norm, "lr": lr, "tokens/s": tokens / elapsed}

    @torch.no_grad()
    def evaluate(self, initial: bool = False) -> dict:
        """The loss and its metrics on the held-out split, and how often the chosen completion beats
        the rejected one, by implicit reward (losses with a reference) and by log-prob. Before
        training the policy is the reference, so where the pre-pass has its log-probs no forward
        pass is needed."""
        split, units, bs = self.splits["eval"], self.units["eval"], self.cfg.trainer.eval_batch_size
        source = "reference" if initial and self.need.reference and not self.need.value_head else "policy"
        self.model.eval()
        sums, logps = MetricSums(), torch.full((len(split),), float("nan"))
        for start in range(0, len(units), bs):
            _, metrics, _, idx, seq = self.micro_step("eval", units[start:start + bs], source, across_ranks=False)
            sums.add(metrics)
            logps[idx] = seq.float().cpu()
        missing = logps.isnan().nonzero().squeeze(1).tolist()  # e.g. the rejected side, for sft
        for start in range(0, len(missing), bs):
            idx = missing[start:start + bs]
            logps[idx] = self.forward("eval", idx, source=source)[0].seq.float().cpu()
        out = sums.means()
        scores = {"logps/accuracies": logps}
        if self.need.reference and "rewards/accuracies" not in out:
            scores["rewards/accuracies"] = logps - self.ref.eval
        for key, score in scores.items():
            acc = pair_accuracy(split, score)
            if acc is not None:
                out[key] = acc
        return out


# ---------------------------------------------------------------- the run

class MetricsLog:
    """metrics.jsonl in the run dir, one JSON object per logged step, flushed as written."""

    def __init__(self, path: Path, resume_step: int = 0):
        """resume_step > 0 keeps the records up to that step (a crashed run may have logged past its
        last checkpoint; those steps are about to be run again)."""
        self.path = path
        kept = []
        if resume_step and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if json.loads(line)["step"] <= resume_step]
        self.f = open(path, "w", encoding="utf-8")
        self.f.writelines(line + "\n" for line in kept)

    @staticmethod
    def first_in(path: Path, split: str) -> dict:
        """The first logged record of a split, without its prefix ({} if none)."""
        if not path.is_file():
            return {}
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if any(k.startswith(f"{split}/") for k in record):
                return {k[len(split) + 1:]: v for k, v in record.items() if k.startswith(f"{split}/")}
        return {}

    def close(self) -> None:
        self.f.close()

    def write(self, step: int, split: str, metrics: dict) -> None:
        record = {"step": step, "time": time.time(), **{f"{split}/{k}": v for k, v in metrics.items()}}
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()


def train(cfg: RunConfig, run_dir: Path) -> dict:
    """Runs the whole job in run_dir (rank 0's, under several processes); returns the summary it
    also writes to summary.json. Only rank 0 writes logs, the summary and final/."""
    started = time.perf_counter()
    tr = Trainer(cfg, run_dir)
    tr.setup()
    run_dir, main = tr.run_dir, dist.is_main()
    start_step = resume(tr, run_dir)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step) if main else None
    has_eval = "eval" in tr.splits
    if start_step > 0:  # the policy is no longer the initial one: take "before" from the log
        before = MetricsLog.first_in(run_dir / "metrics.jsonl", "eval")
    else:
        before = tr.evaluate(initial=True) if has_eval else {}
        if before and main:
            metrics_log.write(0, "eval", before)
    t = cfg.trainer
    last = {}
    first_step_at = time.perf_counter()
    with tqdm(total=tr.steps, initial=start_step, desc=cfg.loss.name, unit="step", disable=not tr.show_progress) as bar, \
            Preemption() as preemption:
        for step in range(start_step, tr.steps):
            last = tr.optimizer_step(step)
            if main and ((step + 1) % t.log_every == 0 or step + 1 == tr.steps):
                metrics_log.write(step + 1, "train", last)
            bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "kl", "rewards/margins") if k in last})
            bar.update(1)
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < tr.steps and has_eval:
                evaluated = tr.evaluate()
                if main:
                    metrics_log.write(step + 1, "eval", evaluated)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < tr.steps:
                save_checkpoint(run_dir, step + 1, tr.backend, fingerprint(cfg))
            if preemption.requested() and step + 1 < tr.steps:
                if not (t.save_every and (step + 1) % t.save_every == 0):
                    save_checkpoint(run_dir, step + 1, tr.backend, fingerprint(cfg))
                if main:
                    metrics_log.close()
                preemption.hand_over()
                raise Preempted(step + 1, run_dir, preemption.signal)
    train_time = time.perf_counter() - first_step_at
    after = tr.evaluate() if has_eval else {}
    if main:
        if after:
            metrics_log.write(tr.steps, "eval", after)
        metrics_log.close()
    save_checkpoint(run_dir, tr.steps, tr.backend, fingerprint(cfg))
    if tr.need.control_tokens:
        condition_on_good(tr.tokenizer, cfg.loss.good_token)
    export_final(run_dir, tr.backend, tr.model, tr.tokenizer)
    ref_report = tr.reference_report or {}
    summary = {"steps": tr.steps, "train_seconds": train_time, "wall_seconds": time.perf_counter() - started,
               "reference_seconds": ref_report.get("seconds", 0.0), "reference": ref_report, "processes": tr.world,
               "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), "last_train": last, "eval_before": before, "eval_after": after}
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary, run_dir)
    return summary


class Preempted(Exception):
    """The run stopped early on a signal, after writing a checkpoint to resume from."""

    def __init__(self, step: int, run_dir: Path, signum: int):
        super().__init__(f"stopped on {signal.Signals(signum).name} after step {step}; checkpoint "
                         f"{run_dir / 'checkpoints' / f'step_{step:07d}'}; the same command with "
                         f"trainer.resume=auto and hydra.run.dir={run_dir} continues from it")
        self.step = step


class Preemption:
    """Catches the signal Slurm sends before a time limit or a preemption (SIGUSR1 with sbatch
    --signal=USR1@SECONDS; SIGUSR2 under submitit; SIGTERM at the limit itself): the loop finishes
    its step, writes a checkpoint and stops (Preempted), so a requeued job resumes from it. With
    several processes every rank stops at the same step (the flag is reduced over ranks each step)."""
    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def requested(self) -> bool:
        got = dist.all_max(int(self.signal is not None))
        if got and self.signal is None:
            self.signal = signal.SIGUSR1  # another rank got it
        return bool(got)

    def hand_over(self) -> None:
        """After the checkpoint: a handler that was there before ours (submitit's, which requeues
        the job) gets the signal too."""
        previous = self.previous.get(self.signal)
        if callable(previous):
            previous(self.signal, None)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def resume(tr: Trainer, run_dir: Path) -> int:
    spec = tr.cfg.trainer.resume
    if not spec:
        return 0
    path = latest_checkpoint(run_dir) if spec == "auto" else Path(spec)
    path = dist.broadcast(path)  # rank 0's view of the run dir decides
    if path is None:
        log.info("trainer.resume=auto: no checkpoint in %s, starting from step 0", run_dir)
        return 0
    step = load_checkpoint(path, tr.backend, fingerprint(tr.cfg))
    log.info("resumed from %s at step %d", path, step)
    return step


def condition_on_good(tokenizer, good_token: str) -> None:
    """csft: the exported chat template ends every generation prompt with the good control token,
    so sampling from final/ with apply_chat_template(add_generation_prompt=True) uses it."""
    if getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template += "{% if add_generation_prompt %}{{ '" + good_token + "' }}{% endif %}"
    else:
        log.warning("the tokenizer has no chat template: end prompts with %s when sampling from final/", good_token)


def peak_gpu_mb() -> Optional[float]:
    """This process's peak GPU memory held by tensors (None without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


SUMMARY_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/accuracies", "logps/chosen", "logps/rejected", "kl",
                "kl/raw")


def print_summary(summary: dict, run_dir: Path) -> None:
    before, after = summary["eval_before"], summary["eval_after"]
    lines = [f"\nkto-train: {summary['steps']} steps in {summary['train_seconds']:.0f} s "
             f"(wall {summary['wall_seconds']:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MB)"]
    if after:
        lines.append(f"{'held-out metric':<22}{'before':>10}{'after':>10}")
        for k in SUMMARY_KEYS:
            if k in after:
                lines.append(f"{k:<22}{before.get(k, float('nan')):>10.4f}{after[k]:>10.4f}")
    lines.append(f"run dir: {run_dir}   model: {run_dir / 'final'}")
    print("\n".join(lines), flush=True)


def precompute(cfg: RunConfig) -> dict:
    """kto-precompute: fills the shared cache with the reference log-probs of every train and eval
    example (and KL sequence, for kto) that the same overrides would train on. Several processes
    each compute their share of what is missing; the model loads only if something is."""
    tr = Trainer(cfg, run_dir=None)
    if not tr.need.reference:
        raise UserError(f"loss={cfg.loss.name} uses no reference model: nothing to precompute")
    if cfg.reference.cache != CacheMode.readwrite:
        raise UserError("kto-precompute writes the reference cache: set reference.cache=readwrite")
    tr.tokenizer = load_tokenizer(cfg.model)
    tr.pad_id = tr.tokenizer.pad_token_id
    tr.splits = tr.load_data()
    used = {name: (split, range(len(split))) for name, split in tr.splits.items()}
    rank, local_rank, world = dist.env_ranks()
    if tr.device.type == "cuda" and tr.device.index is None:
        tr.device = torch.device("cuda", local_rank)  # one GPU per process on a node
    cache = open_cache(cfg, tr.tokenizer)
    _, report = reference_mod.reference_pass(lambda: reference_model(cfg, tr), used, tr.need.kl, tr.need.per_token,
                                             cache, cfg.reference.batch_size, tr.pad_id, tr.device, tr.autocast,
                                             tr.show_progress, shard=(rank, world),
                                             layout=Layout(cfg.trainer.shared_prompt, None, not cfg.model.sparse_head))
    print(f"kto-precompute: {report['reused']} values already cached, {report['computed']} computed "
          f"(process {rank} of {world}) in {cache.dir}", flush=True)
    return report


def reference_model(cfg: RunConfig, tr: Trainer):
    """The model as training will run it: under DeepSpeed with bf16 the engine holds bf16 weights
    (not fp32 weights under autocast), so the values match what a training run would compute."""
    model = load_model(cfg.model, tr.tokenizer).to(tr.device)
    return model.to(torch.bfloat16) if tr.deepspeed and cfg.trainer.precision == Precision.bf16 else model

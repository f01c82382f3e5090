"""kto-precompute: the reference pass of a run, ahead of it and without training.

    kto-precompute model=smollm2_135m                       # same overrides as kto-train
    torchrun --nproc_per_node 2 --no-python kto-precompute  # each process computes its share
"""
import torch

from . import distributed as dist
from . import reference as reference_mod
from .config import CacheMode, Precision, RunConfig, UserError
from .logprobs import Layout, Runner
from .models import load_model
from .reference import open_cache
from .train import Trainer


def precompute(cfg: RunConfig) -> dict:
    """kto-precompute: fills the shared cache with the reference log-probs of every train and eval
    example (and KL sequence, for kto) that the same overrides would train on. Several processes
    each compute their share of what is missing; the model loads only if something is."""
    tr = Trainer(cfg, run_dir=None)
    if not tr.need.reference:
        raise UserError(f"loss={cfg.loss.name} uses no reference model: nothing to precompute")
    if cfg.reference.cache != CacheMode.readwrite:
        raise UserError("kto-precompute writes the reference cache: set reference.cache=readwrite")
    tr.load_inputs()
    used = {name: (split, range(len(split))) for name, split in tr.splits.items()}
    rank, local_rank, world = dist.env_ranks()
    if tr.device.type == "cuda" and tr.device.index is None:
        tr.device = torch.device("cuda", local_rank)  # one GPU per process on a node
    cache = open_cache(cfg, tr.tokenizer)
    run = Runner(tr.pad_id, tr.device, tr.autocast, cfg.reference.batch_size,
                 layout=Layout(cfg.trainer.shared_prompt, full_logits=not cfg.model.sparse_head,
                               blocks=cfg.trainer.attention_blocks))
    _, report = reference_mod.reference_pass(lambda: reference_model(cfg, tr), used, tr.kl_splits(), tr.need.per_token,
                                             cache, run, tr.show_progress, shard=(rank, world))
    print(f"kto-precompute: {report['reused']} values already cached, {report['computed']} computed "
          f"(process {rank} of {world}) in {cache.dir}", flush=True)
    return report


def reference_model(cfg: RunConfig, tr: Trainer):
    """The model as training will run it: under DeepSpeed with bf16 the engine holds bf16 weights
    (not fp32 weights under autocast), so the values match what a training run would compute."""
    model = load_model(cfg.model, tr.tokenizer).to(tr.device)
    return model.to(torch.bfloat16) if tr.deepspeed and cfg.trainer.precision == Precision.bf16 else model

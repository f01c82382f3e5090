"""Sampling completions from a model for held-out prompts: batched, left-padded, with the KV cache
(transformers `generate`), starting from the prompt token ids training conditions on (chat template
with its generation prompt, truncation, csft's control token) and stopping at EOS or the end of
the turn.

    texts = generate(model, tokenizer, [split.sequence(i)[0] for i in idx], GenerationConfig())
"""
from dataclasses import dataclass

import torch
import transformers

from .config import GenerationConfig

# generate's name for a ready KV cache: `cache` in recent transformers (5.24 warns that
# `past_key_values` is going), `past_key_values` in older ones
CACHE_KWARG = "cache" if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 24) else "past_key_values"
# End-of-turn markers of common chat templates: generation stops at them as at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Sample:
    prompt: int  # index into the prompts given
    text: str  # the completion, special tokens removed
    tokens: int  # tokens generated, the stop token included
    finished: bool = True  # it ended with a stop token, not at max_new_tokens


def stop_ids(tokenizer) -> list:
    """EOS and every end-of-turn marker the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def left_padded(prompts: list, pad_id: int, device) -> tuple:
    """(input_ids, attention_mask), both (B, T), prompts aligned on the right."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def until_stop(new: list, stops: set) -> list:
    """The generated ids up to and including the first stop id."""
    for k, t in enumerate(new):
        if t in stops:
            return new[:k + 1]
    return new


def shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, n: int):
    """The KV cache of every prompt but its last token, computed once and repeated for each of its
    n samples, so a prompt's samples share its forward. Positions as generate gives left-padded rows."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                  use_cache=True).past_key_values
    cache.batch_repeat_interleave(n)
    return cache


@torch.no_grad()
def generate(model, tokenizer, prompts: list, cfg: GenerationConfig, device=None, synced: bool = False,
             shard: tuple = (0, 1), between_batches=None) -> list:
    """cfg.n samples for each prompt (lists of token ids), in prompt order: greedy when
    cfg.temperature is 0, else sampling with temperature and top_p. Prompts of similar length
    share a batch (less padding) of cfg.batch_size samples; a prompt's n samples share its forward.
    Each batch is seeded by cfg.seed and its place in that order, so its samples do not depend on
    which process makes them: shard = (rank, ranks) makes batches rank, rank + ranks, ... only.
    synced: several ranks of a ZeRO-3 model generate together (each forward gathers parameters
    collectively), so every rank steps until all have finished. between_batches(): called after each
    batch (on every rank alike, unsharded: where a scheduler's signal may stop the job)."""
    device = device or next(model.parameters()).device
    order = [i for _, i in sorted((len(p), i) for i, p in enumerate(prompts))]
    per_batch = max(1, cfg.batch_size // cfg.n)
    batches = [order[start:start + per_batch] for start in range(0, len(order), per_batch)]
    was_training = model.training
    model.eval()
    samples = []
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        for b in range(shard[0], len(batches), shard[1]):
            torch.manual_seed(cfg.seed * 100_003 + b)
            samples += generate_batch(model, tokenizer, [prompts[i] for i in batches[b]], batches[b], cfg, device, synced)
            if between_batches is not None and b + shard[1] < len(batches):
                between_batches()
    model.train(was_training)
    return sorted(samples, key=lambda s: s.prompt)  # stable: a prompt's samples keep their order


def generate_batch(model, tokenizer, prompts: list, idx: list, cfg: GenerationConfig, device, synced: bool) -> list:
    """cfg.n Samples for each of one batch's prompts (idx: their indices)."""
    pad, stops, n = tokenizer.pad_token_id, stop_ids(tokenizer), cfg.n
    sampling = cfg.temperature > 0
    options = dict(do_sample=sampling, max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                   temperature=cfg.temperature if sampling else None, top_p=cfg.top_p if sampling else None,
                   top_k=None, synced_gpus=synced)
    ids, mask = left_padded(prompts, pad, device)  # (B, T)
    cache = shared_prompt_cache(model, ids, mask, n) if n > 1 and ids.shape[1] > 1 else None
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # (B n, T)
    shared = {} if cache is None else {CACHE_KWARG: cache}
    out = model.generate(input_ids=ids, attention_mask=mask, **shared, **options)[:, ids.shape[1]:]  # (B n, new)
    samples = []
    for i, row in zip((i for i in idx for _ in range(n)), out.tolist()):
        new = until_stop(row, set(stops))
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        samples.append(Sample(i, text, len(new), bool(new) and new[-1] in stops))
    return samples

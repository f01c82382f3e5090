"""Log-probabilities of completion tokens, per sequence and (where a loss needs it) per token.

KTO and DPO need log pi(y_t | x, y_<t) only where y_t is a completion token, so the LM head (a
vocabulary-sized matmul and log-softmax) runs only at the positions that predict one, in chunks:
no float32 log-softmax over the vocabulary is materialised for the whole batch. Families that
post-process their logits (soft-capping, scaling) get the same post-processing here
(`logit_transform`); `model.sparse_head=false` runs the model's own full forward instead.

Rows that share a prompt or pack several sequences (`packed_batch`) are described by per-token
group and branch ids and per-row block offsets; `attention_inputs` gives each kernel the form it
reads (attention.py: blocks for sdpa, a BlockMask for flex attention, an additive mask for eager,
restarting positions for flash attention).
"""
import contextlib
import weakref
from itertools import accumulate
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import attention

# Attention kernels that read a custom 4D mask (shared-prompt and packed rows).
MASKED_KERNELS = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class Layout:
    """How sequences become rows and logits: sequences that share a prompt in one row
    (shared_prompt), several groups per row up to `capacity` tokens (packing; 0: the batch's longest
    group; None: off), whether the LM head runs only at completion positions (the default) or
    everywhere, and how many rows of hidden states go through it at once (0: all in one call, as
    ZeRO-3 needs: there the number of calls must not depend on a rank's data), and whether sdpa
    models compute those rows' attention by blocks (no (L, L) mask, attention.py)."""
    shared_prompt: bool = True
    capacity: Optional[int] = None
    full_logits: bool = False
    head_chunk: int = 1024
    blocks: Optional[int] = attention.BLOCKS_FROM  # sdpa: rows this long by blocks, not a dense mask (None: never)
    kl_prefix: bool = False  # KTO: KL sequences continue their prompt's cached keys and values (prefix_logps)


@dataclass(frozen=True)
class Runner:
    """How no-grad forward passes over many sequences run (the reference pass, logps_of)."""
    pad_id: int
    device: Any = "cpu"
    autocast: Callable = contextlib.nullcontext
    batch_size: int = 16
    call: Optional[Callable] = None  # call(fn, *args) runs fn(model, *args), e.g. through a DeepSpeed engine
    layout: Layout = Layout()


@dataclass
class Logps:
    seq: torch.Tensor  # (B,) summed over completion tokens
    lengths: torch.Tensor  # (B,) completion tokens scored
    tokens: Optional[torch.Tensor] = None  # (B, L) per completion token, 0 on padding
    mask: Optional[torch.Tensor] = None  # (B, L) 1.0 on real completion tokens
    hidden: Optional[torch.Tensor] = None  # (B, L, H) the hidden states that predicted those tokens
    values: Optional[torch.Tensor] = None  # (B, L) a value head's estimates at those positions (ppo)


def _config_value(config, name: str):
    """A config attribute, also looked up in a multimodal model's text_config."""
    value = getattr(config, name, None)
    text = getattr(config, "text_config", None)
    return value if value is not None or text is None else getattr(text, name, None)


def logit_transform(config) -> tuple:
    """(scale, cap): the family's post-processing of lm_head's output, logits * scale, then
    cap * tanh(logits / cap) when cap is set. Granite divides by `logits_scaling`, Cohere multiplies
    by `logit_scale`, Falcon-H1 by `lm_head_multiplier`, Gemma 2/3 soft-cap."""
    scale = 1.0
    for name, inverse in (("logits_scaling", True), ("logit_scale", False), ("lm_head_multiplier", False)):
        value = _config_value(config, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = scale / value if inverse else scale * value
    return scale, _config_value(config, "final_logit_softcapping")


def head_logps(head, hidden: torch.Tensor, labels: torch.Tensor, transform: tuple = (1.0, None),
               chunk: int = 1024) -> torch.Tensor:
    """log softmax(transform(head(hidden)))[label] for each row, computed `chunk` rows at a time
    (all at once when chunk is 0). The head runs at least once, on zero rows if need be: under
    ZeRO-3 every rank must call each module the same number of times. (N,)"""
    scale, cap = transform
    chunk = chunk or max(1, hidden.shape[0])
    parts = []
    for start in range(0, max(1, hidden.shape[0]), chunk):
        logits = head(hidden[start:start + chunk]).float()  # (n, V)
        if scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        lab = labels[start:start + chunk, None]  # (n, 1)
        parts.append(logits.gather(1, lab).squeeze(1) - torch.logsumexp(logits, dim=-1))  # (n,)
    return torch.cat(parts)


def attention_inputs(model, packed: dict, layout: "Layout") -> dict:
    """The forward's attention_mask, position_ids (and blocks) for a packed batch, in the form the
    model's attention kernel reads (attention.kernel_inputs)."""
    return attention.kernel_inputs(attention_kernel(model), next(model.parameters()).dtype, packed, layout.blocks)


def attention_kernel(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def sliding_window(config) -> Optional[int]:
    """The smallest attention window some layer uses (None: every layer attends to everything)."""
    window = _config_value(config, "sliding_window")
    if not window:
        return None
    types = _config_value(config, "layer_types")
    if types is not None and not any("sliding" in t for t in types):
        return None
    if _config_value(config, "use_sliding_window") is False:
        return None
    return int(window)


def layout_problem(model, max_length: int, shared: bool = True) -> Optional[str]:
    """Why rows laid out by packed_batch would not give a plain forward's numbers for this model,
    or None when they do: shared-prompt rows (shared) or packed rows of one completion per group
    (flash attention's variable-length path takes those, sliding window included)."""
    kernel = attention_kernel(model)
    if kernel.startswith("flash_attention") and not shared:
        return None
    if kernel not in MASKED_KERNELS:
        return f"attention kernel {kernel} reads no custom 4D mask" + (" (it can pack rows without shared prompts)"
                                                                     if kernel.startswith("flash_attention") else "")
    window = sliding_window(model.config)
    if window is not None and window < max_length:
        return (f"its sliding attention window ({window} tokens) is shorter than dataset.max_length={max_length}, "
                "and a custom mask replaces the window")
    return None


def _token_logps(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor,
                 layout: Layout, want_hidden: bool = False) -> tuple:
    """(log-probs (N,) of labels predicted at positions (rows, cols), the hidden states there or
    None). The sparse path runs the LM head at those positions only."""
    full = layout.full_logits or model.get_output_embeddings() is None
    states, head, transform, out = _states(model, {**inputs, "output_hidden_states": want_hidden and full}, layout)
    h = states[rows, cols]  # (N, H) hidden states, or (N, V) logits on the full path
    logps = head_logps(head, h, labels, transform, layout.head_chunk)
    if full:
        h = out.hidden_states[-1][rows, cols] if want_hidden else None
    return logps, h


def _states(model, inputs: dict, layout: Layout) -> tuple:
    """(what the head reads (B, T, H or V), head, transform, model output): hidden states and the
    LM head on the sparse path, else the model's own logits and the identity."""
    if not layout.full_logits and model.get_output_embeddings() is not None:
        out = model.base_model(**inputs)
        return out.last_hidden_state, model.get_output_embeddings(), logit_transform(model.config), out
    out = model(**inputs)
    return out.logits, (lambda x: x), (1.0, None), out


def completion_logps(model, batch: dict, per_token: bool = False, hidden: bool = False,
                     layout: Layout = Layout()) -> Logps:
    """log pi(token | prefix) of the completion tokens of a collated (right-padded) batch."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (B, T)
    targets = completion_mask[:, 1:]  # (B, T-1): position t predicts token t+1
    rows, cols = targets.nonzero(as_tuple=True)  # (N,), (N,)
    labels = input_ids[rows, cols + 1]  # (N,)
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "use_cache": False}
    token_logps, h = _token_logps(model, inputs, rows, cols, labels, layout, want_hidden=hidden)
    B = input_ids.shape[0]
    seq = torch.zeros(B, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)  # (B,)
    lengths = targets.sum(1)  # (B,)
    result = Logps(seq=seq, lengths=lengths)
    if per_token or hidden:
        j = cols - targets.int().argmax(1)[rows]  # (N,) index of each token within its completion
        L = int(lengths.max()) if B else 0
        result.tokens = token_logps.new_zeros(B, L).index_put((rows, j), token_logps)  # (B, L)
        result.mask = token_logps.new_zeros(B, L).index_put((rows, j), torch.ones_like(token_logps))  # (B, L)
        if hidden:
            result.hidden = h.new_zeros(B, L, h.shape[-1]).index_put((rows, j), h)  # (B, L, H)
    return result


def completion_logps_and_values(model, batch: dict, value_head, layout: Layout = Layout()) -> Logps:
    """Per-token log-probs and a value head on the hidden states that predicted them, in one
    forward (under ZeRO-3 the value head must run inside the engine's forward too)."""
    lp = completion_logps(model, batch, per_token=True, hidden=True, layout=layout)
    lp.values = value_head(lp.hidden.float()).squeeze(-1)  # (B, L)
    return lp


def prefix_batch(sequences: list, continuations: list, pad_id: int) -> dict:
    """A collated batch of (prompt, completion) rows plus, per row, a continuation that follows the
    same prompt instead (KTO's KL completion), for prefix_logps: kl_ids (B, K) right-padded,
    kl_lengths and prompt_lengths (B,)."""
    from .data import collate
    batch = collate(sequences, pad_id)
    K = max(map(len, continuations))
    kl_ids = torch.full((len(sequences), K), pad_id, dtype=torch.long)  # (B, K)
    for b, k in enumerate(continuations):
        kl_ids[b, :len(k)] = torch.tensor(k, dtype=torch.long)
    return {**batch, "kl_ids": kl_ids, "kl_lengths": torch.tensor([len(k) for k in continuations]),
            "prompt_lengths": torch.tensor([len(p) for p, _ in sequences])}


def continuation_rows(batch: dict) -> dict:
    """A prefix batch's (prompt, continuation) rows, collated apart: where the model hands back no
    cache to continue (gradient checkpointing in training)."""
    from .data import collate
    ids, kl = batch["input_ids"].tolist(), batch["kl_ids"].tolist()
    P, K = batch["prompt_lengths"].tolist(), batch["kl_lengths"].tolist()
    rows = collate([(ids[b][:P[b]], kl[b][:K[b]]) for b in range(len(P))], 0)  # any pad id: it is masked
    return to_device(rows, batch["input_ids"].device)


def cache_kwarg(model) -> str:
    """The forward's name for a key/value cache: `cache` in transformers 5, `past_key_values` before."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def prefix_logps(model, batch: dict, layout: Layout = Layout()) -> tuple:
    """(Logps of the batch's completions, (B,) summed log-probs of its continuations, without
    gradient), the prompt computed once for both: the rows run with gradient and keep their keys
    and values; each continuation then runs on its prompt's cached ones (cropped to the prompt,
    the rest hidden by the mask), its positions continuing the prompt's. Work: the continuation's
    tokens once, without gradient, where a shared row would carry them through the backward and
    separate rows would compute the prompt twice. Where the layers fill no cache (transformers'
    gradient checkpointing in training hands them none; a model without one) the continuations
    run as separate rows, without gradient."""
    input_ids, targets = batch["input_ids"], batch["completion_mask"][:, 1:]  # (B, T), (B, T-1)
    rows, cols = targets.nonzero(as_tuple=True)  # (N,)
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "use_cache": True}
    keep = int(batch["prompt_lengths"].max())
    ours = prefix_cache(model, keep)
    states, head, transform, out = _states(model, {**inputs, **ours}, layout)
    # ours, else transformers' own (5 / 4); empty where the layers were handed none
    cache = next(iter(ours.values()), None) or getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    with torch.no_grad():  # before the rows' LM head, so its temporaries and the head's never coexist
        if cache is not None and cache.get_seq_length() > 0:
            kl = _continuation_logps(model, batch, states, cache, layout)
            release(cache)
        else:
            kl = completion_logps(model, continuation_rows(batch), layout=layout).seq
    token_logps = head_logps(head, states[rows, cols], input_ids[rows, cols + 1], transform, layout.head_chunk)
    B = input_ids.shape[0]
    seq = torch.zeros(B, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)  # (B,)
    return Logps(seq=seq, lengths=targets.sum(1)), kl


def prefix_cache(model, keep: int) -> dict:
    """A key/value cache for prefix_logps' rows that keeps a detached copy of the first `keep`
    positions (the longest prompt) and nothing of the completions, where transformers' own cache
    would keep every position (and keys that a grouped-query model's backward does not hold);
    its continuations' keys are returned, not kept. {} where transformers has no cache layers to
    build it from (its default cache is used, cropped later)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return {}
    cache = DynamicCache()
    if not hasattr(cache, "layer_class_to_replicate"):
        return {}
    owner = weakref.ref(cache)  # the layers' class must not hold the cache: a cycle frees it only at gc

    class PromptLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys = key_states[..., :keep, :].detach().clone()  # (B, H, keep, D)
                self.values = value_states[..., :keep, :].detach().clone()
            elif owner().continuing:
                return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
            # the rows' forward (again, should a checkpointed layer's recompute be handed the cache)
            return key_states, value_states

    cache.layer_class_to_replicate, cache.continuing = PromptLayer, False
    return {cache_kwarg(model): cache}


def release(cache) -> None:
    """Drops the cached keys and values, so the prompts' copy is not held through the backward (the
    layers stay: gradient checkpointing's recompute passes through them)."""
    for layer in getattr(cache, "layers", ()):
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            layer.keys, layer.values = layer.keys[..., :0, :].clone(), layer.values[..., :0, :].clone()


def _continuation_logps(model, batch: dict, states: torch.Tensor, cache, layout: Layout) -> torch.Tensor:
    """prefix_logps' continuations on the prompts' cached keys and values. (B,)"""
    P, K, ids = batch["prompt_lengths"], batch["kl_lengths"], batch["kl_ids"]  # (B,), (B,), (B, Kmax)
    B, Kmax = ids.shape
    Pmax = int(P.max())
    if cache.get_seq_length() > Pmax:  # transformers' own cache (prefix_cache keeps the prompts only)
        cache.crop(Pmax - cache.get_seq_length())  # negative: tokens to drop from the end
    arange = lambda n: torch.arange(n, device=ids.device)[None]  # noqa: E731  (1, n)
    mask = torch.cat([arange(Pmax) < P[:, None], arange(Kmax) < K[:, None]], 1).long()  # (B, Pmax + Kmax)
    cache.continuing = True  # prefix_cache's layers: return the prompt's keys and these, keep nothing
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": P[:, None] + arange(Kmax),
              "use_cache": True, cache_kwarg(model): cache}
    try:
        kl_states, head, transform, _ = _states(model, inputs, layout)
    finally:
        cache.continuing = False
    # token 0 is predicted at the prompt's last position (the rows' forward), token t at t - 1 here
    first = ((P > 0) & (K > 0)).nonzero(as_tuple=True)[0]  # (F,)
    r, c = (arange(Kmax - 1) < (K[:, None] - 1)).nonzero(as_tuple=True)  # (N,): tokens 1.. of each continuation
    scored = torch.cat([states[first, P[first] - 1], kl_states[r, c]])  # (F + N, H)
    labels = torch.cat([ids[first, 0], ids[r, c + 1]])
    # small chunks: this runs while the rows' graph is held (but one call under ZeRO-3, chunk 0)
    logps = head_logps(head, scored, labels, transform, layout.head_chunk and min(layout.head_chunk, 256))  # (F + N,)
    return torch.zeros(B, dtype=torch.float32, device=ids.device).index_add(0, torch.cat([first, r]), logps)


@torch.no_grad()
def logps_of(model, sequences: list, run: Runner, per_token: bool = False, progress=None,
             stats: Optional[dict] = None) -> tuple:
    """Completion log-probs for many (prompt ids, completion ids) pairs, batched by length so little
    padding is computed, returned in the order given, on CPU: (seq (N,), tokens (N, L) or None,
    lengths (N,) of the scored completion tokens). stats["forwards"] counts the forward passes."""
    stats = stats if stats is not None else {}
    stats.setdefault("forwards", 0)
    call = run.call or (lambda fn, *args, **kwargs: fn(model, *args, **kwargs))
    from .data import collate

    longest = max((len(p) + len(c) for p, c in sequences), default=0)
    if not per_token and run.layout.shared_prompt and not layout_problem(model, longest):
        return _logps_by_prompt(call, sequences, run, progress, stats)
    batch_size, device = run.batch_size, run.device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    seq = torch.empty(len(sequences), dtype=torch.float32)
    lengths = torch.zeros(len(sequences), dtype=torch.long)
    tokens = torch.zeros(len(sequences), max((len(c) for _, c in sequences), default=0)) if per_token else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], run.pad_id).items()}
        with run.autocast():
            lp = call(completion_logps, batch, per_token=per_token, layout=run.layout)
        stats["forwards"] += 1
        seq[idx] = lp.seq.float().cpu()
        lengths[idx] = lp.lengths.cpu()
        if per_token:
            tokens[idx, : lp.tokens.shape[1]] = lp.tokens.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    return seq, tokens, lengths


MAX_SHARED = 8  # completions packed behind one prompt in a row


@torch.no_grad()
def _logps_by_prompt(call, sequences: list, run: Runner, progress, stats) -> tuple:
    """logps_of for sequences that share prompts (an example, its pair sibling and their KL
    sequences all start with the same prompt): each row holds a prompt and up to MAX_SHARED of its
    completions (packed_batch), so the prompt is computed once for all of them."""
    by_prompt = {}
    for i, (p, _) in enumerate(sequences):
        by_prompt.setdefault(tuple(p), []).append(i)
    groups = [(list(p), idx[k:k + MAX_SHARED]) for p, idx in by_prompt.items() for k in range(0, len(idx), MAX_SHARED)]
    groups.sort(key=lambda g: len(g[0]) + sum(len(sequences[i][1]) for i in g[1]))
    seq = torch.empty(len(sequences), dtype=torch.float32)
    lengths = torch.zeros(len(sequences), dtype=torch.long)
    rows_per_batch = max(1, run.batch_size // 2)
    for start in range(0, len(groups), rows_per_batch):
        chunk = groups[start:start + rows_per_batch]
        packed = to_device(packed_batch([(p, [sequences[i][1] for i in idx]) for p, idx in chunk], run.pad_id), run.device)
        with run.autocast():
            slots = call(packed_logps, packed, grad_slots=(), layout=run.layout)
        stats["forwards"] += 1
        slot_seq = [s.seq.float().cpu() for s in slots]  # one copy per slot, not one per sequence
        slot_len = [s.lengths.cpu() for s in slots]
        for b, (_, idx) in enumerate(chunk):
            for j, i in enumerate(idx):
                seq[i], lengths[i] = slot_seq[j][b], slot_len[j][b]
        if progress is not None:
            progress.update(sum(len(idx) for _, idx in chunk))
    return seq, None, lengths


def to_device(packed: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}


def pack_rows(sizes: list, capacity: Optional[int]) -> list:
    """Group indices of each row: one group per row when capacity is None, else first-fit
    decreasing into rows of at most max(capacity, the largest group) tokens."""
    if capacity is None:
        return [[g] for g in range(len(sizes))]
    cap = max([capacity, *sizes])
    rows, room = [], []
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        r = next((r for r, free in enumerate(room) if sizes[g] <= free), None)
        if r is None:
            rows.append([]), room.append(cap)
            r = len(rows) - 1
        rows[r].append(g)
        room[r] -= sizes[g]
    return rows


def packed_batch(groups: list, pad_id: int, capacity: Optional[int] = None) -> dict:
    """Lays out groups (prompt ids, [completion ids, ...]) as P + C_1 + ... + C_m, where every C_j
    sees P and itself but no other completion and continues P's positions: the prompt is computed
    once for all its completions (KTO's example and KL sequence, a pair's chosen and rejected).
    With a capacity, several groups share a row, each seeing only itself (padding-free batches,
    pack_rows). Who attends to whom is given by segment and branch (B, L) ids and the per-row
    blocks; attention.dense_mask turns them into the (B, 1, L, L) mask they stand for."""
    sizes = [len(p) + sum(map(len, cs)) for p, cs in groups]
    layout = pack_rows(sizes, capacity)
    B, L = len(layout), max(sum(sizes[g] for g in row) for row in layout)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    position_ids = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    segment = torch.full((B, L), -1, dtype=torch.long)  # (B, L) group within its row, -1 on padding
    branch = torch.zeros((B, L), dtype=torch.long)  # (B, L) 0 on prompts, j + 1 on completion j
    targets = [([], [], [], []) for _ in range(max(len(cs) for _, cs in groups))]  # group, row, position, label
    blocks = []
    for b, row in enumerate(layout):
        at = 0
        blocks.append(tuple((at_g, len(groups[g][0]), tuple(map(len, groups[g][1])))
                            for at_g, g in zip(accumulate([0, *(sizes[g] for g in row)]), row)))
        for s, g in enumerate(row):
            p, cs = groups[g]
            input_ids[b, at:at + sizes[g]] = torch.tensor(p + [t for c in cs for t in c], dtype=torch.long)
            segment[b, at:at + sizes[g]] = s
            position_ids[b, at:at + len(p)] = torch.arange(len(p))
            start = at + len(p)
            for j, c in enumerate(cs):
                position_ids[b, start:start + len(c)] = torch.arange(len(p), len(p) + len(c))
                branch[b, start:start + len(c)] = j + 1
                # token t of C_j is predicted at start + t - 1, its first token at P's last position
                scored = [(at + len(p) - 1, c[0])] if p and c else []
                scored += [(start + t - 1, c[t]) for t in range(1, len(c))]
                for target, values in zip(targets[j], ([g] * len(scored), [b] * len(scored), *zip(*scored))):
                    target.extend(values)
                start += len(c)
            at += sizes[g]
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "position_ids": position_ids, "segment": segment, "branch": branch,
            "blocks": attention.Blocks(tuple(blocks)), "groups": len(groups),
            "targets": [tuple(as_t(x) for x in t) for t in targets],
            "slot_tokens": [sum(len(p) + len(cs[j]) for p, cs in groups if j < len(cs) and cs[j]) for j in range(len(targets))]}


def packed_logps(model, packed: dict, grad_slots: tuple = (0,), layout: Layout = Layout()) -> list:
    """Per completion slot, Logps of each group: (G,) summed log-probs and (G,) scored lengths.
    Slots not in grad_slots carry no gradient. The LM head runs once for the slots with gradient
    and once for those without, whatever the number of slots (ZeRO-3 needs the same calls on every
    rank)."""
    device = packed["input_ids"].device
    inputs = {"input_ids": packed["input_ids"], "use_cache": False, **attention_inputs(model, packed, layout)}
    G = packed["groups"]
    targets = [tuple(x.to(device) for x in t) for t in packed["targets"]]  # per slot: group, row, position, label
    hidden, head, transform, _ = _states(model, inputs, layout)  # (B, L, H), or (B, L, V) logits
    logps = [None] * len(targets)
    for with_grad in (True, False):
        slots = [j for j in range(len(targets)) if (j in grad_slots) == with_grad]
        if not slots:
            continue
        rows = torch.cat([targets[j][1] for j in slots])  # (N,)
        cols = torch.cat([targets[j][2] for j in slots])  # (N,)
        labels = torch.cat([targets[j][3] for j in slots])  # (N,)
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            h = hidden if with_grad else hidden.detach()
            flat = head_logps(head, h[rows, cols], labels, transform, layout.head_chunk)  # (N,)
        for j, part in zip(slots, flat.split([len(targets[j][0]) for j in slots])):
            logps[j] = part
    out = []
    for (group, *_), lp in zip(targets, logps):
        seq = torch.zeros(G, dtype=torch.float32, device=device).index_add(0, group, lp)  # (G,)
        lengths = torch.zeros(G, dtype=torch.long, device=device).index_add(0, group, torch.ones_like(group))
        out.append(Logps(seq=seq, lengths=lengths))
    return out


# ---------------------------------------------------------------- the start-up check

def plain_logps(model, sequences: list) -> torch.Tensor:
    """The textbook computation: each sequence alone through the model's own forward, full logits,
    log-softmax, summed over its completion. One at a time, so no (N, T, V) block is held. (N,)"""
    out = []
    for p, c in sequences:
        logits = model(input_ids=torch.tensor([p + c], device=model.device)).logits[0]  # (T, V)
        logp = torch.log_softmax(logits[max(len(p) - 1, 0):len(p) + len(c) - 1].float(), -1)  # (scored, V)
        scored = torch.tensor(c[1:] if not p else c, device=logp.device)
        out.append(logp.gather(1, scored[:, None]).sum())
    return torch.stack(out)


def layout_logps(model, groups: list, pad_id: int, layout: Layout) -> torch.Tensor:
    """Log-probs of every (prompt, completion) of groups [(prompt, [completions])], in order,
    computed the way training computes them under `layout`. (N,)"""
    from .data import collate
    if layout.kl_prefix and all(len(cs) == 2 for _, cs in groups):
        batch = to_device(prefix_batch([(p, cs[0]) for p, cs in groups], [cs[1] for _, cs in groups], pad_id),
                          model.device)
        main, kl = prefix_logps(model, batch, layout)
        return torch.stack([main.seq, kl], 1).flatten()  # each group's two in order
    if not layout.shared_prompt and layout.capacity is None:
        seqs = [(p, c) for p, cs in groups for c in cs]
        batch = {k: v.to(model.device) for k, v in collate(seqs, pad_id).items()}
        return completion_logps(model, batch, layout=layout).seq
    if not layout.shared_prompt:
        groups = [(p, [c]) for p, cs in groups for c in cs]
    packed = to_device(packed_batch(groups, pad_id, layout.capacity), model.device)
    slots = packed_logps(model, packed, grad_slots=(), layout=layout)
    return torch.cat([slots[j].seq[g:g + 1] for g, (_, cs) in enumerate(groups) for j in range(len(cs))])


@torch.no_grad()
def check_layout(model, groups: list, pad_id: int, layout: Layout, mean: bool = False) -> torch.Tensor:
    """How far, in nats per completion token, the log-probs training computes (layout, LM head)
    lie from a plain forward, over the sequences of groups: the largest per-sequence difference,
    or with `mean` the total difference over the total tokens (bf16 noise averages out). A 0-d
    tensor (a DeepSpeed engine's forward may return no plain float)."""
    sequences = [(p, c) for p, cs in groups for c in cs]
    plain = plain_logps(model, sequences)  # (N,)
    ours = layout_logps(model, groups, pad_id, layout).float()  # (N,)
    tokens = torch.tensor([max(1, len(c) - (not p)) for p, c in sequences], device=plain.device)  # (N,)
    if mean:
        return (ours - plain).abs().sum() / tokens.sum()
    return ((ours - plain) / tokens).abs().max()

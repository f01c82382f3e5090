"""Log-probabilities of completion tokens, per sequence and (where a loss needs it) per token.

KTO and DPO need log pi(y_t | x, y_<t) only where y_t is a completion token, so the LM head (a
vocabulary-sized matmul and log-softmax) runs only at the positions that predict one, in chunks:
no float32 log-softmax over the vocabulary is materialised for the whole batch. Families that
post-process their logits (soft-capping, scaling) get the same post-processing here
(`logit_transform`); `model.sparse_head=false` runs the model's own full forward instead.

Rows that share a prompt or pack several sequences (`packed_batch`) pass a 4D mask, which
transformers hands to the attention kernel unchanged: `attention_mask_for` gives each kernel the
form it reads (boolean for sdpa, additive for eager, a BlockMask for flex attention).
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# Attention kernels that read a custom 4D mask (shared-prompt and packed rows).
MASKED_KERNELS = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class Layout:
    """How sequences become rows and logits: sequences that share a prompt in one row
    (shared_prompt), several groups per row up to `capacity` tokens (packing; 0: the batch's longest
    group; None: off), whether the LM head runs only at completion positions (the default) or
    everywhere, and how many rows of hidden states go through it at once (0: all in one call, as
    ZeRO-3 needs: there the number of calls must not depend on a rank's data)."""
    shared_prompt: bool = True
    capacity: Optional[int] = None
    full_logits: bool = False
    head_chunk: int = 1024


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


def attention_mask_for(model, mask: torch.Tensor):
    """A (B, 1, L, L) boolean mask (True: may attend) in the form the model's attention kernel
    reads: transformers passes 4D masks through as they are, and eager attention (and flex's
    score_mod) *adds* the mask to the scores, so a boolean one would add 0/1 instead of -inf."""
    kernel = attention_kernel(model)
    if kernel == "sdpa":
        return mask
    if kernel == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if kernel == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask
        dense = mask[:, 0]  # (B, L, L)
        return create_block_mask(lambda b, h, q, kv: dense[b, q, kv], dense.shape[0], None, dense.shape[1],
                                 dense.shape[2], device=mask.device)
    raise ValueError(f"attention kernel {kernel!r} cannot read a custom 4D mask")


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


def layout_problem(model, max_length: int) -> Optional[str]:
    """Why rows with a custom 4D mask (shared prompts, packing) would not give a plain forward's
    numbers for this model, or None when they do."""
    kernel = attention_kernel(model)
    if kernel not in MASKED_KERNELS:
        return f"attention kernel {kernel} reads no custom 4D mask"
    window = sliding_window(model.config)
    if window is not None and window < max_length:
        return (f"its sliding attention window ({window} tokens) is shorter than dataset.max_length={max_length}, "
                "and a custom mask replaces the window")
    return None


def _token_logps(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor,
                 layout: Layout, want_hidden: bool = False) -> tuple:
    """(log-probs (N,) of labels predicted at positions (rows, cols), the hidden states there or
    None). The sparse path runs the LM head at those positions only."""
    if not layout.full_logits and model.get_output_embeddings() is not None:
        h = model.base_model(**inputs).last_hidden_state[rows, cols]  # (N, H)
        head = model.get_output_embeddings()
        return head_logps(head, h, labels, logit_transform(model.config), layout.head_chunk), h
    out = model(**inputs, output_hidden_states=want_hidden)
    h = out.hidden_states[-1][rows, cols] if want_hidden else None
    return head_logps(lambda x: x, out.logits[rows, cols], labels, chunk=layout.head_chunk), h


def completion_logps(model, batch: dict, per_token: bool = False, hidden: bool = False,
                     layout: Layout = Layout()) -> Logps:
    """log pi(token | prefix) of the completion tokens of a collated (right-padded) batch."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (B, T)
    targets = completion_mask[:, 1:]  # (B, T-1): position t predicts token t+1
    rows, cols = targets.nonzero(as_tuple=True)  # (N,), (N,)
    labels = input_ids[rows, cols + 1]  # (N,)
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
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
    pack_rows). The attention mask is 4D, (B, 1, L, L), True where a query may attend."""
    sizes = [len(p) + sum(map(len, cs)) for p, cs in groups]
    layout = pack_rows(sizes, capacity)
    B, L = len(layout), max(sum(sizes[g] for g in row) for row in layout)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    position_ids = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    segment = torch.full((B, L), -1, dtype=torch.long)  # (B, L) group within its row, -1 on padding
    branch = torch.zeros((B, L), dtype=torch.long)  # (B, L) 0 on prompts, j + 1 on completion j
    targets = [([], [], [], []) for _ in range(max(len(cs) for _, cs in groups))]  # group, row, position, label
    for b, row in enumerate(layout):
        at = 0
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
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
    same_group = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)  # (B, L, L)
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])  # (B, L, L)
    mask = (causal & same_group & visible) | torch.eye(L, dtype=torch.bool)  # padding sees itself only
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "position_ids": position_ids, "mask": mask[:, None], "groups": len(groups),
            "targets": [tuple(as_t(x) for x in t) for t in targets],
            "slot_tokens": [sum(len(p) + len(cs[j]) for p, cs in groups if j < len(cs) and cs[j]) for j in range(len(targets))]}


def packed_logps(model, packed: dict, grad_slots: tuple = (0,), layout: Layout = Layout()) -> list:
    """Per completion slot, Logps of each group: (G,) summed log-probs and (G,) scored lengths.
    Slots not in grad_slots carry no gradient. The LM head runs once for the slots with gradient
    and once for those without, whatever the number of slots (ZeRO-3 needs the same calls on every
    rank)."""
    device = packed["input_ids"].device
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
              "attention_mask": attention_mask_for(model, packed["mask"])}
    G = packed["groups"]
    targets = [tuple(x.to(device) for x in t) for t in packed["targets"]]  # per slot: group, row, position, label
    if layout.full_logits or model.get_output_embeddings() is None:
        logits = model(**inputs).logits  # (B, L, V)
        head, transform, hidden = (lambda x: x), (1.0, None), logits
    else:
        hidden = model.base_model(**inputs).last_hidden_state  # (B, L, H)
        head, transform = model.get_output_embeddings(), logit_transform(model.config)
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

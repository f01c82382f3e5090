"""Log-probabilities of completion tokens, per sequence and (where a loss needs it) per token.

KTO and DPO need log pi(y_t | x, y_<t) only where y_t is a completion token, so the LM head (a
vocabulary-sized matmul and log-softmax) runs only at the positions that predict one, in chunks:
no float32 log-softmax over the vocabulary is materialised for the whole batch.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

# Rows of hidden states sent through the LM head at once; 0: all in one call (set under ZeRO-3,
# where the number of calls must not depend on a rank's data).
HEAD_CHUNK = 1024


@dataclass
class Logps:
    seq: torch.Tensor  # (B,) summed over completion tokens
    lengths: torch.Tensor  # (B,) completion tokens scored
    tokens: Optional[torch.Tensor] = None  # (B, L) per completion token, 0 on padding
    mask: Optional[torch.Tensor] = None  # (B, L) 1.0 on real completion tokens
    hidden: Optional[torch.Tensor] = None  # (B, L, H) the hidden states that predicted those tokens
    values: Optional[torch.Tensor] = None  # (B, L) a value head's estimates at those positions (ppo)


def supports_sparse_head(model) -> bool:
    """Models whose logits are not a plain linear map of the last hidden state need the full path."""
    c = model.config
    return (getattr(c, "final_logit_softcapping", None) is None and getattr(c, "logit_scale", None) is None
            and model.get_output_embeddings() is not None)


def completion_logps(model, batch: dict, per_token: bool = False, hidden: bool = False) -> Logps:
    """log pi(token | prefix) of the completion tokens of a collated batch."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (B, T)
    targets = completion_mask[:, 1:]  # (B, T-1): position t predicts token t+1
    rows, cols = targets.nonzero(as_tuple=True)  # (N,), (N,)
    labels = input_ids[rows, cols + 1]  # (N,)
    if supports_sparse_head(model):
        h = model.base_model(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
        h = h[rows, cols]  # (N, H)
        token_logps = head_logps(model.get_output_embeddings(), h, labels)  # (N,)
    else:
        out = model(input_ids=input_ids, attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        h = out.hidden_states[-1][rows, cols] if hidden else None
        token_logps = head_logps(lambda x: x, out.logits[rows, cols], labels)
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


def head_logps(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[label] for each row, computed HEAD_CHUNK rows at a time (all at
    once when HEAD_CHUNK is 0). The head runs at least once, on zero rows if need be: under ZeRO-3
    every rank must call each module the same number of times. (N,)"""
    chunk = HEAD_CHUNK or max(1, hidden.shape[0])
    parts = []
    for start in range(0, max(1, hidden.shape[0]), chunk):
        logits = head(hidden[start:start + chunk]).float()  # (n, V)
        lab = labels[start:start + chunk, None]  # (n, 1)
        parts.append(logits.gather(1, lab).squeeze(1) - torch.logsumexp(logits, dim=-1))  # (n,)
    return torch.cat(parts)


@torch.no_grad()
def logps_of(model, sequences: list, batch_size: int, pad_id: int, device, autocast, progress=None,
             per_token: bool = False, stats: Optional[dict] = None, call=None) -> tuple:
    """Completion log-probs for many (prompt ids, completion ids) pairs, batched by length so little
    padding is computed, returned in the order given, on CPU: (seq (N,), tokens (N, L) or None,
    lengths (N,) of the scored completion tokens). stats["forwards"] counts the forward passes;
    call(fn, *args) runs fn(model, *args) (through a DeepSpeed engine, say)."""
    stats = stats if stats is not None else {}
    stats.setdefault("forwards", 0)
    call = call or (lambda fn, *args, **kwargs: fn(model, *args, **kwargs))
    from .data import collate

    if not per_token and packs(model):
        return _logps_by_prompt(call, sequences, batch_size, pad_id, device, autocast, progress, stats)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    seq = torch.empty(len(sequences), dtype=torch.float32)
    lengths = torch.zeros(len(sequences), dtype=torch.long)
    tokens = torch.zeros(len(sequences), max((len(c) for _, c in sequences), default=0)) if per_token else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], pad_id).items()}
        with autocast():
            lp = call(completion_logps, batch, per_token=per_token)
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
def _logps_by_prompt(call, sequences: list, batch_size: int, pad_id: int, device, autocast, progress, stats) -> tuple:
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
    rows_per_batch = max(1, batch_size // 2)
    for start in range(0, len(groups), rows_per_batch):
        chunk = groups[start:start + rows_per_batch]
        packed = to_device(packed_batch([(p, [sequences[i][1] for i in idx]) for p, idx in chunk], pad_id), device)
        with autocast():
            slots = call(packed_logps, packed, grad_slots=())
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


def packs(model) -> bool:
    """Packed rows need a custom 4D mask and explicit positions: sdpa or eager attention."""
    return supports_sparse_head(model) and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


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


def packed_logps(model, packed: dict, grad_slots: tuple = (0,)) -> list:
    """Per completion slot, Logps of each group: (G,) summed log-probs and (G,) scored lengths.
    Slots not in grad_slots carry no gradient. The LM head runs once for the slots with gradient
    and once for those without, whatever the number of slots (ZeRO-3 needs the same calls on every
    rank)."""
    device = packed["input_ids"].device
    hidden = model.base_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              attention_mask=packed["mask"]).last_hidden_state  # (B, L, H)
    head, G = model.get_output_embeddings(), packed["groups"]
    targets = [tuple(x.to(device) for x in t) for t in packed["targets"]]  # per slot: group, row, position, label
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
            flat = head_logps(head, h[rows, cols], labels)  # (N,)
        for j, part in zip(slots, flat.split([len(targets[j][0]) for j in slots])):
            logps[j] = part
    out = []
    for (group, *_), lp in zip(targets, logps):
        seq = torch.zeros(G, dtype=torch.float32, device=device).index_add(0, group, lp)  # (G,)
        lengths = torch.zeros(G, dtype=torch.long, device=device).index_add(0, group, torch.ones_like(group))
        out.append(Logps(seq=seq, lengths=lengths))
    return out

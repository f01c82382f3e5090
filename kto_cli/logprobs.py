"""Log-probabilities of completion tokens, per sequence and (where a loss needs it) per token.

KTO and DPO need log pi(y_t | x, y_<t) only where y_t is a completion token, so the LM head (a
vocabulary-sized matmul and log-softmax) runs only at the positions that predict one, in chunks:
no float32 log-softmax over the vocabulary is materialised for the whole batch.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

HEAD_CHUNK = 1024  # rows of hidden states sent through the LM head at once


@dataclass
class Logps:
    seq: torch.Tensor  # (B,) summed over completion tokens
    lengths: torch.Tensor  # (B,) completion tokens scored
    tokens: Optional[torch.Tensor] = None  # (B, L) per completion token, 0 on padding
    mask: Optional[torch.Tensor] = None  # (B, L) 1.0 on real completion tokens
    hidden: Optional[torch.Tensor] = None  # (B, L, H) the hidden states that predicted those tokens


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
    """log softmax(head(hidden))[label] for each row, computed HEAD_CHUNK rows at a time. (N,)"""
    parts = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[start:start + HEAD_CHUNK]).float()  # (n, V)
        lab = labels[start:start + HEAD_CHUNK, None]  # (n, 1)
        parts.append(logits.gather(1, lab).squeeze(1) - torch.logsumexp(logits, dim=-1))  # (n,)
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def logps_of(model, sequences: list, batch_size: int, pad_id: int, device, autocast, progress=None,
             per_token: bool = False) -> tuple:
    """Completion log-probs for many (prompt ids, completion ids) pairs, batched by length so little
    padding is computed, returned in the order given, on CPU: (seq (N,), tokens (N, L) or None,
    lengths (N,) of the scored completion tokens)."""
    from .data import collate

    if not per_token and shares_prompt_forward(model):
        return _logps_by_prompt(model, sequences, batch_size, pad_id, device, autocast, progress)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    seq = torch.empty(len(sequences), dtype=torch.float32)
    lengths = torch.zeros(len(sequences), dtype=torch.long)
    tokens = torch.zeros(len(sequences), max((len(c) for _, c in sequences), default=0)) if per_token else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], pad_id).items()}
        with autocast():
            lp = completion_logps(model, batch, per_token=per_token)
        seq[idx] = lp.seq.float().cpu()
        lengths[idx] = lp.lengths.cpu()
        if per_token:
            tokens[idx, : lp.tokens.shape[1]] = lp.tokens.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    return seq, tokens, lengths


MAX_SHARED = 8  # completions packed behind one prompt in a row


@torch.no_grad()
def _logps_by_prompt(model, sequences: list, batch_size: int, pad_id: int, device, autocast, progress) -> tuple:
    """logps_of for sequences that share prompts (an example, its pair sibling and their KL
    sequences all start with the same prompt): each row holds a prompt and up to MAX_SHARED of its
    completions (shared_prompt_batch), so the prompt is computed once for all of them."""
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
        packed = shared_prompt_batch([(p, [sequences[i][1] for i in idx]) for p, idx in chunk], pad_id)
        packed = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        with autocast():
            slots = shared_prompt_logps(model, packed, grad_slots=())
        for b, (_, idx) in enumerate(chunk):
            for j, i in enumerate(idx):
                seq[i] = slots[j].seq[b].float().cpu()
                lengths[i] = slots[j].lengths[b].cpu()
        if progress is not None:
            progress.update(sum(len(idx) for _, idx in chunk))
    return seq, None, lengths


def shares_prompt_forward(model) -> bool:
    """The shared-prompt forward needs a custom 4D mask and explicit positions: sdpa or eager attention."""
    return supports_sparse_head(model) and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def shared_prompt_batch(rows: list, pad_id: int) -> dict:
    """Packs each prompt P with its completions C_1..C_m into one row P + C_1 + ... + C_m, where
    every C_j sees P and itself but no other completion (a 4D mask) and continues P's positions, so
    the prompt is computed once for all of them: KTO's example and KL sequence, or a preference
    pair's chosen and rejected completions. rows: (prompt ids, [completion ids, ...])."""
    B, L = len(rows), max(len(p) + sum(map(len, cs)) for p, cs in rows)
    slots = max(len(cs) for _, cs in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    position_ids = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    mask = torch.ones(L, L, dtype=torch.bool).tril().repeat(B, 1, 1, 1)  # (B, 1, L, L) True = may attend
    targets = [([], [], []) for _ in range(slots)]  # per slot: row, predicting position, label
    for b, (p, cs) in enumerate(rows):
        input_ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        position_ids[b, : len(p)] = torch.arange(len(p))
        start = len(p)
        for j, c in enumerate(cs):
            end = start + len(c)
            input_ids[b, start:end] = torch.tensor(c, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(len(p), len(p) + len(c))
            mask[b, 0, start:end, len(p):start] = False  # C_j does not see earlier completions
            for t, label in enumerate(c):
                pos = len(p) - 1 if t == 0 else start + t - 1  # each completion's first token follows P
                if pos >= 0:
                    for target, value in zip(targets[j], (b, pos, label)):
                        target.append(value)
            start = end
        mask[b, 0, start:, :] = False  # padding queries see only themselves, so no row is empty
        mask[b, 0, range(start, L), range(start, L)] = True
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "position_ids": position_ids, "mask": mask,
            "targets": [tuple(as_t(x) for x in t) for t in targets],
            "slot_tokens": [sum(len(p) + len(cs[j]) for p, cs in rows if j < len(cs)) for j in range(slots)]}


def shared_prompt_logps(model, packed: dict, grad_slots: tuple = (0,)) -> list:
    """Per completion slot, (B,) summed log-probs and (B,) scored lengths; slots not in grad_slots
    carry no gradient."""
    device = packed["input_ids"].device
    hidden = model.base_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              attention_mask=packed["mask"]).last_hidden_state  # (B, L, H)
    head, B = model.get_output_embeddings(), packed["input_ids"].shape[0]
    out = []
    for j, target in enumerate(packed["targets"]):
        rows, cols, labels = (x.to(device) for x in target)
        h = hidden if j in grad_slots else hidden.detach()
        with contextlib.nullcontext() if j in grad_slots else torch.no_grad():
            logps = head_logps(head, h[rows, cols], labels)  # (N_j,)
            seq = torch.zeros(B, dtype=torch.float32, device=device).index_add(0, rows, logps)  # (B,)
        lengths = torch.zeros(B, dtype=torch.long, device=device).index_add(0, rows, torch.ones_like(rows))
        out.append(Logps(seq=seq, lengths=lengths))
    return out

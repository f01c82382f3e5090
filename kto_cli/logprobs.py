"""Per-sequence log-probabilities of completion tokens.

KTO and DPO need log pi(y_t | x, y_<t) only where y_t is a completion token, so the LM head (a
vocabulary-sized matmul and log-softmax) runs only at the positions that predict one, in chunks:
no float32 log-softmax over the vocabulary is materialised for the whole batch.
"""
import torch

HEAD_CHUNK = 1024  # rows of hidden states sent through the LM head at once


def supports_sparse_head(model) -> bool:
    """Models whose logits are not a plain linear map of the last hidden state need the full path."""
    c = model.config
    return (getattr(c, "final_logit_softcapping", None) is None and getattr(c, "logit_scale", None) is None
            and model.get_output_embeddings() is not None)


def completion_logps(model, batch: dict) -> torch.Tensor:
    """Sum over completion tokens of log pi(token | prefix), per sequence. Returns (B,)."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]  # (B, T)
    targets = completion_mask[:, 1:]  # (B, T-1): position t predicts token t+1
    rows, cols = targets.nonzero(as_tuple=True)  # (N,), (N,)
    labels = input_ids[rows, cols + 1]  # (N,)
    if supports_sparse_head(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
        token_logps = head_logps(model.get_output_embeddings(), hidden[rows, cols], labels)  # (N,)
    else:
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        token_logps = head_logps(lambda h: h, logits[rows, cols], labels)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, token_logps)  # (B,)


def head_logps(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[label] for each row, computed HEAD_CHUNK rows at a time. (N,)"""
    parts = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[start:start + HEAD_CHUNK]).float()  # (n, V)
        lab = labels[start:start + HEAD_CHUNK, None]  # (n, 1)
        parts.append(logits.gather(1, lab).squeeze(1) - torch.logsumexp(logits, dim=-1))  # (n,)
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def logps_of(model, sequences: list, batch_size: int, pad_id: int, device, autocast, progress=None) -> torch.Tensor:
    """completion_logps for many (prompt ids, completion ids) pairs, batched by length so little
    padding is computed; returned in the order given. (N,) float32 on CPU."""
    from .data import collate

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    out = torch.empty(len(sequences), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], pad_id).items()}
        with autocast():
            out[idx] = completion_logps(model, batch).float().cpu()
        if progress is not None:
            progress.update(len(idx))
    return out

"""Attention over shared-prompt and packed rows without an (L, L) mask.

A row laid out by `logprobs.packed_batch` is a run of groups P + C_1 + ... + C_m (then padding);
C_j sees P and itself, causally, and nothing else. A dense (B, 1, L, L) mask says so at O(B L^2)
memory, and with an arbitrary mask no attention kernel can skip the masked blocks. The same
attention, exactly, is a few plain calls per group:

    P      attends to P                   causal (upper-left)
    C_j    attends to P + C_j             causal, aligned lower-right: query i sees keys <= |P| + i

so `Blocks` (the groups' offsets, a few ints per row) replaces the mask, and `block_attention`
runs those calls through SDPA, which on a GPU takes the flash kernel for both (lower-right causal
included) and on CPU its fused kernel. transformers finds the function through its "sdpa"
attention entry (installed by `install`), which does exactly what it did before unless a forward
carries `blocks=`; a dummy 4D attention mask makes transformers skip building a mask of its own.

Forms per kernel (`kernel_inputs`): sdpa -> Blocks; flex_attention -> a BlockMask whose mask_mod
reads (B, L) group and branch ids (O(B L), blocks outside every group skipped); eager -> the
dense additive mask; flash-attention-2/3 -> position ids restarting per group (their variable-length
path), for packed rows without a shared prompt only.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from .config import BLOCKS_FROM


@dataclass(frozen=True)
class Blocks:
    """Per row, its groups as (start, prompt length, completion lengths), in order."""
    rows: tuple


def _sdpa(q, k, v, mask=None, causal=False, scale=None, dropout=0.0):
    """Plain SDPA on (H, Tq, D) x (H, Tk, D), batch of one. (H, Tq, D)"""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                          dropout_p=dropout, scale=scale)[0]


def _group_attention(q, k, v, start: int, p: int, completions: tuple, scale, dropout) -> list:
    """Outputs (H, T, D) for one group's prompt and completions, in row order."""
    out = [_sdpa(q[:, start:start + p], k[:, start:start + p], v[:, start:start + p],
                 causal=True, scale=scale, dropout=dropout)] if p else []
    kp, vp = k[:, start:start + p], v[:, start:start + p]  # (H, p, D)
    at = start + p
    for c in completions:
        if c:
            keys = torch.cat([kp, k[:, at:at + c]], 1)  # (H, p + c, D)
            values = torch.cat([vp, v[:, at:at + c]], 1)
            # lower-right causal: completion token i sees the whole prompt and its own tokens <= i
            mask = torch.ones(c, p + c, dtype=torch.bool, device=q.device).tril(p)  # (c, p + c)
            out.append(_sdpa(q[:, at:at + c], keys, values, mask=mask, scale=scale, dropout=dropout))
        at += c
    return out


def block_attention(query, key, value, blocks: Blocks, scale=None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of (B, H, L, D) queries over (B, H, L, D) keys/values laid out as `blocks`;
    padding positions get zeros (nothing reads them). (B, H, L, D)"""
    B, H, L, D = query.shape
    rows = []
    for b, groups in enumerate(blocks.rows):
        parts = [piece for start, p, cs in groups
                 for piece in _group_attention(query[b], key[b], value[b], start, p, cs, scale, dropout)]
        used = sum(part.shape[1] for part in parts)
        parts.append(query.new_zeros(H, L - used, D))  # (H, padding, D)
        rows.append(torch.cat(parts, 1))
    return torch.stack(rows)


def sdpa_or_blocks(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                   blocks: Blocks = None, **kwargs):
    """transformers' "sdpa" entry: its own function, or block_attention for a forward that carries
    `blocks`. Returns ((B, L, H, D), None) as every transformers attention function does."""
    if blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for unsupported in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"shared-prompt attention blocks do not support {unsupported}")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, L, D)
    out = block_attention(query, key, value, blocks, scale=scaling, dropout=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def install() -> None:
    """Route transformers' "sdpa" attention through sdpa_or_blocks (idempotent; forwards without
    `blocks` are unchanged)."""
    if AttentionInterface._global_mapping.get("sdpa") is not sdpa_or_blocks:
        AttentionInterface.register("sdpa", sdpa_or_blocks)


def dense_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The same attention as a (B, 1, L, L) boolean mask (True: may attend), from (B, L) group ids
    (-1 on padding) and branch ids (0 on prompts, j + 1 on completion j): the plain form, for
    kernels that read only a mask. Padding sees itself, so no softmax row is empty."""
    L = segment.shape[1]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    q_br, k_br = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment.device).tril()  # (L, L)
    mask = causal & (q_seg == k_seg) & (k_seg >= 0) & ((k_br == 0) | (k_br == q_br))  # (B, L, L)
    return (mask | torch.eye(L, dtype=torch.bool, device=segment.device))[:, None]


def block_mask(segment: torch.Tensor, branch: torch.Tensor):
    """The same attention as a flex-attention BlockMask, its mask_mod reading the (B, L) ids: no
    (L, L) tensor, and blocks outside every group are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        same = (segment[b, q] == segment[b, kv]) & (segment[b, kv] >= 0)
        visible = (branch[b, kv] == 0) | (branch[b, kv] == branch[b, q])
        return ((q >= kv) & same & visible) | (q == kv)
    B, L = segment.shape
    return create_block_mask(mask_mod, B, None, L, L, device=segment.device)


def form(kernel: str, blocks: Optional[int] = BLOCKS_FROM) -> str:
    """How kernel_inputs lays out the attention for `kernel`, in words (for the log)."""
    if kernel == "sdpa" and blocks is not None:
        return f"blocks (sdpa per group, no L x L mask) for rows of {blocks}+ tokens, a dense mask below"
    if kernel.startswith("flash_attention"):
        return f"{kernel}'s variable-length path (positions restarting per group)"
    if kernel == "flex_attention":
        return "a flex-attention BlockMask (no L x L mask)"
    return f"a dense (B, 1, L, L) mask ({kernel})"


def kernel_inputs(kernel: str, dtype: torch.dtype, packed: dict, blocks: Optional[int] = BLOCKS_FROM) -> dict:
    """What the model's forward takes besides input_ids for a packed batch, per attention kernel
    (dtype: the model's, for eager's additive mask). sdpa: by blocks for rows of at least `blocks`
    tokens, through the dense mask below (None: always the mask, the plain form)."""
    segment, branch = packed["segment"], packed["branch"]
    if kernel == "sdpa" and blocks is not None and segment.shape[1] >= blocks:
        install()
        # any 4D mask makes transformers pass it through instead of building one; it is not read
        return {"attention_mask": segment.new_ones(segment.shape[0], 1, 1, 1, dtype=torch.bool),
                "blocks": packed["blocks"], "position_ids": packed["position_ids"]}
    if kernel.startswith("flash_attention"):
        if int(branch.max()) > 1:
            raise ValueError(f"{kernel} cannot express shared-prompt rows (completions hidden from each other)")
        # no mask and restarting positions: transformers runs its variable-length path per group
        return {"attention_mask": None, "position_ids": packed["position_ids"]}
    if kernel == "flex_attention":
        return {"attention_mask": block_mask(segment, branch), "position_ids": packed["position_ids"]}
    mask = dense_mask(segment, branch)
    if kernel == "eager":  # eager adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": packed["position_ids"]}

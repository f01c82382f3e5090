"""What each loss needs (pairs or examples, a reference, KL partners, per-token log-probs, a value
head), and how the loop feeds its pure function in kto_cli/losses.py.

The loop asks `needs(name)` to do only the work the chosen loss needs, `units(...)` for what one
batch element is, and `compute(...)` for (loss, metrics) from the log-probs it computed.
"""
from dataclasses import asdict, dataclass

import torch

from . import losses
from .config import UserError
from .data import Split


@dataclass(frozen=True)
class Needs:
    paired: bool = False  # batch elements are (chosen, rejected) pairs of examples
    reference: bool = True  # reference log-probs from the pre-pass
    kl: bool = False  # the KL sequences (x_i, y_partner(i)) of each example
    per_token: bool = False  # per-token log-probs (reference and policy)
    value_head: bool = False
    desirable_only: bool = False  # trains on desirable examples only
    control_tokens: bool = False


NEEDS = {
    "kto": Needs(kl=True),
    "kto_zero": Needs(),
    "apo_zero_unpaired": Needs(),
    "dpo": Needs(paired=True),
    "cdpo": Needs(paired=True),
    "ipo": Needs(paired=True),
    "slic": Needs(paired=True, reference=False),
    "simpo": Needs(paired=True, reference=False),
    "orpo": Needs(paired=True, reference=False),
    "sft": Needs(reference=False, desirable_only=True),
    "csft": Needs(reference=False, control_tokens=True),
    "ppo": Needs(per_token=True, value_head=True),
}
# Config fields the loop uses itself rather than passing to the loss function.
LOOP_FIELDS = {"name", "auto_desirable_weight", "good_token", "bad_token"}


def needs(name: str) -> Needs:
    if name not in NEEDS:
        raise UserError(f"unknown loss '{name}' (known: {', '.join(sorted(NEEDS))})")
    return NEEDS[name]


def hyperparameters(loss_cfg) -> dict:
    return {k: v for k, v in asdict(loss_cfg).items() if k not in LOOP_FIELDS}


def units(split: Split, need: Needs) -> list:
    """The batch elements of a split: example indices, or (chosen, rejected) index pairs."""
    if need.paired:
        return split.pairs()
    if need.desirable_only:
        return [i for i, e in enumerate(split.examples) if e.desirable]
    return list(range(len(split)))


def check_data(name: str, need: Needs, split: Split, source: str, unpair_one: bool) -> None:
    """One clear line when the data cannot feed the loss."""
    if need.paired and not split.pairs():
        if unpair_one:
            raise UserError(f"loss={name} trains on preference pairs, but dataset.unpair=one keeps one completion "
                            "per prompt: set dataset.unpair=both")
        raise UserError(f"loss={name} needs preference pairs and {source} has none: use rows with 'prompt', "
                        "'chosen' and 'rejected', or set dataset.pair_by_prompt=true to pair each prompt's "
                        "desirable and undesirable completions")
    if not units(split, need):
        raise UserError(f"loss={name} has nothing to train on in {source}"
                        + (" (it trains on desirable examples, and there are none)" if need.desirable_only else ""))


def single_process(t: torch.Tensor) -> torch.Tensor:
    return t


def compute(name: str, params: dict, policy, ref: dict, desirable: torch.Tensor, kl=None, values=None,
            reduce=single_process, ranks: int = 1) -> tuple:
    """(loss, metrics) of one batch. policy: logprobs.Logps of the batch's sequences (for paired
    losses the chosen ones first, then the rejected); ref: the reference's "seq" (B,) and, for
    per-token losses, "tokens" (B, L) for the same sequences; desirable: (B,) bool; kl: KTO's KL
    estimate over every rank's KL sequences. reduce sums a tensor over the `ranks` ranks whose
    micro-batches make up this batch (token-normalised losses divide by their union's tokens)."""
    if NEEDS[name].paired:
        P = policy.seq.shape[0] // 2
        c, r = policy.seq[:P], policy.seq[P:]  # (P,), (P,)
        c_len, r_len = policy.lengths[:P].float(), policy.lengths[P:].float()
        if name in ("dpo", "cdpo"):
            return losses.dpo_loss(c, r, ref["seq"][:P], ref["seq"][P:], **params)
        if name == "ipo":
            return losses.ipo_loss(c, r, ref["seq"][:P], ref["seq"][P:], c_len, r_len, **params)
        if name == "slic":
            return losses.slic_loss(c, r, **params)
        if name == "simpo":
            return losses.simpo_loss(c, r, c_len, r_len, **params)
        if name == "orpo":
            return losses.orpo_loss(c, r, c_len, r_len, **params)
    elif name == "kto":
        return losses.kto_loss(policy.seq, ref["seq"], desirable, kl, **params)
    elif name in ("kto_zero", "apo_zero_unpaired"):
        return losses.kto_zero_loss(policy.seq, ref["seq"], desirable, **params)
    elif name in ("sft", "csft"):
        return losses.sft_loss(policy.seq, policy.lengths.float(), reduce(policy.lengths.sum().float()) / ranks)
    elif name == "ppo":
        return ppo(params, policy, ref, desirable, values, reduce, ranks)
    raise ValueError(f"loss '{name}' has needs but no computation")


def ppo(params: dict, policy, ref: dict, desirable: torch.Tensor, values, reduce, ranks: int) -> tuple:
    """PPO's advantages are whitened over every rank's micro-batch: their moments are summed first."""
    gae_params = {k: params[k] for k in ("gamma", "lam")}
    rest = {k: v for k, v in params.items() if k not in gae_params}
    advantages, returns = losses.ppo_advantages(values, policy.mask, desirable, **gae_params)
    moments = reduce(losses.token_moments(advantages, policy.mask))
    return losses.ppo_loss(policy.tokens, ref["tokens"][:, : policy.tokens.shape[1]], values, policy.mask, desirable,
                           advantages, returns, moments, ranks, **rest)

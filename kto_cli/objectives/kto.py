"""KTO (Ethayarajh et al. 2024, Eq. 8) and its z = 0 ablation."""
import logging
from dataclasses import dataclass

import torch

from .. import losses
from ..config import LossConfig
from .base import LossInputs, Needs, Objective, register

log = logging.getLogger("kto_cli")

# The KTO paper's recommended range for lambda_D * n_D / (lambda_U * n_U).
KTO_WEIGHT_RANGE = (1.0, 4.0 / 3.0)


@dataclass
class KTOLossConfig(LossConfig):
    name: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D
    undesirable_weight: float = 1.0  # lambda_U
    # Set lambda_D so that lambda_D * n_D / (lambda_U * n_U) = 1, the bottom of the paper's range.
    auto_desirable_weight: bool = False
    # Plus this weight times the token-mean NLL of the desirable completions (0: the paper's loss).
    # An anchor: pushing wrong short answers down also lowers right ones sharing their tokens, and
    # the KTO sigmoid stops pulling a desirable answer back once it is a few nats below the reference.
    sft_weight: float = 0.0


@dataclass
class KTOZeroLossConfig(KTOLossConfig):
    name: str = "kto_zero"


def kto_weights(loss: KTOLossConfig, n_desirable: int, n_undesirable: int) -> tuple:
    """(lambda_D, lambda_U), with lambda_D set from the data when asked; warns below the paper's range
    and notes a ratio above it."""
    w_d, w_u = loss.desirable_weight, loss.undesirable_weight
    if n_desirable == 0 or n_undesirable == 0:
        log.warning("training data has %d desirable and %d undesirable examples; KTO learns best from both",
                    n_desirable, n_undesirable)
        return w_d, w_u
    if loss.auto_desirable_weight:
        w_d = w_u * n_undesirable / n_desirable
        log.info("loss.auto_desirable_weight: lambda_D = %.4f (lambda_U = %.4f)", w_d, w_u)
    ratio = w_d * n_desirable / (w_u * n_undesirable)
    lo, hi = (w_u * n_undesirable / n_desirable * r for r in KTO_WEIGHT_RANGE)
    where = (f"lambda_D*n_D/(lambda_U*n_U) = {ratio:.3f} is outside [1, 4/3], the range the KTO paper recommends "
             f"(n_D={n_desirable}, n_U={n_undesirable}): loss.desirable_weight between {lo:.3f} and {hi:.3f}, "
             "or loss.auto_desirable_weight=true, puts it inside")
    # Below the range the undesirable side outweighs the desirable one, the imbalance the paper
    # warns of; above it the weights lean to the desirable side, a deliberate choice (e.g. the
    # default job's loss=kto_short_answers), reported without alarm.
    if ratio < KTO_WEIGHT_RANGE[0] - 1e-9:
        log.warning(where)
    elif ratio > KTO_WEIGHT_RANGE[1] + 1e-9:
        log.info(where)
    return w_d, w_u


@register
class KTO(Objective):
    name, schema, needs = "kto", KTOLossConfig, Needs(kl=True)
    hook_fields = ("auto_desirable_weight", "sft_weight")

    def prepare(self, splits: dict, tokenizer, label_counts: tuple) -> None:
        self.params["desirable_weight"], self.params["undesirable_weight"] = kto_weights(self.cfg, *label_counts)

    def loss(self, x: LossInputs) -> tuple:
        return self.anchored(x, *losses.kto_loss(x.policy.seq, x.ref["seq"], x.desirable, x.kl, **self.params))

    def anchored(self, x: LossInputs, loss: torch.Tensor, metrics: dict) -> tuple:
        """loss + sft_weight * the desirable completions' token-mean NLL (over every rank's micro-batch)."""
        if not self.cfg.sft_weight:
            return loss, metrics
        lengths = x.policy.lengths[x.desirable].float()  # (D,) the desirable completions' tokens
        nll, _ = losses.sft_loss(x.policy.seq[x.desirable], lengths, x.reduce(lengths.sum()) / x.ranks)
        return loss + self.cfg.sft_weight * nll, metrics | {"sft_loss": nll.detach().reshape(1)}


@register
class KTOZero(KTO):
    """The reference point fixed at z = 0: no KL sequences (also TRL's apo_zero_unpaired)."""
    name, schema, needs = "kto_zero", KTOZeroLossConfig, Needs()

    def loss(self, x: LossInputs) -> tuple:
        return self.anchored(x, *losses.kto_zero_loss(x.policy.seq, x.ref["seq"], x.desirable, **self.params))

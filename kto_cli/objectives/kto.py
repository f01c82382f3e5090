"""KTO (Ethayarajh et al. 2024, Eq. 8) and its z = 0 ablation."""
import logging
from dataclasses import dataclass

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


@dataclass
class KTOZeroLossConfig(KTOLossConfig):
    name: str = "kto_zero"


def kto_weights(loss: KTOLossConfig, n_desirable: int, n_undesirable: int) -> tuple:
    """(lambda_D, lambda_U), with lambda_D set from the data when asked; warns outside the paper's range."""
    w_d, w_u = loss.desirable_weight, loss.undesirable_weight
    if n_desirable == 0 or n_undesirable == 0:
        log.warning("training data has %d desirable and %d undesirable examples; KTO learns best from both",
                    n_desirable, n_undesirable)
        return w_d, w_u
    if loss.auto_desirable_weight:
        w_d = w_u * n_undesirable / n_desirable
        log.info("loss.auto_desirable_weight: lambda_D = %.4f (lambda_U = %.4f)", w_d, w_u)
    ratio = w_d * n_desirable / (w_u * n_undesirable)
    if not KTO_WEIGHT_RANGE[0] - 1e-9 <= ratio <= KTO_WEIGHT_RANGE[1] + 1e-9:
        lo, hi = (w_u * n_undesirable / n_desirable * r for r in KTO_WEIGHT_RANGE)
        log.warning("lambda_D*n_D/(lambda_U*n_U) = %.3f is outside [1, 4/3], the range the KTO paper recommends "
                    "(n_D=%d, n_U=%d): set loss.desirable_weight between %.3f and %.3f, or "
                    "loss.auto_desirable_weight=true", ratio, n_desirable, n_undesirable, lo, hi)
    return w_d, w_u


@register
class KTO(Objective):
    name, schema, needs = "kto", KTOLossConfig, Needs(kl=True)
    hook_fields = ("auto_desirable_weight",)

    def prepare(self, splits: dict, tokenizer, label_counts: tuple) -> None:
        self.params["desirable_weight"], self.params["undesirable_weight"] = kto_weights(self.cfg, *label_counts)

    def loss(self, x: LossInputs) -> tuple:
        return losses.kto_loss(x.policy.seq, x.ref["seq"], x.desirable, x.kl, **self.params)


@register
class KTOZero(KTO):
    """The reference point fixed at z = 0: no KL sequences (also TRL's apo_zero_unpaired)."""
    name, schema, needs = "kto_zero", KTOZeroLossConfig, Needs()

    def loss(self, x: LossInputs) -> tuple:
        return losses.kto_zero_loss(x.policy.seq, x.ref["seq"], x.desirable, **self.params)

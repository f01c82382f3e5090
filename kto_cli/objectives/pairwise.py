"""Losses over preference pairs: DPO (and cDPO), IPO, SLiC-HF, SimPO, ORPO."""
from dataclasses import dataclass

from .. import losses
from ..config import LossConfig, UserError
from .base import LossInputs, Needs, Paired, register

REFERENCE_FREE = Needs(paired=True, reference=False)


@dataclass
class DPOLossConfig(LossConfig):
    name: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # epsilon of conservative DPO (cdpo)


@register
class DPO(Paired):
    name, schema = "dpo", DPOLossConfig

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if not 0 <= cfg.label_smoothing < 0.5:
            raise UserError(f"invalid config: loss.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")

    def loss(self, x: LossInputs) -> tuple:
        c, r, _, _, ref_c, ref_r = self.sides(x)
        return losses.dpo_loss(c, r, ref_c, ref_r, **self.params)


@dataclass
class IPOLossConfig(LossConfig):
    name: str = "ipo"
    tau: float = 0.1


@register
class IPO(Paired):
    name, schema = "ipo", IPOLossConfig

    def loss(self, x: LossInputs) -> tuple:
        c, r, c_len, r_len, ref_c, ref_r = self.sides(x)
        return losses.ipo_loss(c, r, ref_c, ref_r, c_len, r_len, **self.params)


@dataclass
class SLiCLossConfig(LossConfig):
    name: str = "slic"
    beta: float = 1.0  # the calibration margin
    lambda_coef: float = 0.1  # weight of the chosen completion's NLL


@register
class SLiC(Paired):
    name, schema, needs = "slic", SLiCLossConfig, REFERENCE_FREE

    def loss(self, x: LossInputs) -> tuple:
        c, r, *_ = self.sides(x)
        return losses.slic_loss(c, r, **self.params)


@dataclass
class SimPOLossConfig(LossConfig):
    name: str = "simpo"
    beta: float = 2.0
    gamma: float = 0.5  # target reward margin


@register
class SimPO(Paired):
    name, schema, needs = "simpo", SimPOLossConfig, REFERENCE_FREE

    def loss(self, x: LossInputs) -> tuple:
        c, r, c_len, r_len, _, _ = self.sides(x)
        return losses.simpo_loss(c, r, c_len, r_len, **self.params)


@dataclass
class ORPOLossConfig(LossConfig):
    name: str = "orpo"
    lam: float = 0.1  # weight of the odds-ratio term


@register
class ORPO(Paired):
    name, schema, needs = "orpo", ORPOLossConfig, REFERENCE_FREE

    def loss(self, x: LossInputs) -> tuple:
        c, r, c_len, r_len, _, _ = self.sides(x)
        return losses.orpo_loss(c, r, c_len, r_len, **self.params)

"""Offline PPO as in the KTO paper (HALOs): reward +1 / -1 on the last token, a value head, GAE."""
from dataclasses import dataclass

import torch

from .. import losses
from ..config import LossConfig, UserError
from .base import LossInputs, Needs, Objective, register


@dataclass
class PPOLossConfig(LossConfig):
    name: str = "ppo"
    gamma: float = 0.99
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.5  # the ratio is clipped to [cliprange, 1 / cliprange]
    kl_coef: float = 0.1
    critic_coef: float = 0.01


@register
class PPO(Objective):
    name, schema, needs = "ppo", PPOLossConfig, Needs(per_token=True, value_head=True)

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if not 0 < cfg.cliprange < 1:
            raise UserError(f"invalid config: loss.cliprange must be in (0, 1), got {cfg.cliprange}")

    def value_head(self, hidden_size: int) -> torch.nn.Module:
        return torch.nn.Linear(hidden_size, 1)

    def loss(self, x: LossInputs) -> tuple:
        """Advantages are whitened over every rank's micro-batch: their moments are summed first."""
        gae = {k: self.params[k] for k in ("gamma", "lam")}
        rest = {k: v for k, v in self.params.items() if k not in gae}
        mask = x.policy.mask
        advantages, returns = losses.ppo_advantages(x.values, mask, x.desirable, **gae)
        moments = x.reduce(losses.token_moments(advantages, mask))
        ref_tokens = x.ref["tokens"][:, : x.policy.tokens.shape[1]]
        return losses.ppo_loss(x.policy.tokens, ref_tokens, x.values, mask, x.desirable, advantages, returns, moments,
                               x.ranks, **rest)

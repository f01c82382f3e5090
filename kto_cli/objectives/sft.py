"""Supervised fine-tuning on the desirable completions, and conditional SFT (Korbak et al. 2023)."""
import logging
from dataclasses import dataclass

from .. import losses
from ..config import LossConfig
from .base import LossInputs, Needs, Objective, register

log = logging.getLogger("kto_cli")


@dataclass
class SFTLossConfig(LossConfig):
    name: str = "sft"


@register
class SFT(Objective):
    name, schema, needs = "sft", SFTLossConfig, Needs(reference=False, desirable_only=True)

    def loss(self, x: LossInputs) -> tuple:
        """Token mean over the union of every rank's micro-batch (see losses.sft_loss)."""
        tokens = x.reduce(x.policy.lengths.sum().float()) / x.ranks
        return losses.sft_loss(x.policy.seq, x.policy.lengths.float(), tokens)


@dataclass
class CSFTLossConfig(LossConfig):
    name: str = "csft"
    good_token: str = "<|good|>"  # ends the prompt of desirable examples, and of every prompt at sampling
    bad_token: str = "<|bad|>"  # ends the prompt of undesirable examples


@register
class CSFT(SFT):
    """Each prompt ends with a control token, good for desirable and bad for undesirable
    completions, trained with NLL on all of them; held-out prompts and final/'s chat template end
    with the good token, as sampling will."""
    name, schema, needs = "csft", CSFTLossConfig, Needs(reference=False)
    hook_fields = ("good_token", "bad_token")

    def special_tokens(self) -> list:
        return [self.cfg.good_token, self.cfg.bad_token]

    def prepare(self, splits: dict, tokenizer, label_counts: tuple) -> None:
        good, bad = tokenizer.convert_tokens_to_ids([self.cfg.good_token, self.cfg.bad_token])
        splits["train"].add_control_tokens(good, bad)
        if "eval" in splits:
            splits["eval"].add_control_tokens(good, None)  # evaluated as sampled: conditioned on "good"

    def export(self, tokenizer) -> None:
        """final/'s chat template ends every generation prompt with the good control token, so
        sampling with apply_chat_template(add_generation_prompt=True) uses it."""
        if getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template += "{% if add_generation_prompt %}{{ '" + self.cfg.good_token + "' }}{% endif %}"
        else:
            log.warning("the tokenizer has no chat template: end prompts with %s when sampling from final/",
                        self.cfg.good_token)

"""What a loss is to the loop: an Objective owns its config schema (every hyperparameter's
default, written once), its Needs (pairs, a reference, KL partners, per-token log-probs, a value
head, control tokens), its hooks (preparing data and weights, extra modules, export) and the call
of its pure function in kto_cli/losses.py. The loop sees Needs and hooks, never a loss's name.

Adding a loss is one file in this package: a schema dataclass and a @register'ed Objective.
"""
from dataclasses import asdict, dataclass, fields
from typing import Callable, ClassVar, Optional

import numpy as np
import torch

from ..config import LossConfig, UserError
from ..data import Split
from ..logprobs import Logps


@dataclass(frozen=True)
class Needs:
    paired: bool = False  # batch elements are (chosen, rejected) pairs of examples
    reference: bool = True  # reference log-probs from the pre-pass
    kl: bool = False  # the KL sequences (x_i, y_partner(i)) of each example
    per_token: bool = False  # per-token log-probs (reference and policy)
    value_head: bool = False  # the objective's extra module runs on the hidden states
    desirable_only: bool = False  # trains on desirable examples only


def single_process(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class LossInputs:
    """What the loop hands a loss for one micro-batch."""
    policy: Logps  # the batch's sequences; for paired losses the chosen ones first, then the rejected
    ref: dict  # the reference's "seq" (B,) and, for per-token losses, "tokens" (B, L)
    desirable: torch.Tensor  # (B,) bool
    kl: Optional[torch.Tensor] = None  # KTO's KL estimate over every rank's KL sequences
    values: Optional[torch.Tensor] = None  # (B, L) the value head's estimates (ppo)
    reduce: Callable = single_process  # sums a tensor over the ranks whose micro-batches make up this batch
    ranks: int = 1  # how many


class Objective:
    """One loss. Subclasses set name, schema and needs, and define loss(); the hooks default to
    doing nothing."""
    name: ClassVar[str]
    schema: ClassVar[type]
    needs: ClassVar[Needs] = Needs()
    hook_fields: ClassVar[tuple] = ()  # schema fields for the hooks, not for the loss function

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.params = {k: v for k, v in asdict(cfg).items() if k != "name" and k not in self.hook_fields}

    @classmethod
    def validate(cls, cfg: LossConfig) -> None:
        """The checks a type cannot express: one UserError line naming the key."""
        for f in fields(cfg):
            if f.name in ("beta", "tau", "desirable_weight", "undesirable_weight") and getattr(cfg, f.name) <= 0:
                raise UserError(f"invalid config: loss.{f.name} must be positive, got {getattr(cfg, f.name)}")
            if f.name == "sft_weight" and getattr(cfg, f.name) < 0:
                raise UserError(f"invalid config: loss.sft_weight must be 0 or positive, got {cfg.sft_weight}")

    def special_tokens(self) -> list:
        """Tokens the tokenizer (and the embeddings) must gain."""
        return []

    def prepare(self, splits: dict, tokenizer, label_counts: tuple) -> None:
        """Once the data is tokenized: adjust it or the hyperparameters (label_counts: the training
        split's (desirable, undesirable) examples)."""

    def value_head(self, hidden_size: int) -> Optional[torch.nn.Module]:
        """An extra trained module on the hidden states (needs.value_head)."""
        return None

    def loss(self, x: LossInputs) -> tuple:
        """(loss, metrics) of one micro-batch, from the pure function in kto_cli/losses.py."""
        raise NotImplementedError

    def export(self, tokenizer) -> None:
        """Before final/ is written: adjust what is exported with the model."""


class Paired(Objective):
    """A loss over (chosen, rejected) pairs: split the batch's log-probs into the two sides."""
    needs: ClassVar[Needs] = Needs(paired=True)

    @staticmethod
    def sides(x: LossInputs) -> tuple:
        """(chosen, rejected, chosen lengths, rejected lengths, ref chosen, ref rejected), each (P,);
        the reference ones None for reference-free losses."""
        P = x.policy.seq.shape[0] // 2
        lengths = x.policy.lengths.float()
        ref = x.ref.get("seq")
        return (x.policy.seq[:P], x.policy.seq[P:], lengths[:P], lengths[P:],
                None if ref is None else ref[:P], None if ref is None else ref[P:])


REGISTRY: dict = {}  # schema class -> Objective subclass


def register(cls: type) -> type:
    """Class decorator: makes `loss=cls.name` compose cls.schema and train through cls."""
    if cls.schema in REGISTRY:
        raise ValueError(f"loss schema {cls.schema.__name__} is registered twice")
    if cls.schema().name != cls.name:
        raise ValueError(f"{cls.schema.__name__}.name defaults to {cls.schema().name!r}, not {cls.name!r}")
    REGISTRY[cls.schema] = cls
    return cls


def objective_class(cfg: LossConfig) -> type:
    """The Objective of a composed loss config (presets such as cdpo share their base's schema)."""
    if type(cfg) not in REGISTRY:
        raise UserError(f"loss '{cfg.name}' has no registered objective (known: "
                        f"{', '.join(sorted(c.name for c in REGISTRY.values()))})")
    return REGISTRY[type(cfg)]


def create(cfg: LossConfig) -> Objective:
    return objective_class(cfg)(cfg)


def choices() -> list:
    """Every `loss=` option: the registered losses and the named presets in conf/loss/."""
    from importlib import resources
    presets = [p.name[:-5] for p in (resources.files("kto_cli.conf") / "loss").iterdir() if p.name.endswith(".yaml")]
    return sorted({c.name for c in REGISTRY.values()} | set(presets))


def units(split: Split, need: Needs) -> np.ndarray:
    """The batch elements of a split: (U,) example indices, or (U, 2) (chosen, rejected) index pairs."""
    if need.paired:
        return split.pairs()
    if need.desirable_only:
        return np.flatnonzero(split.labels)
    return np.arange(len(split))


def check_data(name: str, need: Needs, split: Split, source: str, unpair_one: bool) -> None:
    """One clear line when the data cannot feed the loss."""
    if need.paired and not len(split.pairs()):
        if unpair_one:
            raise UserError(f"loss={name} trains on preference pairs, but dataset.unpair=one keeps one completion "
                            "per prompt: set dataset.unpair=both")
        raise UserError(f"loss={name} needs preference pairs and {source} has none: use rows with 'prompt', "
                        "'chosen' and 'rejected', or set dataset.pair_by_prompt=true to pair each prompt's "
                        "desirable and undesirable completions")
    if not len(units(split, need)):
        raise UserError(f"loss={name} has nothing to train on in {source}"
                        + (" (it trains on desirable examples, and there are none)" if need.desirable_only else ""))

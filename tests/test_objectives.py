"""Each loss is one registered Objective: its schema composes as loss=NAME, its loss() calls its own
pure function (no fall-through to another loss), and a new loss is one file (the README's example)."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from kto_cli import losses
from kto_cli.config import register_configs
from kto_cli.logprobs import Logps
from kto_cli.objectives import REGISTRY, LossInputs, Objective, choices, create

from conftest import make_config

README = Path(__file__).resolve().parent.parent / "README.md"
t = torch.tensor


def inputs(per_token: bool = False) -> LossInputs:
    """Two pairs (chosen first, then rejected) with made-up log-probs, lengths and references; as
    examples, three desirable and one undesirable."""
    policy = Logps(seq=t([-2.0, -3.0, -4.0, -1.5]), lengths=t([2, 3, 4, 1]))
    ref = {"seq": t([-2.5, -2.0, -3.0, -2.0])}
    if per_token:
        policy.tokens = t([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0], [-1.5, 0.0, 0.0]])
        policy.mask = (policy.tokens != 0).float()
        ref["tokens"] = policy.tokens - 0.1 * policy.mask
    return LossInputs(policy, ref, t([True, True, True, False]), kl=t(0.3),
                      values=torch.zeros(4, 3) if per_token else None)


def expected(name: str, params: dict, x: LossInputs):
    """The pure function each loss must call, with its schema's defaults."""
    c, r, cl, rl = x.policy.seq[:2], x.policy.seq[2:], x.policy.lengths[:2].float(), x.policy.lengths[2:].float()
    rc, rr = x.ref["seq"][:2], x.ref["seq"][2:]
    return {
        "kto": lambda: losses.kto_loss(x.policy.seq, x.ref["seq"], x.desirable, x.kl, **params),
        "kto_zero": lambda: losses.kto_zero_loss(x.policy.seq, x.ref["seq"], x.desirable, **params),
        "dpo": lambda: losses.dpo_loss(c, r, rc, rr, **params),
        "ipo": lambda: losses.ipo_loss(c, r, rc, rr, cl, rl, **params),
        "slic": lambda: losses.slic_loss(c, r, **params),
        "simpo": lambda: losses.simpo_loss(c, r, cl, rl, **params),
        "orpo": lambda: losses.orpo_loss(c, r, cl, rl, **params),
        "sft": lambda: losses.sft_loss(x.policy.seq, x.policy.lengths.float()),
        "csft": lambda: losses.sft_loss(x.policy.seq, x.policy.lengths.float()),
    }[name]()


def with_defaults(name: str) -> Objective:
    """The registered loss `name` with its schema's defaults."""
    cls = next(c for c in REGISTRY.values() if c.name == name)
    return create(cls.schema())


@pytest.mark.parametrize("name", sorted(c.name for c in REGISTRY.values() if c.name != "ppo"))
def test_each_objective_calls_its_own_loss(name):
    objective = with_defaults(name)
    x = inputs()
    got, metrics = objective.loss(x)
    want, _ = expected(name, objective.params, x)
    assert got.item() == pytest.approx(want.item()) and "loss" in metrics
    others = {n: expected(n, with_defaults(n).params, x)[0].item()
              for n in ("kto", "dpo", "ipo", "slic", "simpo", "orpo", "sft") if n != name}
    assert all(abs(v - got.item()) > 1e-6 for n, v in others.items() if n not in ("sft",) or name != "csft"), others


@pytest.mark.parametrize("name", ["kto", "kto_zero"])
def test_kto_sft_weight_adds_the_desirable_token_mean_nll(name):
    """sft_weight 0.5 on inputs(): the three desirable completions have log-probs -2, -3, -4 over
    2 + 3 + 4 tokens, so the loss grows by 0.5 * 9 / 9 = 0.5 over the paper's KTO loss, logged as sft_loss 1.0."""
    cls = next(c for c in REGISTRY.values() if c.name == name)
    plain, anchored = create(cls.schema()), create(cls.schema(sft_weight=0.5))
    x = inputs()
    (base, _), (got, metrics) = plain.loss(x), anchored.loss(x)
    assert got.item() == pytest.approx(base.item() + 0.5) and metrics["sft_loss"].item() == pytest.approx(1.0)


def test_ppo_objective_whitens_and_normalises_through_the_loop_statistics():
    objective = with_defaults("ppo")
    x = inputs(per_token=True)
    loss, metrics = objective.loss(x)
    adv, ret = losses.ppo_advantages(x.values, x.policy.mask, x.desirable, gamma=0.99, lam=0.95)
    want, _ = losses.ppo_loss(x.policy.tokens, x.ref["tokens"], x.values, x.policy.mask, x.desirable, adv, ret,
                              losses.token_moments(adv, x.policy.mask), cliprange=0.5, kl_coef=0.1, critic_coef=0.01)
    assert loss.item() == pytest.approx(want.item()) and metrics["kl"].item() == pytest.approx(0.1)


def test_registry_names_match_their_schemas_and_every_choice_composes():
    assert all(cls.schema().name == cls.name for cls in REGISTRY.values())
    for name in choices():
        assert make_config("model=tiny", f"loss={name}").loss.name == name
    with pytest.raises(NotImplementedError):
        Objective(make_config("model=tiny").loss).loss(inputs())


@pytest.mark.slow
def test_the_readme_example_is_a_whole_new_loss(tmp_path):
    """The README's hinge loss, as the one file it would be, trains through kto-train."""
    from kto_cli.metrics import read_metrics
    from kto_cli.train import train

    code = re.search(r"```python\n# kto_cli/objectives/hinge.py\n(.*?)```", README.read_text(), re.S).group(1)
    spec = importlib.util.spec_from_loader("kto_cli.objectives.hinge", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "kto_cli.objectives"
    exec(compile(code, "kto_cli/objectives/hinge.py", "exec"), module.__dict__)
    try:
        register_configs()
        cfg = make_config("model=tiny", "recipe=none", "loss=hinge", "loss.beta=0.5", "trainer.progress=false", "trainer.max_steps=2",
                          "trainer.batch_size=4", "trainer.micro_batch_size=4", "dataset.max_train_rows=8",
                          "dataset.max_eval_rows=4")
        assert type(cfg.loss).__name__ == "HingeLossConfig" and cfg.loss.beta == 0.5
        summary = train(cfg, tmp_path)
        steps = read_metrics(tmp_path, "train")
        assert [r["step"] for r in steps] == [1, 2] and steps[0]["loss"] == pytest.approx(1.0)  # h = 0 at step 1
        assert summary["eval_after"]["rewards/accuracies"] is not None
    finally:
        from hydra.core.config_store import ConfigStore
        REGISTRY.pop(module.HingeLossConfig, None)
        ConfigStore.instance().repo["loss"].pop("hinge.yaml", None)  # later tests see the shipped losses only


def test_readme_loss_table_states_every_schema_default():
    """Each `loss=` option has a README row listing its hyperparameters with their defaults as the
    schema (or the named preset) sets them."""
    from dataclasses import fields
    table = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m and line.count("|") >= 5:
            table.setdefault(m.group(1), line.replace("\\|", "|"))
    for name in choices():
        cfg = make_config("model=tiny", f"loss={name}").loss
        shown = [f"`{f.name}` " + (f"`{v}`" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v))
                 for f in fields(cfg) if f.name != "name" for v in [getattr(cfg, f.name)]]
        assert name in table, f"README's loss table has no row for {name}"
        assert ", ".join(shown) in table[name] or (not shown and "none" in table[name]), (name, shown)

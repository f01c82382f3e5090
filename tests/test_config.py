"""Every shipped YAML composes; bad overrides fail at compose time with a clear message."""
from importlib import resources

import pytest
from hydra.errors import ConfigCompositionException

from kto_cli.config import ModelSource, UserError
from kto_cli.objectives import choices
from kto_cli.objectives.kto import KTOLossConfig

from conftest import make_config

CONF = resources.files("kto_cli.conf")
GROUPS = ["model", "dataset", "loss", "trainer", "deepspeed", "verifier"]


def shipped(group: str) -> list:
    """The group's options: its YAML files (and, for losses, every registered objective)."""
    if group == "loss":
        return choices()
    return sorted(p.name[:-5] for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group, name", [(g, n) for g in GROUPS for n in shipped(g)])
def test_every_shipped_yaml_composes(group, name):
    run = make_config(f"{group}={name}")
    assert getattr(run, group) is not None


def test_groups_ship_what_the_docs_promise():
    assert {"tiny", "smollm2_135m", "llama7b", "mistral7b", "pythia1b"} <= set(shipped("model"))
    assert shipped("deepspeed") == ["none", "zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
    assert "kto" in shipped("loss")


def test_default_run_is_smollm2_kto():
    """The default job: SFT phase, on-policy answers, then KTO at beta 1.0 and undesirable weight
    0.25 (a preset); loss=kto itself keeps the paper's beta 0.1 and weights 1.0."""
    run = make_config()
    assert run.model.source == ModelSource.gguf and isinstance(run.loss, KTOLossConfig)
    assert run.loss.name == "kto_short_answers" and run.trainer.sft_steps > 0 and run.online.prompts > 0
    assert (run.loss.beta, run.loss.desirable_weight, run.loss.undesirable_weight) == (1.0, 1.0, 0.25)
    plain = make_config("loss=kto", "recipe=none")  # the paper's loss, on the dataset alone
    assert (plain.loss.beta, plain.loss.undesirable_weight, plain.trainer.sft_steps, plain.online.prompts) == (0.1, 1.0, 0, 0)


@pytest.mark.parametrize("override, words", [
    ("loss.beta=abc", "loss.beta=abc"),
    ("loss.nonsense=1", "loss.nonsense"),
    ("trainer.batch_size=1.5", "trainer.batch_size"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("model=nope", "model"),
    ("dataset.columns.answer=text", "dataset.columns.answer"),
])
def test_bad_overrides_fail_at_compose(override, words):
    with pytest.raises(ConfigCompositionException) as e:
        make_config(override)
    assert words in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["trainer.batch_size=6", "trainer.micro_batch_size=4"], "not a multiple"),
    (["dataset.desirable_fraction=0"], "dataset.desirable_fraction"),
    (["dataset.max_prompt_length=600"], "max_prompt_length"),
    (["loss.beta=-1"], "loss.beta"),
    (["model=tiny", "model.source=hf", "model.name_or_path=???"], "name_or_path"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm must be positive, got -1.0"),
    (["trainer.log_every=0"], "trainer.log_every must be positive"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size must be positive"),
    (["trainer.adam_beta2=1.0"], "trainer.adam_beta2 must be in [0, 1)"),
    (["trainer.save_every=-5"], "trainer.save_every must be 0 (off) or positive"),
    (["dataset.mix=[{source: a.jsonl, weight: 0}]"], "dataset.mix[0] (a.jsonl): weight must be positive, got 0.0"),
    (["eval.max_prompts=0"], "eval.max_prompts must be positive or null"),
    (["reference.batch_size=0"], "reference.batch_size must be positive"),
])
def test_semantic_checks_fail_before_any_model_loads(overrides, words):
    with pytest.raises(UserError, match="invalid config") as e:
        make_config(*overrides)
    assert words in str(e.value)


def test_deepspeed_config_comes_from_the_trainer_config():
    """Batch sizes, accumulation, precision, clipping and the optimizer are set once, in trainer.*;
    the ZeRO group sets only ZeRO keys."""
    from kto_cli.backend import ds_config
    run = make_config("deepspeed=zero3_offload", "trainer.batch_size=32", "trainer.micro_batch_size=4",
                      "trainer.precision=bf16", "trainer.max_grad_norm=0.5", "trainer.lr=3e-6")
    c = ds_config(run, world=4)
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (32, 4, 2)
    assert c["bf16"] == {"enabled": True} and c["gradient_clipping"] == 0.5
    assert c["optimizer"]["params"]["lr"] == 3e-6
    z = c["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(UserError, match="not a multiple of trainer.micro_batch_size=4 x 3 processes"):
        ds_config(run, world=3)
    clash = make_config("deepspeed=zero2", "+deepspeed.extra.gradient_clipping=2.0")
    with pytest.raises(UserError, match="gradient_clipping"):
        ds_config(clash, world=1)
    ok = make_config("deepspeed=zero2", "+deepspeed.extra.comms_logger.enabled=true")
    assert ds_config(ok, world=1)["comms_logger"] == {"enabled": True}


@pytest.mark.parametrize("overrides, words", [
    (["deepspeed=zero2", "deepspeed.offload_param=cpu"], "offload_param needs deepspeed.stage=3"),
    (["deepspeed=zero3", "deepspeed.stage=4"], "deepspeed.stage must be"),
    (["deepspeed.offload_optimizer=cpu"], "offload_optimizer needs deepspeed.stage 1, 2 or 3"),
    (["+deepspeed.extra.comms_logger.enabled=true"], "extra needs a ZeRO stage"),
])
def test_inconsistent_deepspeed_configs_fail_at_start(overrides, words):
    with pytest.raises(UserError, match=words):
        make_config(*overrides)


def test_deepspeed_launcher_argument_does_not_reach_hydra(monkeypatch):
    from kto_cli.distributed import strip_launcher_args
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so teardown restores what was there before
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["kto-train", "--local_rank=1", "model=tiny"]) == ["kto-train", "model=tiny"]
    import os
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_launcher_args(["kto-train", "--local_rank", "3", "a=b"]) == ["kto-train", "a=b"]


SCHEMAS = {"model": "ModelConfig", "dataset": "DatasetConfig", "trainer": "TrainerConfig", "deepspeed": "DeepSpeedConfig",
           "verifier": "VerifierConfig"}


def schema_default(group: str, data: dict):
    """The schema instance a YAML of the group starts from (for a loss preset: its base loss's)."""
    from kto_cli import config
    from kto_cli.objectives import REGISTRY
    if group == "loss":
        base = next(d for d in data.get("defaults", []) if d != "_self_")
        return next(c.schema for c in REGISTRY.values() if c.name == base)()
    return getattr(config, SCHEMAS[group])()


def repeated_defaults(default, data: dict, where: str) -> list:
    from dataclasses import is_dataclass
    from enum import Enum
    found = []
    for key, value in data.items():
        if key == "defaults":
            continue
        d = getattr(default, key)
        if is_dataclass(d) and isinstance(value, dict):
            found += repeated_defaults(d, value, f"{where}.{key}")
        elif (d.value if isinstance(d, Enum) else d) == value:
            found.append(f"{where}.{key}: {value!r}")
    return found


def test_no_yaml_repeats_a_schema_default():
    """Each default is written once, in its schema: a YAML file carries only what differs (a named
    preset's values, a model's name)."""
    import yaml
    found = []
    for group in [*SCHEMAS, "loss"]:
        for path in (CONF / group).iterdir():
            if path.name.endswith(".yaml"):
                data = yaml.safe_load(path.read_text()) or {}
                found += repeated_defaults(schema_default(group, data), data, f"{group}/{path.name}")
    assert not found, found


def test_one_seed_sets_the_others_unless_they_are_set():
    run = make_config("model=tiny", "seed=3")
    assert (run.seed, run.model.tiny.seed, run.dataset.seed, run.trainer.seed) == (3, 3, 3, 3)
    run = make_config("model=tiny", "seed=3", "trainer.seed=5")
    assert (run.model.tiny.seed, run.dataset.seed, run.trainer.seed) == (3, 3, 5)
    assert make_config("model=tiny").trainer.seed == 0
    from kto_cli.config import DatasetConfig, ModelConfig, RunConfig, TrainerConfig
    built = RunConfig(seed=4, model=ModelConfig(name_or_path="tiny"), dataset=DatasetConfig(train="x"),
                      trainer=TrainerConfig())  # in code, without Hydra
    assert (built.model.tiny.seed, built.dataset.seed, built.trainer.seed) == (4, 4, 4)


@pytest.mark.parametrize("overrides, message", [
    (("trainer.sft_steps=-1",), "trainer.sft_steps must be 0 or positive"),
    (("online.prompts=-2",), "online.prompts must be 0 or positive"),
    (("loss.sft_weight=-1",), "loss.sft_weight must be 0 or positive, got -1"),
    (("eval.generation.n=0",), "eval.generation: n, max_new_tokens and batch_size must be positive"),
])
def test_sft_phase_settings_are_checked(overrides, message):
    with pytest.raises(UserError, match=message):
        make_config(*overrides)

"""Every shipped YAML composes; bad overrides fail at compose time with a clear message."""
from importlib import resources

import pytest
from hydra.errors import ConfigCompositionException

from kto_cli.config import KTOLossConfig, ModelSource, UserError

from conftest import make_config

CONF = resources.files("kto_cli.conf")
GROUPS = ["model", "dataset", "loss", "trainer", "deepspeed"]


def shipped(group: str) -> list:
    return sorted(p.name[:-5] for p in (CONF / group).iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("group, name", [(g, n) for g in GROUPS for n in shipped(g)])
def test_every_shipped_yaml_composes(group, name):
    run = make_config(f"{group}={name}")
    assert getattr(run, group) is not None


def test_groups_ship_what_the_docs_promise():
    assert {"tiny", "smollm2_135m", "llama7b", "mistral7b", "pythia1b"} <= set(shipped("model"))
    assert shipped("deepspeed") == ["none"] and "kto" in shipped("loss")


def test_default_run_is_smollm2_kto():
    run = make_config()
    assert run.model.source == ModelSource.gguf and isinstance(run.loss, KTOLossConfig)
    assert (run.loss.beta, run.loss.desirable_weight, run.loss.undesirable_weight) == (0.1, 1.0, 1.0)


@pytest.mark.parametrize("override, words", [
    ("loss.beta=abc", "loss.beta=abc"),
    ("loss.nonsense=1", "loss.nonsense"),
    ("trainer.batch_size=1.5", "trainer.batch_size"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("model=nope", "model"),
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
])
def test_semantic_checks_fail_before_any_model_loads(overrides, words):
    with pytest.raises(UserError, match="invalid config") as e:
        make_config(*overrides)
    assert words in str(e.value)

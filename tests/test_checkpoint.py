"""Checkpoints: written whole or not at all, the newest complete one found, a mismatched one
refused in one line; final/ loads in transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kto_cli.backend import Policy, TorchBackend
from kto_cli.checkpoint import Diverged, checkpoints, export_final, latest_checkpoint, load_checkpoint, save_checkpoint
from kto_cli.config import UserError
from kto_cli.models import tiny_model, tiny_tokenizer

from conftest import make_config


def tiny_backend(value_head: bool = False) -> TorchBackend:
    cfg = make_config("model=tiny")
    tok = tiny_tokenizer()
    lm = tiny_model(cfg.model, len(tok), tok.pad_token_id)
    head = torch.nn.Linear(lm.config.hidden_size, 1) if value_head else None
    return TorchBackend(Policy(lm, head), cfg, steps=4)


def identity(**change) -> dict:
    config = {"trainer": {"batch_size": 8, "log_every": 1}, "dataset": {"train": "a.jsonl"}}
    for key, value in change.items():
        part, name = key.split("__")
        config[part] = {**config[part], name: value}
    return {"config": config, "fingerprint": "fp", "data": "d1", "world": 1, "stage": None}


def test_latest_complete_checkpoint_and_refusals(tmp_path):
    backend = tiny_backend()
    save_checkpoint(tmp_path, 2, backend, identity())
    save_checkpoint(tmp_path, 10, backend, identity())
    (tmp_path / "checkpoints" / "step_0000020.tmp").mkdir()  # an interrupted save
    assert latest_checkpoint(tmp_path).name == "step_0000010"
    assert [p.name for p in checkpoints(tmp_path)] == ["step_0000010", "step_0000002"]
    assert load_checkpoint(latest_checkpoint(tmp_path), backend, identity()) == 10
    assert load_checkpoint(latest_checkpoint(tmp_path), backend, identity(trainer__log_every=5)) == 10  # logging only
    with pytest.raises(UserError, match=r"step_0000010: written under other settings: trainer.batch_size 8 -> 4; "
                                        r"the training examples .*; processes 1 -> 2\. Resume with"):
        load_checkpoint(latest_checkpoint(tmp_path), backend, {**identity(trainer__batch_size=4), "data": "d2", "world": 2})
    assert load_checkpoint(latest_checkpoint(tmp_path), backend, identity(trainer__batch_size=4), force=True) == 10
    with pytest.raises(UserError, match="not a kto-cli checkpoint"):
        load_checkpoint(tmp_path, backend, identity())
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert "torch.save" not in (tmp_path / "checkpoints" / "step_0000010" / "trainer_state.json").read_text()


def test_final_loads_in_transformers_with_the_value_head(tmp_path):
    backend = tiny_backend(value_head=True)
    export_final(tmp_path, backend, backend.policy.lm, tiny_tokenizer())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for k, v in backend.policy.lm.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert (tmp_path / "final" / "value_head.safetensors").is_file()
    assert not list(tmp_path.glob("final.tmp*"))


def test_weights_that_are_not_finite_are_never_exported(tmp_path):
    backend = tiny_backend()
    save_checkpoint(tmp_path, 3, backend, identity())
    with torch.no_grad():
        next(backend.policy.lm.parameters())[0, 0] = float("inf")
    with pytest.raises(Diverged, match=r"weights are not finite \(lm\.model\.embed_tokens\.weight\).*the last "
                                       r"checkpoint is .*step_0000003"):
        export_final(tmp_path, backend, backend.policy.lm, tiny_tokenizer())
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("final.tmp*"))


def test_data_digests_compare_within_one_form():
    """A checkpoint of an earlier version (its data digest hashed the token ids) resumes uncompared;
    digests of one form must be equal."""
    from kto_cli.checkpoint import changes
    now = {"config": {"seed": 0}, "data": "t1-" + "a" * 16, "world": 1, "stage": None}
    assert changes({**now, "data": "0123456789abcdef"}, now) == []
    assert changes({**now, "data": "t1-" + "b" * 16}, now) == ["the training examples (the data file's contents)"]

"""Checkpoints: written whole or not at all, the newest complete one found, a mismatched one
refused in one line; final/ loads in transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kto_cli.backend import Policy, TorchBackend
from kto_cli.checkpoint import Diverged, export_final, latest_checkpoint, load_checkpoint, save_checkpoint
from kto_cli.config import UserError
from kto_cli.models import tiny_model, tiny_tokenizer

from conftest import make_config


def tiny_backend(value_head: bool = False) -> TorchBackend:
    cfg = make_config("model=tiny")
    tok = tiny_tokenizer()
    lm = tiny_model(cfg.model, len(tok), tok.pad_token_id)
    head = torch.nn.Linear(lm.config.hidden_size, 1) if value_head else None
    return TorchBackend(Policy(lm, head), cfg, steps=4)


def test_latest_complete_checkpoint_and_refusals(tmp_path):
    backend = tiny_backend()
    save_checkpoint(tmp_path, 2, backend, "fp-a")
    save_checkpoint(tmp_path, 10, backend, "fp-a")
    (tmp_path / "checkpoints" / "step_0000020.tmp").mkdir()  # an interrupted save
    assert latest_checkpoint(tmp_path).name == "step_0000010"
    assert load_checkpoint(latest_checkpoint(tmp_path), backend, "fp-a") == 10
    with pytest.raises(UserError, match="another model, data or loss config"):
        load_checkpoint(latest_checkpoint(tmp_path), backend, "fp-b")
    with pytest.raises(UserError, match="not a kto-cli checkpoint"):
        load_checkpoint(tmp_path, backend, "fp-a")
    assert latest_checkpoint(tmp_path / "nowhere") is None


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
    save_checkpoint(tmp_path, 3, backend, "fp-a")
    with torch.no_grad():
        next(backend.policy.lm.parameters())[0, 0] = float("inf")
    with pytest.raises(Diverged, match=r"weights are not finite \(lm\.model\.embed_tokens\.weight\).*the last "
                                       r"checkpoint is .*step_0000003"):
        export_final(tmp_path, backend, backend.policy.lm, tiny_tokenizer())
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("final.tmp*"))

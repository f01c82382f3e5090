"""The sparse LM-head path equals log_softmax over full logits at completion positions."""
import torch

from kto_cli.config import ModelConfig, ModelSource
from kto_cli.data import collate
from kto_cli.logprobs import completion_logps, logps_of
from kto_cli import logprobs
from kto_cli.models import tiny_model


def full_reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)  # (B,)


def test_sparse_head_matches_full_logits(tiny_tok, monkeypatch):
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    seqs = [([1, 2, 3, 4], [5, 6]), ([7, 8], [9, 10, 11, 12, 13]), ([3], [4])]
    batch = collate(seqs, tiny_tok.pad_token_id)
    expected = full_reference(model, batch)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK", 3)  # several chunks
    got = completion_logps(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # batched by length, returned in the order given, padding does not change the values
    again = logps_of(model, seqs, batch_size=2, pad_id=tiny_tok.pad_token_id, device="cpu",
                     autocast=lambda: torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)

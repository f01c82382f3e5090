"""LoRA adapters (model.lora.r > 0): injected in place, only the adapters train, the reference is
the base model with the adapters off (exactly) and shares the base model's cache entry; final/
holds the merged model and the adapter in peft's layout; checkpoints hold the adapters alone and
resume exactly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kto_cli.config import LoraConfig, ModelConfig, ModelSource, UserError
from kto_cli.metrics import read_metrics
from kto_cli.models import adapters_off, add_lora, merge_lora, tiny_model

from conftest import TINY_RUN, make_config

TINY = [*TINY_RUN, "dataset.max_train_rows=16", "dataset.max_eval_rows=8", "trainer.batch_size=4",
        "trainer.micro_batch_size=4", "trainer.lr=1e-2", "eval.generation.max_new_tokens=4"]
LORA = ["model.lora.r=4", "model.lora.alpha=8"]


def tiny(tiny_tok, seed: int = 0):
    cfg = ModelConfig(source=ModelSource.tiny, name_or_path="tiny")
    cfg.tiny.seed = seed
    return tiny_model(cfg, len(tiny_tok), tiny_tok.pad_token_id)


def test_adapters_start_at_zero_and_off_they_are_the_base_model_exactly(tiny_tok):
    """With B = 0 the policy is the base to the last bit; with trained (here random) adapters it is
    not, and with them off it is again; merging gives the adapted model's logits."""
    model, ids = tiny(tiny_tok), torch.randint(0, 200, (2, 12))  # (B, T)
    with torch.no_grad():
        base = model(ids).logits  # (B, T, V)
        add_lora(model, LoraConfig(r=4, alpha=8))
        assert torch.equal(model(ids).logits, base)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
        adapted = model(ids).logits
        with adapters_off(model):
            assert torch.equal(model(ids).logits, base)
        assert not torch.equal(adapted, base)
        assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # on again, training
        merged, adapter = merge_lora(model.state_dict(), LoraConfig(r=4, alpha=8))
        plain = tiny(tiny_tok)
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-5, atol=1e-4)  # one matmul vs two
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in adapter)


def test_a_target_module_that_is_not_a_linear_layer_is_one_line(tiny_tok):
    with pytest.raises(UserError, match=r"model.lora.target_modules: qkv is not a linear layer of this model; "
                                        r"its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        add_lora(tiny(tiny_tok), LoraConfig(r=4, target_modules=["q_proj", "qkv"]))


@pytest.mark.parametrize("bad, key", [("model.lora.r=-1", "model.lora.r"), ("model.lora.alpha=0", "model.lora.alpha"),
                                      ("model.lora.dropout=1", "model.lora.dropout")])
def test_bad_lora_settings_are_one_line(bad, key):
    with pytest.raises(UserError, match=key):
        make_config(*TINY_RUN, bad)


@pytest.mark.slow
def test_a_lora_run_trains_the_adapters_shares_the_base_reference_and_exports_both(tmp_path, tiny_tok):
    """Full fine-tuning, then LoRA on the same base: the LoRA run reads every reference value from
    the full run's cache entry (the base model's) and its first loss is the same; afterwards
    final/ (merged) and the base with final/adapter loaded by peft give the same logits; a LoRA
    checkpoint holds the adapters alone, and resuming from it gives the uninterrupted losses."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kto_cli.train import train
    full = train(make_config(*TINY, "trainer.max_steps=4"), tmp_path / "full")
    lora = train(make_config(*TINY, *LORA, "trainer.max_steps=4", "trainer.save_every=2"), tmp_path / "lora")
    assert lora["reference"]["computed"] == 0 and lora["reference"]["reused"] == full["reference"]["computed"]
    first = [read_metrics(tmp_path / run, "train")[0]["loss"] for run in ("full", "lora")]
    assert first[0] == pytest.approx(first[1], abs=1e-6)
    losses = [r["loss"] for r in read_metrics(tmp_path / "lora", "train")]
    assert losses != [r["loss"] for r in read_metrics(tmp_path / "full", "train")]

    final = tmp_path / "lora" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    adapted = PeftModel.from_pretrained(tiny(tiny_tok), final / "adapter")  # the run's base: tiny, seed 0
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, tiny(tiny_tok)(ids).logits)  # it trained

    saved = load_file(str(tmp_path / "lora" / "checkpoints" / "step_0000002" / "model" / "trained.safetensors"))
    assert saved and all(".lora_" in k for k in saved)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "lora" / "checkpoints" / "step_0000002", cut / "checkpoints" / "step_0000002")
    train(make_config(*TINY, *LORA, "trainer.max_steps=4", "trainer.save_every=2", "trainer.resume=auto"), cut)
    resumed = {r["step"]: r["loss"] for r in read_metrics(cut, "train")}
    assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == pytest.approx(losses[2:], abs=1e-6)


@pytest.mark.slow
def test_merge_false_leaves_the_adapter_alone_in_final(tmp_path, tiny_tok):
    from kto_cli.train import train
    train(make_config(*TINY, *LORA, "model.lora.merge=false", "trainer.max_steps=1", "eval.generate=false"), tmp_path)
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "adapter" not in names


def test_layers_a_merge_cannot_handle_are_refused(tiny_tok):
    """GPT-2's Conv1D (its weight transposed) and an output head tied to the input embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UserError, match=r"model.lora: this model's layers of type Conv1D are not supported"):
        add_lora(gpt2, LoraConfig(r=2))
    from transformers import LlamaConfig, LlamaForCausalLM
    tied = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        vocab_size=64, tie_word_embeddings=True))
    with pytest.raises(UserError, match=r"lm_head shares its weights with the input embeddings"):
        add_lora(tied, LoraConfig(r=2, target_modules=["lm_head"]))

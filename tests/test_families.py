"""Completion log-probs equal a plain forward with full logits, for every model family kto-cli
ships a config for and the common others, under each attention kernel the family accepts, in every
layout kto-cli computes them with: separate padded rows (sparse and full LM head, per token),
shared-prompt rows, packed rows and the reference pass. Tiny random configs, so each takes
milliseconds (flex attention compiles once per family)."""
import pytest
import torch
import transformers as tf

from conftest import boolean_mask_added
from kto_cli import logprobs
from kto_cli.config import AttnImplementation, ModelConfig, ModelSource, UserError
from kto_cli.data import collate
from kto_cli.logprobs import (Layout, Runner, check_layout, completion_logps, layout_logps, logps_of, packed_batch,
                              packed_logps)
from kto_cli.models import load_model

V = 300
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": (tf.LlamaConfig, {}),
    "mistral": (tf.MistralConfig, {"sliding_window": 4096}),
    "qwen2": (tf.Qwen2Config, {}),
    # soft-capped final logits and attention scores, alternating sliding-window layers
    "gemma2": (tf.Gemma2Config, {"head_dim": 16, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 50.0,
                                 "sliding_window": 128}),
    # logits divided by logits_scaling; scaled embeddings, residuals and attention
    "granite": (tf.GraniteConfig, {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                   "attention_multiplier": 0.3}),
    "cohere": (tf.CohereConfig, {"logit_scale": 0.5}),  # logits multiplied by logit_scale
    "gpt_neox": (tf.GPTNeoXConfig, {"num_key_value_heads": None}),  # Pythia
    "phi3": (tf.Phi3Config, {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}),
    "opt": (tf.OPTConfig, {"ffn_dim": 128, "word_embed_proj_dim": 64}),  # learned absolute positions
}
KERNELS = ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)]  # flex compiles per family
# Groups of (prompt, [completions]): an example and its KL sequence, or a pair's two sides, share a prompt.
GROUPS = [([5, 6, 7, 8], [[9, 10], [11, 12, 13]]), ([14, 15], [[16, 17, 18, 19, 20], [21]]), ([22], [[23], [24, 25]]),
          ([26, 27, 28, 29, 30, 31], [[32, 33, 34, 35]])]
SEQS = [(p, c) for p, cs in GROUPS for c in cs]


def tiny(family: str, kernel: str):
    config_class, extra = FAMILIES[family]
    kwargs = {**SIZES, **extra}
    if family == "opt":
        kwargs.pop("intermediate_size"), kwargs.pop("num_key_value_heads")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(config_class(**kwargs), attn_implementation=kernel).eval()


def plain(model) -> torch.Tensor:
    """One sequence per forward, no padding, full logits: the textbook value. (N,)"""
    out = []
    for p, c in SEQS:
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float()  # (T, V)
        logp = torch.log_softmax(logits, -1)
        out.append(sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(c)))
    return torch.stack(out)


def every_layout(model) -> dict:
    """name -> (N,) log-probs of SEQS, as each of kto-cli's layouts computes them."""
    batch = collate(SEQS, pad_id=0)
    per_token = completion_logps(model, batch, per_token=True)
    run = Runner(pad_id=0, batch_size=3)
    got = {
        "separate rows, sparse head": completion_logps(model, batch).seq,
        "separate rows, full logits": completion_logps(model, batch, layout=Layout(full_logits=True)).seq,
        "separate rows, head in chunks of 2": completion_logps(model, batch, layout=Layout(head_chunk=2)).seq,
        "per token": (per_token.tokens * per_token.mask).sum(1),
        "reference pass (by prompt)": logps_of(model, SEQS, run)[0],
        "reference pass (per token)": logps_of(model, SEQS, run, per_token=True)[1].sum(1),
    }
    for name, capacity in (("shared prompt", None), ("shared prompt, packed", 16), ("packed rows", 0)):
        groups = GROUPS if name.startswith("shared") else [(p, [c]) for p, c in SEQS]
        for variant, layout in (("", Layout()), (", full logits", Layout(full_logits=True)),
                                (", blocks", Layout(blocks=0)), (", dense mask", Layout(blocks=None))):
            slots = packed_logps(model, packed_batch(groups, 0, capacity), grad_slots=(), layout=layout)
            got[name + variant] = torch.stack([slots[j].seq[g] for g, (_, cs) in enumerate(groups) for j in range(len(cs))])
    kto = GROUPS[:3]  # an example and its KL sequence each: the first 6 of SEQS
    for full in (False, True):  # KTO's KL sequences on their prompt's cached keys and values
        got[f"KL prefix{', full logits' if full else ''}"] = layout_logps(model, kto, 0, Layout(kl_prefix=True, full_logits=full))
    return got


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layout_equals_a_plain_forward(family, kernel):
    if (family, kernel) == ("cohere", "flex_attention"):
        pytest.skip("PyTorch 2.13's CPU inductor emits C++ that does not compile for Cohere's flex attention")
    try:
        model = tiny(family, kernel)
    except ValueError as e:  # the family does not support the kernel (Gemma 2 and sdpa)
        assert "attention" in str(e).lower()
        pytest.skip(f"{family} refuses {kernel}: {str(e).splitlines()[0][:80]}")
    assert logprobs.layout_problem(model, max_length=64) is None
    with torch.no_grad():  # flex attention has no backward on CPU
        truth = plain(model)
        for name, values in every_layout(model).items():
            torch.testing.assert_close(values.float(), truth[:len(values)], rtol=0, atol=1e-5, msg=f"{family}, {kernel}: {name}")
        assert check_layout(model, GROUPS, 0, Layout()) < 1e-6


def test_the_old_boolean_mask_under_eager_is_caught():
    """Before the fix eager attention added the boolean mask (+0 / +1) to the scores: the start-up
    check sees the difference (here through the same mistake made on purpose)."""
    model = tiny("llama", "eager")
    real = logprobs.attention_inputs
    try:
        logprobs.attention_inputs = boolean_mask_added
        assert check_layout(model, GROUPS, 0, Layout()) > 1e-2
    finally:
        logprobs.attention_inputs = real


def test_a_head_without_the_familys_scaling_is_caught(monkeypatch):
    """Granite divides logits by logits_scaling: a sparse head that forgot it (as before) is off by
    tenths of a nat per token, which the start-up check reports."""
    model = tiny("granite", "sdpa")
    monkeypatch.setattr(logprobs, "logit_transform", lambda config: (1.0, None))
    assert check_layout(model, GROUPS, 0, Layout(shared_prompt=False)) > 1e-2
    assert check_layout(model, GROUPS, 0, Layout(shared_prompt=False, full_logits=True)) < 1e-6


def test_sliding_window_shorter_than_the_data_means_separate_rows():
    """A custom 4D mask replaces the model's sliding window: fine while no sequence is longer than
    the window, so those layouts are refused only past it (the reference pass too)."""
    model = tiny("mistral", "sdpa")
    model.config.sliding_window = 8
    assert "sliding attention window (8 tokens)" in logprobs.layout_problem(model, max_length=64)
    assert logprobs.layout_problem(model, max_length=8) is None
    seqs = [(list(range(5, 15)), [20, 21, 22])]  # 13 tokens: the window matters
    with torch.no_grad():
        expect = completion_logps(model, collate(seqs, 0)).seq
    torch.testing.assert_close(logps_of(model, seqs, Runner(pad_id=0, batch_size=2))[0], expect)


def test_a_kernel_the_family_lacks_is_one_line(tmp_path):
    """Gemma 2 has no sdpa attention in transformers; flash-attention-2 is not installed here."""
    folder = tmp_path / "gemma2"
    tiny("gemma2", "eager").save_pretrained(folder)
    for kernel in (AttnImplementation.sdpa, AttnImplementation.flash_attention_2):
        with pytest.raises(UserError) as e:
            load_model(ModelConfig(source=ModelSource.hf, name_or_path=str(folder), attn_implementation=kernel), None)
        assert str(e.value).startswith(f"model.attn_implementation={kernel.value}: ") and "\n" not in str(e.value)

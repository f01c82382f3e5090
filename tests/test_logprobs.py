"""The sparse LM-head path equals log_softmax over full logits at completion positions."""
import pytest
import torch

from kto_cli import logprobs
from kto_cli.config import ModelConfig, ModelSource
from kto_cli.data import collate
from kto_cli.logprobs import Layout, Runner, completion_logps, logps_of, packed_batch, packed_logps
from kto_cli.models import tiny_model


def full_token_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return logp * batch["completion_mask"][:, 1:]  # (B, T-1), zero outside completions


def test_sparse_head_matches_full_logits(tiny_tok):
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    seqs = [([1, 2, 3, 4], [5, 6]), ([7, 8], [9, 10, 11, 12, 13]), ([3], [4])]
    batch = collate(seqs, tiny_tok.pad_token_id)
    full = full_token_logps(model, batch)
    got = completion_logps(model, batch, per_token=True, hidden=True, layout=Layout(head_chunk=3))  # several chunks
    torch.testing.assert_close(got.seq, full.sum(1), rtol=1e-5, atol=1e-5)
    assert got.lengths.tolist() == [2, 5, 1]
    # per token: row b holds its completion's tokens from column 0, zero-padded
    assert got.mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    torch.testing.assert_close(got.tokens[1], full[1][full[1] != 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.tokens[0, :2], full[0, 3:5], rtol=1e-5, atol=1e-5)
    assert got.hidden.shape == (3, 5, model.config.hidden_size) and got.hidden[0, 2:].abs().sum() == 0
    # batched by length, returned in the order given; padding does not change the values
    seq, tokens, lengths = logps_of(model, seqs, Runner(tiny_tok.pad_token_id, batch_size=2), per_token=True)
    torch.testing.assert_close(seq, full.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, got.tokens.detach(), rtol=1e-5, atol=1e-5)
    assert lengths.tolist() == [2, 5, 1]


def test_shared_prompt_row_equals_separate_forwards(tiny_tok):
    """P + C + K in one row, K masked from C and continuing P's positions, gives the log-probs of
    (P, C) and of (P, K) computed apart; a slot outside grad_slots has no gradient."""
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    rows = [([1, 2, 3, 4], [5, 6], [7, 8, 9]), ([7, 8], [9, 10, 11, 12, 13], [3]), ([3], [4], [5, 6])]
    packed = packed_batch([(p, [c, k]) for p, c, k in rows], tiny_tok.pad_token_id)
    first, second = packed_logps(model, packed, grad_slots=(0,))
    pc = completion_logps(model, collate([(p, c) for p, c, _ in rows], tiny_tok.pad_token_id))
    pk = completion_logps(model, collate([(p, k) for p, _, k in rows], tiny_tok.pad_token_id))
    torch.testing.assert_close(first.seq, pc.seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.seq, pk.seq.detach(), rtol=1e-5, atol=1e-5)
    assert first.lengths.tolist() == [2, 5, 1] and second.lengths.tolist() == [3, 1, 2]
    assert first.seq.requires_grad and not second.seq.requires_grad
    both = packed_logps(model, packed, grad_slots=(0, 1))
    assert all(lp.seq.requires_grad for lp in both)
    assert packed["slot_tokens"] == [6 + 7 + 2, 7 + 3 + 3]


def test_the_kl_prefix_equals_separate_rows_and_lets_go_of_its_cache(tiny_tok, monkeypatch):
    """KTO's KL continuation on the prompt's cache gives the log-probs of (P, K) computed apart; the
    cache holds no keys once the continuation has run, and is freed when prefix_logps returns, not
    at some later garbage collection (a reference cycle kept a copy of every prompt's keys alive)."""
    import gc
    import weakref
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    rows = [([1, 2, 3, 4], [5, 6], [7, 8, 9]), ([7, 8], [9, 10, 11, 12, 13], [3]), ([3], [4], [5, 6])]
    made, real = [], logprobs.prefix_cache
    monkeypatch.setattr(logprobs, "prefix_cache", lambda *a: made.append(real(*a)) or made[-1])
    gc.disable()
    try:
        lp, kl = logprobs.prefix_logps(model, logprobs.prefix_batch([(p, c) for p, c, _ in rows], [k for *_, k in rows],
                                                                   tiny_tok.pad_token_id))
        (cache,) = made.pop().values()
        assert cache.get_seq_length() == 0
        alive = weakref.ref(cache)
        del cache
        assert alive() is None
    finally:
        gc.enable()
    pc = completion_logps(model, collate([(p, c) for p, c, _ in rows], tiny_tok.pad_token_id))
    pk = completion_logps(model, collate([(p, k) for p, _, k in rows], tiny_tok.pad_token_id))
    torch.testing.assert_close(lp.seq, pc.seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, pk.seq.detach(), rtol=1e-5, atol=1e-5)


def test_logps_of_groups_sequences_by_prompt(tiny_tok, monkeypatch):
    """Sequences that share a prompt are computed in one row per prompt (at most MAX_SHARED
    completions each); the values equal one forward per sequence, in the order given."""
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    monkeypatch.setattr(logprobs, "MAX_SHARED", 2)
    seqs = [([1, 2, 3], [4]), ([5, 6], [7, 8]), ([1, 2, 3], [9, 9, 9]), ([1, 2, 3], [4, 5]), ([5, 6], [1])]
    seq, tokens, lengths = logps_of(model, seqs, Runner(tiny_tok.pad_token_id, batch_size=2))
    one_by_one = torch.stack([completion_logps(model, collate([s], tiny_tok.pad_token_id)).seq[0] for s in seqs])
    torch.testing.assert_close(seq, one_by_one.detach(), rtol=1e-5, atol=1e-5)
    assert tokens is None and lengths.tolist() == [1, 2, 3, 2, 1]


def test_packed_rows_equal_separate_forwards(tiny_tok):
    """Several groups in one row (padding-free), each seeing only itself with its own positions,
    give the log-probs of one forward per sequence; rows never exceed the capacity (or the
    largest group) and every group is placed once."""
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    groups = [([1, 2, 3, 4], [[5, 6], [7, 8, 9]]), ([7, 8], [[9, 10, 11, 12, 13], [3]]), ([3], [[4], [5, 6]]),
              ([2, 9], [[1], [2]]), ([6], [[7, 7, 7]])]
    packed = packed_batch(groups, tiny_tok.pad_token_id, capacity=12)
    assert packed["input_ids"].shape == (3, 12)  # group sizes 9, 8, 4, 4, 4 -> rows [9], [8, 4], [4, 4]
    assert (packed["input_ids"] != tiny_tok.pad_token_id).sum() == 9 + 8 + 4 + 4 + 4
    first, second = packed_logps(model, packed, grad_slots=(0, 1))
    for slot, got in ((0, first), (1, second)):
        has = [g for g, (_, cs) in enumerate(groups) if slot < len(cs)]  # the last group has one completion
        seqs = [(groups[g][0], groups[g][1][slot]) for g in has]
        alone = torch.stack([completion_logps(model, collate([s], tiny_tok.pad_token_id)).seq[0] for s in seqs])
        torch.testing.assert_close(got.seq[has], alone, rtol=1e-5, atol=1e-5)
        assert got.lengths[has].tolist() == [len(c) for _, c in seqs]
    assert logprobs.pack_rows([3, 3, 3], capacity=None) == [[0], [1], [2]]
    assert logprobs.pack_rows([5, 2, 4, 1], capacity=0) == [[0], [2, 3], [1]]


def long_groups(n: int = 3, seed: int = 0) -> list:
    """(prompt, [completion, KL completion]) of 1,000-1,900 tokens per row."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda lo, hi: torch.randint(3, 250, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [(ids(500, 900), [ids(300, 500), ids(200, 500)]) for _ in range(n)]


def long_model(kernel: str):
    import transformers as tf
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.3)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation=kernel).eval()


def layout_values(model, groups: list, name: str) -> tuple:
    """((N,) per-token mean log-probs of every (prompt, completion) in order, gradient of their sum)
    as layout `name` computes them, the first completion of each group with gradient."""
    model.zero_grad()
    seqs = [(p, c) for p, cs in groups for c in cs]
    if name == "separate rows":
        lp = completion_logps(model, collate(seqs, 0))
        seq, lengths = lp.seq, lp.lengths
    elif name == "KL prefix":
        main, kl = logprobs.prefix_logps(model, logprobs.prefix_batch([(p, cs[0]) for p, cs in groups],
                                                                      [cs[1] for _, cs in groups], 0))
        seq = torch.stack([main.seq, kl], 1).flatten()
        lengths = torch.tensor([len(c) for _, c in seqs])
    else:
        capacity = 0 if "packed" in name else None
        rows = groups if "shared" in name else [(p, [c]) for p, c in seqs]
        slots = packed_logps(model, packed_batch(rows, 0, capacity), grad_slots=(0, 1),
                             layout=Layout(blocks=None if "dense" in name else 0))
        seq = torch.stack([slots[j].seq[g] for g, (_, cs) in enumerate(rows) for j in range(len(cs))])
        lengths = torch.stack([slots[j].lengths[g] for g, (_, cs) in enumerate(rows) for j in range(len(cs))])
    first = torch.tensor([j == 0 for _, cs in groups for j in range(len(cs))])
    if seq.requires_grad:
        seq[first].sum().backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return (seq / lengths).detach(), torch.cat(grads) if grads else None


LONG_LAYOUTS = ["shared prompt", "shared prompt, dense mask", "shared prompt, packed", "packed rows",
                "packed rows, dense mask", "KL prefix"]


def test_long_rows_every_layout_equals_separate_rows():
    """At 1,000-1,900 tokens per row: shared-prompt and packed rows (attention by blocks, or through
    the dense mask) and the KL prefix give separate rows' log-probs (per token, to 1e-5) and the same
    gradient of the examples' log-probs."""
    model, groups = long_model("sdpa"), long_groups()
    truth, grad = layout_values(model, groups, "separate rows")
    for name in LONG_LAYOUTS:
        values, g = layout_values(model, groups, name)
        torch.testing.assert_close(values, truth, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(g, grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_long_rows_under_eager_flash_and_flex_forms(monkeypatch):
    """The other kernels' forms at length: eager's additive mask; flash attention's form (no mask,
    positions restarting per group: transformers' own packed-sequence mask stands in for the
    variable-length kernel here), which refuses shared-prompt rows; flex attention's BlockMask
    (forward only: no flex backward on CPU)."""
    groups = long_groups(2, seed=1)
    seqs = [(p, c) for p, cs in groups for c in cs]
    eager = long_model("eager")
    truth, _ = layout_values(eager, groups, "separate rows")
    for name in ("shared prompt", "packed rows"):
        torch.testing.assert_close(layout_values(eager, groups, name)[0], truth, rtol=0, atol=1e-5, msg=name)
    sdpa = long_model("sdpa")
    monkeypatch.setattr(logprobs, "attention_kernel", lambda model: "flash_attention_2")
    with torch.no_grad():
        slots = packed_logps(sdpa, packed_batch([(p, [c]) for p, c in seqs], 0, 0), grad_slots=())
        per_token = slots[0].seq / slots[0].lengths
        separate = layout_values(long_model("sdpa"), groups, "separate rows")[0]
        torch.testing.assert_close(per_token, separate, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="cannot express shared-prompt rows"):
            packed_logps(sdpa, packed_batch(groups, 0), grad_slots=())


@pytest.mark.slow
def test_long_rows_under_flex_attention():
    """Shared-prompt rows through flex attention's BlockMask, built from the (B, L) ids. Packed rows
    and the KL prefix (transformers' own flex mask over a cache) are not run here: PyTorch 2.13's CPU
    inductor emits C++ for them that does not compile (the GPU path is Triton's)."""
    flex, groups = long_model("flex_attention"), long_groups(2, seed=2)
    with torch.no_grad():
        truth = layout_values(long_model("sdpa"), groups, "separate rows")[0]
        for name in ("shared prompt",):
            torch.testing.assert_close(layout_values(flex, groups, name)[0], truth, rtol=0, atol=1e-5, msg=name)

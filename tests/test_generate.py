"""Batched, left-padded, KV-cached generation equals generating each prompt alone, token by token
without a cache; seeded sampling repeats; generation stops at the end of the turn."""
import torch

from kto_cli.config import GenerationConfig, ModelConfig, ModelSource
from kto_cli.generate import generate, stop_ids
from kto_cli.models import tiny_model


def model_and_prompts(tiny_tok):
    model = tiny_model(ModelConfig(source=ModelSource.tiny, name_or_path="tiny"), len(tiny_tok), tiny_tok.pad_token_id)
    chat = lambda q: tiny_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,  # noqa: E731
                                                  tokenize=False)
    prompts = [tiny_tok(chat(q), add_special_tokens=False)["input_ids"] for q in ("What is 2 + 2?", "Hi", "Is 7 odd?")]
    return model, prompts


def greedy_alone(model, prompt: list, steps: int, stops: list) -> list:
    """The plain computation: one prompt, no padding, no cache, argmax at every step."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt in stops:
            break
    return ids[len(prompt):]


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_tok):
    model, prompts = model_and_prompts(tiny_tok)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2)
    got = generate(model, tiny_tok, prompts, cfg, "cpu")
    assert [s.prompt for s in got] == [0, 1, 2]
    for s, p in zip(got, prompts):
        alone = greedy_alone(model, p, 6, stop_ids(tiny_tok))
        assert s.tokens == len(alone) and s.text == tiny_tok.decode(alone, skip_special_tokens=True).strip()


def test_seeded_sampling_repeats_and_gives_n_per_prompt(tiny_tok):
    model, prompts = model_and_prompts(tiny_tok)
    cfg = GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, n=3, seed=7)
    a, b = generate(model, tiny_tok, prompts, cfg, "cpu"), generate(model, tiny_tok, prompts, cfg, "cpu")
    assert [s.prompt for s in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.text for s in a] == [s.text for s in b]
    c = generate(model, tiny_tok, prompts, GenerationConfig(max_new_tokens=5, temperature=1.0, n=3, seed=8), "cpu")
    assert [s.text for s in c] != [s.text for s in a]


def test_sharded_sampling_gives_each_rank_its_batches_of_the_same_answers(tiny_tok):
    """Each batch is seeded by its place in the order: ranks making every other batch together
    make the answers one process makes."""
    model, prompts = model_and_prompts(tiny_tok)
    cfg = GenerationConfig(max_new_tokens=5, temperature=1.0, n=2, batch_size=2, seed=3)  # one prompt per batch
    whole = generate(model, tiny_tok, prompts, cfg, "cpu")
    shards = [generate(model, tiny_tok, prompts, cfg, "cpu", shard=(r, 2)) for r in (0, 1)]
    assert sorted({s.prompt for s in shards[0]}) != sorted({s.prompt for s in shards[1]})
    merged = sorted(shards[0] + shards[1], key=lambda s: s.prompt)
    assert [(s.prompt, s.text, s.tokens) for s in merged] == [(s.prompt, s.text, s.tokens) for s in whole]


def test_stops_at_end_of_turn_and_restores_the_mode(tiny_tok):
    model, prompts = model_and_prompts(tiny_tok)
    end = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    assert end in stop_ids(tiny_tok)
    with torch.no_grad():  # make <|im_end|> the likeliest token everywhere
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[end] = 100.0
    model.train()
    got = generate(model, tiny_tok, prompts, GenerationConfig(max_new_tokens=8), "cpu")
    assert all(s.tokens == 1 and s.text == "" for s in got)
    assert model.training


def test_samples_sharing_their_prompts_forward_equal_separate_prompts(tiny_tok):
    """n samples of a prompt start from one prefill of it (its cache repeated n times): greedy, each
    equals the prompt generated alone without a cache; seeded sampling equals giving the prompt n
    times with n=1 in batches of the same rows."""
    model, prompts = model_and_prompts(tiny_tok)
    got = generate(model, tiny_tok, prompts, GenerationConfig(max_new_tokens=6, n=3, batch_size=6), "cpu")
    assert [s.prompt for s in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for s in got:
        alone = greedy_alone(model, prompts[s.prompt], 6, stop_ids(tiny_tok))
        assert s.tokens == len(alone) and s.text == tiny_tok.decode(alone, skip_special_tokens=True).strip()
    sampled = GenerationConfig(max_new_tokens=6, temperature=1.0, n=3, batch_size=9, seed=3)
    shared = generate(model, tiny_tok, prompts, sampled, "cpu")
    order = sorted(range(3), key=lambda i: (len(prompts[i]), i))
    repeated = [prompts[i] for i in order for _ in range(3)]
    plain = generate(model, tiny_tok, repeated, GenerationConfig(max_new_tokens=6, temperature=1.0, batch_size=9,
                                                                  seed=3), "cpu")
    assert sorted((order[s.prompt // 3], s.text) for s in plain) == sorted((s.prompt, s.text) for s in shared)

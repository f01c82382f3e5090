"""Reading, validation errors, unpairing, subsampling, KL partners, truncation and collation."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from kto_cli.config import DatasetConfig, UnpairMode, UserError
from kto_cli.data import (Example, build_splits, collate, hold_out, kl_partners, open_source, render, source_split,
                          prompt_key, rotated_partners, row_to_examples, subsample, truncate, unpair_one)
from kto_cli.tables import prompt_hash

from conftest import write_jsonl

PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]


def load_examples(path, split: str, skip_bad_rows: bool, max_rows=None, columns=None) -> tuple:
    """(examples, rows skipped) of one source, as training reads them: through its tokenised table
    (kto_cli/tables.py), with the tiny tokenizer and its chat template."""
    from kto_cli.config import Columns
    from kto_cli.models import tiny_tokenizer
    cfg = DatasetConfig(train=str(path), skip_bad_rows=skip_bad_rows, cache=False)
    table = open_source(cfg, str(path), split, Columns(**(columns or {})), tiny_tokenizer(), True)
    got, skipped = source_split(cfg, table, max_rows)
    return [got.example(i) for i in range(len(got))], skipped


def keys(examples: list) -> np.ndarray:
    """The examples' prompt keys, as a Split holds them."""
    return np.array([prompt_hash(prompt_key(e.prompt)) for e in examples])


def error_of(tmp_path, rows, name="d.jsonl", **kw):
    path = write_jsonl(tmp_path / name, rows)
    with pytest.raises(UserError) as e:
        load_examples(str(path), "train", skip_bad_rows=False, **kw)
    return str(e.value)


@pytest.mark.parametrize("row, words", [
    ({"prompt": "p", "label": True}, ["row 2", "'completion'", "missing"]),
    ({"prompt": "p", "completion": "c", "label": "yes"}, ["row 2", "'label'", "true or false", "'yes'"]),
    ({"prompt": "p", "completion": "c", "label": 1}, ["row 2", "'label'"]),
    ({"prompt": "p", "completion": "  ", "label": True}, ["row 2", "'completion'", "empty"]),
    ({"prompt": "p", "completion": "c"}, ["row 2", "'label'", "missing"]),
    ({"prompt": "p", "chosen": "c"}, ["row 2", "'rejected'", "missing"]),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "d"}, ["row 2", "'prompt'", "'content'"]),
    ({"completion": "c", "label": False}, ["row 2", "'prompt'", "missing"]),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, words):
    msg = error_of(tmp_path, [{"prompt": "ok", "completion": "fine", "label": True}, row])
    assert "d.jsonl" in msg
    for w in words:
        assert w in msg


def test_bad_json_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"broken.jsonl: row 2: not valid JSON"):
        load_examples(str(path), "train", skip_bad_rows=False)
    with pytest.raises(UserError, match="no such data file"):
        load_examples(str(tmp_path / "nope.jsonl"), "train", skip_bad_rows=False)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="x.parquet: unreadable"):
        load_examples(str(tmp_path / "x.parquet"), "train", skip_bad_rows=False)


def test_bad_files_and_cells_are_one_line(tmp_path, tiny_tok):
    """Invalid UTF-8 in a .jsonl row, a directory given as the data file, a CSV label column with a
    blank cell, a chat template that refuses a row: each names the file and row."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "caf\xe9", "completion": "b", "label": true}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl: row 2: not valid UTF-8"):
        load_examples(str(path), "train", skip_bad_rows=False)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UserError, match=r"folder.jsonl: a directory, not a data file"):
        load_examples(str(tmp_path / "folder.jsonl"), "train", skip_bad_rows=False)
    (tmp_path / "d.csv").write_text("prompt,completion,label\np1,c1,true\np2,c2,\np3,c3,FALSE\n")
    with pytest.raises(UserError, match=r"d.csv: row 2: field 'label' is missing"):
        load_examples(str(tmp_path / "d.csv"), "train", skip_bad_rows=False)
    examples, skipped = load_examples(str(tmp_path / "d.csv"), "train", skip_bad_rows=True)
    assert [e.desirable for e in examples] == [True, False] and skipped == 1
    rows = [{"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": True},
            {"prompt": [{"role": "tool", "content": "q"}], "completion": "a", "label": True}]
    strict = __import__("copy").deepcopy(tiny_tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }}"
                            "{% endfor %}")
    cfg = DatasetConfig(train=str(write_jsonl(tmp_path / "roles.jsonl", rows)))
    with pytest.raises(UserError, match=r"roles.jsonl: row 2: the tokenizer's chat template fails on this row "
                                        r"\(TemplateError: unknown role tool\)"):
        build_splits(cfg, strict, use_chat_template=True)


def test_prompts_and_completions_cut_by_truncation_are_counted(tmp_path, tiny_tok, caplog):
    import logging
    rows = [{"prompt": "x" * (5 + 30 * (i % 2)), "completion": "y" * (3 + 40 * (i == 0)), "label": True} for i in range(4)]
    cfg = DatasetConfig(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=40, max_prompt_length=20)
    with caplog.at_level(logging.WARNING, logger="kto_cli"):
        _, _, report = build_splits(cfg, tiny_tok, use_chat_template=False)
    assert (report["training_prompts_cut"], report["training_completions_cut"]) == (2, 1)
    assert "2 of 4 training prompts are longer than dataset.max_prompt_length=20 tokens" in caplog.text


def test_skip_bad_rows_counts_them(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "label": True},
            {"prompt": "c", "completion": "d", "label": "no"}]
    examples, skipped = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", skip_bad_rows=True)
    assert (len(examples), skipped) == (1, 2)


def test_formats_read_alike(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1", "label": True}, {"prompt": "p2", "completion": "c2", "label": False}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv"):
        ex, _ = load_examples(str(tmp_path / name), "train", skip_bad_rows=False)
        assert [(e.prompt, e.completion, e.desirable) for e in ex] == [("p1", "c1", True), ("p2", "c2", False)], name


def test_conversational_rows_from_parquet(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    pd.DataFrame([{"prompt": msgs, "chosen": [{"role": "assistant", "content": "hello"}],
                   "rejected": [{"role": "assistant", "content": "go away"}]}]).to_parquet(tmp_path / "c.parquet")
    ex, _ = load_examples(str(tmp_path / "c.parquet"), "train", skip_bad_rows=False)
    assert ex[0].prompt == msgs and ex[0].desirable and not ex[1].desirable


def test_unpairing_both_and_one(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    both, _ = load_examples(str(path), "train", skip_bad_rows=False)
    assert len(both) == 20 and sum(e.desirable for e in both) == 10
    assert both[0].pair_id == both[1].pair_id == 0
    one = [both[i] for i in unpair_one(keys(both), seed=3)]
    assert len(one) == 10 and len({e.pair_id for e in one}) == 10
    assert 0 < sum(e.desirable for e in one) < 10  # both sides occur
    assert unpair_one(keys(both), seed=3).tolist() == unpair_one(keys(both), seed=3).tolist()  # seeded
    assert unpair_one(keys(both), seed=4).tolist() != unpair_one(keys(both), seed=3).tolist()


def test_unpair_one_keeps_one_completion_per_prompt():
    """Three pairs (and an unpaired row) of one prompt and one pair of another: one y per x keeps
    one example per prompt, not one per pair."""
    rows = [{"prompt": "a", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    rows += [{"prompt": "a", "completion": "more", "label": True}, {"prompt": "b", "chosen": "g", "rejected": "b"}]
    examples = [e for n, r in enumerate(rows) for e in row_to_examples(r, "x", n)]
    kept = [[examples[i] for i in unpair_one(keys(examples), seed)] for seed in range(20)]
    assert all(sorted(e.prompt for e in k) == ["a", "b"] for k in kept)
    assert len({k[0].completion for k in kept}) > 2  # any of prompt a's 7 completions may be the one


def test_rotated_kl_partners_are_trls_pairs():
    """TRL's KTOTrainer rotates completions by one within each per-device batch, in data order."""
    assert rotated_partners(7, 3).tolist() == [2, 0, 1, 5, 3, 4, 6]


def test_subsample_keeps_seeded_fractions():
    labels = np.arange(200) % 2 == 0
    kept = subsample(labels, desirable_fraction=0.1, undesirable_fraction=1.0, seed=0)
    assert labels[kept].sum() == 10 and (~labels[kept]).sum() == 100 and (np.diff(kept) > 0).all()
    assert kept.tolist() == subsample(labels, 0.1, 1.0, seed=0).tolist()
    assert kept.tolist() != subsample(labels, 0.1, 1.0, seed=1).tolist()


def test_hold_out_splits_by_prompt(tmp_path):
    ex, _ = load_examples(str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), "train", skip_bad_rows=False)
    mask = hold_out(keys(ex), 0.2, seed=0)
    train, held = [e for e, m in zip(ex, mask) if not m], [e for e, m in zip(ex, mask) if m]
    assert len(held) == 4 and len(train) == 16
    assert not {e.prompt for e in train} & {e.prompt for e in held}


def test_kl_partners_is_a_seeded_derangement_across_prompts():
    keys = [i // 2 for i in range(50)]  # pairs share a prompt
    p = kl_partners(keys, seed=0).tolist()
    assert sorted(p) == list(range(50))
    assert all(p[i] != i for i in range(50))
    assert all(keys[p[i]] != keys[i] for i in range(50))
    assert p == kl_partners(keys, seed=0).tolist() and p != kl_partners(keys, seed=1).tolist()


def test_truncation_keeps_prompt_end_and_completion_start():
    p, c = truncate(list(range(10)), list(range(100, 110)), max_length=8, max_prompt_length=5)
    assert p == [5, 6, 7, 8, 9] and c == [100, 101, 102]
    assert truncate([1, 2], [3], 8, 5) == ([1, 2], [3])


def test_truncation_depends_on_the_prompt_alone_and_keeps_its_header():
    """Two completions of one prompt (a pair's sides, an example and its KL sequence), one short and
    one long, keep the same prompt tokens: before, the short one kept the whole prompt. A header of
    2 tokens (BOS, template) survives, the rest is the prompt's end; a header over half the budget
    is cut to half."""
    prompt = list(range(10))
    short, long = truncate(prompt, [100], 16, 6, head=2), truncate(prompt, list(range(100, 120)), 16, 6, head=2)
    assert short[0] == long[0] == [0, 1, 6, 7, 8, 9]
    assert short[1] == [100] and long[1] == list(range(100, 110))
    assert truncate(prompt, [100], 16, 6, head=5)[0] == [0, 1, 2, 7, 8, 9]


def test_truncated_sequences_of_one_prompt_share_it(tmp_path, tiny_tok):
    """Through tokenize: the chat template's header ('<|im_start|>user\n', 6 tokens here) is kept, and
    an example, its pair sibling and its KL sequence are conditioned on the same prompt tokens."""
    rows = [{"prompt": "x" * 40 + f" q{i}", "chosen": "y" * (3 + 30 * (i % 2)), "rejected": "n"} for i in range(4)]
    cfg = DatasetConfig(train=str(write_jsonl(tmp_path / "long.jsonl", rows)), max_length=40, max_prompt_length=20)
    train, _, _ = build_splits(cfg, tiny_tok, use_chat_template=True)
    header = tiny_tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert train.head[0] == len(header) == 6
    for i in range(len(train)):
        p, c = train.sequence(i)
        assert len(p) == 20 and p[:6] == header and p == train.prompt_ids(i)[:6] + train.prompt_ids(i)[-14:]
        assert train.kl_sequence(i)[0] == p and len(p) + len(c) <= 40
    for chosen, rejected in train.pairs():
        assert train.sequence(chosen)[0] == train.sequence(rejected)[0]


def test_render_with_chat_template_ends_completion_with_end_of_turn(tiny_tok):
    e = Example("What is 2 + 2?", "4", True, None, "x")
    prompt, completion, header = render(e, tiny_tok, use_chat_template=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2 + 2?" in prompt
    assert completion == "4<|im_end|>\n" and prompt[:header] == "<|im_start|>user\n"
    prompt, completion, header = render(e, tiny_tok, use_chat_template=False)
    assert (prompt, completion, header) == ("What is 2 + 2?", "4<|im_end|>", 0)


def test_build_splits_and_collate_pad_to_batch_longest(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    cfg = DatasetConfig(train=str(path), eval=None, eval_fraction=0.2, unpair=UnpairMode.one, max_length=64, max_prompt_length=32)
    train, held, report = build_splits(cfg, tiny_tok, use_chat_template=True)
    assert (report["train"], report["eval"]) == (8, 4)
    assert len(held) == 4  # eval keeps both sides of each held-out pair
    seqs = [train.sequence(0), train.kl_sequence(0)]
    b = collate(seqs, tiny_tok.pad_token_id)
    longest = max(len(p) + len(c) for p, c in seqs)
    assert b["input_ids"].shape == (2, longest) < (2, 64)
    assert b["completion_mask"][0].sum().item() == len(seqs[0][1])
    assert b["attention_mask"].sum().item() == sum(len(p) + len(c) for p, c in seqs)
    assert train.kl_sequence(0)[0] == train.sequence(0)[0]  # same prompt, partner's completion
    assert train.kl_sequence(0)[1] == train.completion_ids(train.kl_partner[0])
    assert isinstance(train.desirable([0, 1]), torch.Tensor)


def test_shipped_arith_files_share_no_question_and_the_script_remakes_them(tmp_path, monkeypatch):
    """No question is in two of train / eval / val / test, and scripts/make_arith_data.py writes
    exactly the shipped files (so arith_test's addition left the others as they were)."""
    import importlib.util
    from pathlib import Path
    assets = Path(__file__).resolve().parent.parent / "kto_cli" / "assets"
    names = ("arith_train", "arith_eval", "arith_val", "arith_test")
    questions = {n: [json.loads(line)["prompt"][-1]["content"] for line in open(assets / f"{n}.jsonl")] for n in names}
    assert [len(questions[n]) for n in names] == [1000, 64, 400, 400]
    assert len(set().union(*map(set, questions.values()))) == 1864
    spec = importlib.util.spec_from_file_location("make_arith_data", assets.parent.parent / "scripts" / "make_arith_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "OUT", tmp_path)
    script.main()
    assert all((tmp_path / f"{n}.jsonl").read_bytes() == (assets / f"{n}.jsonl").read_bytes() for n in names)


# ---------------------------------------------------------------- formats: implicit prompts, columns, mixes

def test_implicit_prompt_pairs_take_the_start_chosen_and_rejected_share(tmp_path):
    """Anthropic HH as plain text (split after the last shared `Assistant:`) and as messages, and
    UltraFeedback binarized (a prompt that the conversations repeat)."""
    hh = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant:"
    user = [{"role": "user", "content": "What is 2+2?"}]
    rows = [{"chosen": hh + " Six.", "rejected": hh + " Seven."},
            {"chosen": user + [{"role": "assistant", "content": "4"}], "rejected": user + [{"role": "assistant", "content": "5"}]},
            {"prompt": "What is 2+2?", "chosen": user + [{"role": "assistant", "content": "4"}],
             "rejected": user + [{"role": "assistant", "content": "22"}], "score_chosen": 9.0, "score_rejected": 2.0}]
    ex, _ = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", skip_bad_rows=False)
    assert [(e.prompt, e.completion, e.desirable) for e in ex] == [
        (hh, " Six.", True), (hh, " Seven.", False),
        (user, [{"role": "assistant", "content": "4"}], True), (user, [{"role": "assistant", "content": "5"}], False),
        (user, [{"role": "assistant", "content": "4"}], True), (user, [{"role": "assistant", "content": "22"}], False)]
    plain, _ = load_examples(str(write_jsonl(tmp_path / "p.jsonl", [{"chosen": "The sky is blue", "rejected": "The sky is green"}])),
                             "train", skip_bad_rows=False)
    assert [(e.prompt, e.completion) for e in plain] == [("The sky is ", "blue"), ("The sky is ", "green")]


def test_pairs_without_a_usable_shared_start_are_bad_rows(tmp_path):
    same = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert error_of(tmp_path, [{"chosen": "yes", "rejected": "no"}]) == \
        f"{tmp_path / 'd.jsonl'}: row 1: no field 'prompt', and chosen and rejected share no start to take as it"
    assert error_of(tmp_path, [{"chosen": same, "rejected": same}]).endswith("row 1: fields 'chosen' and 'rejected' are the same")
    assert error_of(tmp_path, [{"chosen": same + [{"role": "user", "content": "more"}], "rejected": same}]).endswith(
        "row 1: field 'rejected' is nothing beyond the start chosen and rejected share")
    assert error_of(tmp_path, [{"chosen": same + [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
                                "rejected": same + [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]}]
                    ).endswith("row 1: chosen and rejected must differ from an assistant's turn on, after the turns they share")
    hh = "\n\nHuman: Hi {}\n\nAssistant: A"
    assert error_of(tmp_path, [{"chosen": hh.format("there"), "rejected": hh.format("you")}]).endswith(
        "row 1: chosen and rejected differ before an 'Assistant:' turn they share")
    turn = "\n\nHuman: q\n\nAssistant: a"
    assert error_of(tmp_path, [{"chosen": turn + "\n\nHuman: b\n\nAssistant: c", "rejected": turn + " d"}]).endswith(
        "row 1: chosen and rejected differ before their last turn (HH's '\n\nHuman:' after the 'Assistant:' they share)")
    assert error_of(tmp_path, [{"prompt": "another question", "chosen": same, "rejected": same[:1] + [
        {"role": "assistant", "content": "b"}]}]).endswith("row 1: field 'prompt' is not the start that chosen and rejected share")


def test_kto_mix_style_unpaired_conversations_load(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}], "label": True},
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "b"}], "label": False}]
    ex, _ = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", skip_bad_rows=False)
    assert [(e.completion[0]["content"], e.desirable) for e in ex] == [("a", True), ("b", False)]


def test_columns_map_other_names_and_a_missing_one_is_one_line(tmp_path):
    rows = [{"question": "q1", "answer": "a1", "good": True}, {"question": "q2", "answer": "a2", "good": False}]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    columns = {"prompt": "question", "completion": "answer", "label": "good"}
    ex, _ = load_examples(path, "train", skip_bad_rows=False, columns=columns)
    assert [(e.prompt, e.completion, e.desirable) for e in ex] == [("q1", "a1", True), ("q2", "a2", False)]
    with pytest.raises(UserError, match=r"d.jsonl: row 1: dataset.columns names column 'text', which is not there "
                                        r"\(columns: question, answer, good\)"):
        load_examples(path, "train", skip_bad_rows=False, columns={**columns, "prompt": "text"})


def test_a_mix_keeps_its_proportions_without_repeating_a_row_seeded(tmp_path, tiny_tok):
    from kto_cli.config import Columns, MixSource
    from kto_cli.data import training_rows, training_split
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x", "label": True} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "x", "label": False} for i in range(30)])

    def mix(seed=0, max_rows=None, wa=0.7, wb=0.3):
        cfg = DatasetConfig(train="unused", seed=seed, max_train_rows=max_rows,
                            mix=[MixSource(source=str(a), weight=wa), MixSource(source=str(b), weight=wb)])
        rows = [row["prompt"] for _, row, _ in training_rows(cfg)[1]]  # online prompts' path
        split = training_split(cfg, tiny_tok, True)[0]  # training's path
        assert [split.example(i).prompt for i in range(len(split))] == rows
        return rows
    rows = mix()  # b's 30 rows are 30%: 100 rows in all, 70 of a's 100
    assert sum(r.startswith("a") for r in rows) == 70 and sum(r.startswith("b") for r in rows) == 30
    assert len(set(rows)) == 100 and mix() == rows and mix(seed=1) != rows
    assert len(mix(max_rows=50)) == 50 and sum(r.startswith("b") for r in mix(max_rows=50)) == 15
    assert sum(r.startswith("a") for r in mix(wa=1, wb=1)) == 30  # 1:1 -> 30 + 30
    assert len(mix(wa=1, wb=1, max_rows=3)) == 3 and len(mix(wa=1, wb=1, max_rows=1)) == 1  # whole rows, the cap kept
    assert len(mix(max_rows=5)) == 5
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}", "answer": "x", "good": True} for i in range(10)])
    cfg = DatasetConfig(train="unused", mix=[MixSource(source=str(a)), MixSource(source=str(q), columns=Columns(
        prompt="question", completion="answer", label="good"))])  # each source its own column names
    split = training_split(cfg, tiny_tok, True)[0]  # as training reads them: through the tokenised tables
    ex = [split.example(i) for i in range(len(split))]
    assert sorted({e.prompt[0] for e in ex}) == ["a", "q"] and len(ex) == 20
    assert {e.row["prompt"][:1] for e in ex[:10]} | {e.row["question"][:1] for e in ex[10:]} == {"a", "q"}
    (tmp_path / "empty.jsonl").write_text("")
    cfg = DatasetConfig(train="unused", mix=[MixSource(source=str(a)), MixSource(source=str(tmp_path / "empty.jsonl"))])
    for path in (training_rows, lambda c: training_split(c, tiny_tok, True)):
        with pytest.raises(UserError, match=r"dataset.mix: no rows to train on \(0 of 100 rows of .*a.jsonl; 0 of 0 rows"):
            path(cfg)


def test_a_renamed_csv_label_column_is_read_as_truth_values(tmp_path):
    (tmp_path / "d.csv").write_text("q,a,good\np1,c1,true\np2,c2,\np3,c3,FALSE\n")
    columns = {"prompt": "q", "completion": "a", "label": "good"}
    with pytest.raises(UserError, match=r"d.csv: row 2: field 'label' is missing"):
        load_examples(str(tmp_path / "d.csv"), "train", skip_bad_rows=False, columns=columns)
    ex, skipped = load_examples(str(tmp_path / "d.csv"), "train", skip_bad_rows=True, columns=columns)
    assert [e.desirable for e in ex] == [True, False] and skipped == 1


def test_online_prompts_of_implicit_prompt_pairs_are_their_shared_start(tmp_path, tiny_tok):
    from kto_cli.data import load_prompts
    hh = "\n\nHuman: What is {}+1?\n\nAssistant:"
    rows = [{"chosen": hh.format(i) + " right", "rejected": hh.format(i) + " wrong"} for i in range(3)]
    split = load_prompts(DatasetConfig(train=str(write_jsonl(tmp_path / "hh.jsonl", rows))), tiny_tok, False)
    assert sorted(e.prompt for e in split.examples) == [hh.format(i) for i in range(3)]

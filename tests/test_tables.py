"""Tokenised sources kept by content: a cached start, the Arrow reader and the plain reader all give
the split a fresh build gives; the key follows what decides the tokens; bad rows keep their numbers."""
import json
import logging
import random

import numpy as np
import pandas as pd
import pytest

from kto_cli import tables
from kto_cli.config import DatasetConfig, UserError
from kto_cli.data import Split, build_splits, pair_by_prompt, unpair_one

from conftest import write_jsonl

SYSTEM = {"role": "system", "content": "Reply with the answer only."}


def rows(n: int, seed: int = 0) -> list:
    """Paired rows (some conversational, some plain text) and unpaired ones, a few prompts repeated."""
    rng, out = random.Random(seed), []
    for i in range(n):
        q = f"What is {rng.randint(1, 9)} + {i % 7}?"
        if i % 3 == 0:
            out.append({"prompt": [SYSTEM, {"role": "user", "content": q}], "chosen": "yes", "rejected": f"no {i}"})
        elif i % 3 == 1:
            out.append({"prompt": q, "completion": f"answer {i}", "label": bool(rng.getrandbits(1)), "answer": i})
        else:
            out.append({"prompt": q, "chosen": f"right {i}", "rejected": "wrong"})
    return out


def view(split: Split) -> dict:
    """Everything training reads of a split."""
    return {"seqs": [split.sequence(i) for i in range(len(split))],
            "kl": [split.kl_sequence(i) for i in range(len(split))],
            "labels": split.labels.tolist(), "pairs": split.pairs().tolist(), "lengths": split.lengths().tolist()}


def splits(cfg: DatasetConfig, tok) -> tuple:
    train, held, report = build_splits(cfg, tok, use_chat_template=True)
    return view(train), held and view(held), report, train


def test_a_cached_start_reads_no_row_and_gives_the_fresh_split(tmp_path, tiny_tok, monkeypatch):
    """Chunks of 8 rows: several record batches, and KL partners kept (splits of 8 or more)."""
    from kto_cli import data
    monkeypatch.setattr(tables, "CHUNK", 8)
    path = write_jsonl(tmp_path / "d.jsonl", rows(60))
    cfg = DatasetConfig(train=str(path), eval_fraction=0.2, max_length=24, max_prompt_length=16)
    fresh = splits(DatasetConfig(**{**vars(cfg), "cache": False}), tiny_tok)
    first = splits(cfg, tiny_tok)
    assert len(list((tmp_path / "kto-cli-cache" / "data").glob("*.arrow"))) == 1
    assert len(list((tmp_path / "kto-cli-cache" / "data").glob("partners-*.npy"))) == 2  # train, held-out

    def no_reading(*a, **k):
        raise AssertionError("a cached source was read again")
    monkeypatch.setattr(tables, "build", no_reading)
    monkeypatch.setattr(data, "kl_partners", no_reading)
    cached = splits(cfg, tiny_tok)
    for a, b in ((fresh, first), (first, cached)):
        assert a[:3] == b[:3]
    assert fresh[3].digest() == cached[3].digest()
    assert fresh[1]["seqs"] and fresh[2]["train"] > 0  # a held-out split, and truncation at work
    assert any(len(p) == 16 for p, _ in fresh[0]["seqs"])


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv"])
def test_the_arrow_reader_and_the_plain_reader_agree(tmp_path, tiny_tok, monkeypatch, suffix):
    tabular = [{"prompt": f"q{i % 9}", "completion": f"c{i}", "label": i % 3 != 0} for i in range(40)]
    data = rows(40) if suffix in ("jsonl", "json") else tabular
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, data)
    elif suffix == "json":
        path.write_text(json.dumps(data))
    elif suffix == "parquet":
        pd.DataFrame(data).to_parquet(path)
    else:
        pd.DataFrame(data).to_csv(path, index=False)
    cfg = DatasetConfig(train=str(path), eval_fraction=0.25, cache=False)
    got = {}
    for reader, size in (("plain", 1 << 40), ("arrow", 0)):
        monkeypatch.setattr(tables, "ARROW_MIN_BYTES", size)
        train, held, report = build_splits(cfg, tiny_tok, use_chat_template=True)
        got[reader] = view(train), view(held), report, [held.example(i) for i in range(len(held))]
    assert got["plain"] == got["arrow"]
    assert got["arrow"][3] and all(e.row in data for e in got["arrow"][3])  # held-out rows as the file holds them


def test_the_key_follows_content_columns_tokenizer_and_template(tmp_path, tiny_tok):
    import copy
    path = write_jsonl(tmp_path / "a.jsonl", rows(10))
    key = lambda p=path, cols=None, tok=tiny_tok, tmpl=True: tables.open_table(  # noqa: E731
        str(p), "train", cols, tok, tmpl, tmp_path / "cache").key
    base = key()
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(path.read_bytes())
    assert key(moved) == base  # by content, not by name
    other = tmp_path / "b.jsonl"
    other.write_bytes(path.read_bytes().replace(b"yes", b"yep"))
    grown = copy.deepcopy(tiny_tok)
    grown.add_special_tokens({"additional_special_tokens": ["<|good|>"]})
    retemplated = copy.deepcopy(tiny_tok)
    retemplated.chat_template = tiny_tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    others = [key(other), key(cols={"prompt": "question"}), key(tok=grown), key(tok=retemplated), key(tmpl=False)]
    assert len({base, *others}) == 6
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 6


def test_bad_rows_keep_their_file_and_row_when_cached(tmp_path, tiny_tok, monkeypatch):
    data = rows(12)
    data[4] = {"prompt": "p", "completion": "c", "label": "yes"}
    text = "".join(json.dumps(r) + "\n" for r in data)
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + text)  # a blank first line: rows are numbered by line
    for size in (1 << 40, 0):  # the plain reader, and the Arrow one (which hands blank lines back to it)
        monkeypatch.setattr(tables, "ARROW_MIN_BYTES", size)
        cache = str(tmp_path / f"cache{size}")
        for attempt in ("first", "cached"):
            with pytest.raises(UserError, match=rf"^{path}: row 6: field 'label': expected true or false"):
                build_splits(DatasetConfig(train=str(path), cache_dir=cache), tiny_tok, True)
            report = build_splits(DatasetConfig(train=str(path), skip_bad_rows=True, cache_dir=cache), tiny_tok, True)[2]
            assert report["skipped_rows"] == 1, attempt
    copy = tmp_path / "renamed.jsonl"
    copy.write_text(path.read_text())
    with pytest.raises(UserError, match=rf"^{copy}: row 6: "):
        build_splits(DatasetConfig(train=str(copy)), tiny_tok, True)
    assert build_splits(DatasetConfig(train=str(path), max_train_rows=4), tiny_tok, True)[2]["train"] > 0  # before it


@pytest.mark.parametrize("size", [1 << 40, 0])
def test_a_file_that_is_not_json_lines_names_its_row_and_leaves_no_entry(tmp_path, tiny_tok, monkeypatch, size):
    monkeypatch.setattr(tables, "ARROW_MIN_BYTES", size)  # the plain reader, or Arrow's handing it back
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=rf"^{path}: row 2: not valid JSON"):
        build_splits(DatasetConfig(train=str(path), skip_bad_rows=True), tiny_tok, True)
    assert not list((tmp_path / "kto-cli-cache" / "data").glob("*"))


@pytest.mark.parametrize("tail", ["", "\n  \n"])  # blank lines (no rows) send the first read to the plain reader
def test_a_held_out_row_is_read_back_as_the_file_holds_it(tmp_path, tiny_tok, monkeypatch, tail):
    """Arrow gives a column of 4 and 4.5 as floats; the verifier gets the row's own 4, on the first
    run and on a cached one."""
    monkeypatch.setattr(tables, "ARROW_MIN_BYTES", 0)
    data = [{"prompt": f"q{i}", "completion": "c", "label": True, "answer": 4 if i % 2 else 4.5} for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in data) + tail)
    for attempt in ("first", "cached"):
        held = build_splits(DatasetConfig(train=str(path), eval_fraction=0.5), tiny_tok, True)[1]
        got = [held.example(i) for i in range(len(held))]
        assert [e.row for e in got] == [r for r in data if r["prompt"] in {e.prompt for e in got}], attempt
        assert {type(e.row["answer"]) for e in got} == {int, float}, attempt


def test_a_damaged_entry_is_tokenised_again(tmp_path, tiny_tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", rows(9))
    cfg = DatasetConfig(train=str(path))
    fresh = view(build_splits(cfg, tiny_tok, True)[0])
    entry = next((tmp_path / "kto-cli-cache" / "data").glob("*.arrow"))
    entry.write_bytes(entry.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING, logger="kto_cli"):
        again = view(build_splits(cfg, tiny_tok, True)[0])
    assert "unreadable" in caplog.text and again == fresh
    assert view(build_splits(cfg, tiny_tok, True)[0]) == fresh and entry.stat().st_size > 100  # written whole again


def test_json_lines_keep_their_values(tmp_path, tiny_tok):
    """A date-like completion stays text (Arrow's JSON reader would make it a timestamp)."""
    data = [{"prompt": f"When was release {i}?", "completion": f"2024-01-{i + 10}", "label": True} for i in range(9)]
    train = build_splits(DatasetConfig(train=str(write_jsonl(tmp_path / "d.jsonl", data))), tiny_tok, True)[0]
    assert [train.example(i).completion for i in range(len(train))] == [r["completion"] for r in data]


def test_an_unwritable_cache_is_a_warning(tmp_path, tiny_tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", rows(9))
    (tmp_path / "ro").write_text("a file where the cache folder would be")
    with caplog.at_level(logging.WARNING, logger="kto_cli"):
        train = build_splits(DatasetConfig(train=str(path), cache_dir=str(tmp_path / "ro" / "data")), tiny_tok, True)[0]
    assert "could not write" in caplog.text and len(train) == 15


# ---------------------------------------------------------------- the array operations against plain loops

def plain_unpair_one(keys: list, seed: int) -> list:
    rng, by_prompt = random.Random(seed), {}
    for i, k in enumerate(keys):
        by_prompt.setdefault(k, []).append(i)
    return sorted(idx[rng.randrange(len(idx))] for idx in by_prompt.values())


def plain_pairs(keys: list, labels: list, pair: list) -> list:
    """pair_by_prompt then pairs() as loops over examples: the k-th desirable of a prompt with its
    k-th undesirable, pairs in the order of their first example."""
    free = {}
    for i, (k, good, p) in enumerate(zip(keys, labels, pair)):
        if p < 0:
            free.setdefault(k, ([], []))[0 if good else 1].append(i)
    pair, next_id = list(pair), max(pair + [-1]) + 1
    for good, bad in free.values():
        for g, b in zip(good, bad):
            pair[g] = pair[b] = next_id
            next_id += 1
    sides = {}
    for i, (p, good) in enumerate(zip(pair, labels)):
        if p >= 0:
            sides.setdefault(p, {})[good] = i
    return [[s[True], s[False]] for s in sides.values() if len(s) == 2]


@pytest.mark.parametrize("seed", range(5))
def test_array_unpairing_and_pairing_equal_plain_loops(seed, tiny_tok):
    rng = np.random.default_rng(seed)
    n = 300
    paired = np.repeat(rng.random(n // 2) < 0.6, 2)  # rows of two examples (chosen, rejected), or two free ones
    pair = np.where(paired, np.arange(n) // 2, -1)
    labels = np.where(paired, np.arange(n) % 2 == 0, rng.random(n) < 0.5)
    keys = np.where(paired, 1000 + np.arange(n) // 2, rng.integers(0, 40, n))
    assert unpair_one(keys, seed).tolist() == plain_unpair_one(keys.tolist(), seed)
    split = Split.__new__(Split)
    split.pair, split.labels = pair_by_prompt(keys, labels, pair), labels
    split.at = np.arange(n)
    assert split.pairs().tolist() == plain_pairs(keys.tolist(), labels.tolist(), pair.tolist())


def test_kto_cache_shows_and_prunes_unused_data(tmp_path, tiny_tok, capsys):
    import os
    import time
    from kto_cli import cachetool
    path = write_jsonl(tmp_path / "d.jsonl", rows(9))
    build_splits(DatasetConfig(train=str(path)), tiny_tok, True)
    cache = tmp_path / "kto-cli-cache"
    cachetool.main(["du", "--dir", str(cache)])
    assert "tokenised data: 1 source(s)" in capsys.readouterr().out
    cachetool.main(["prune", "--dir", str(cache), "--older-than", "1"])
    assert len(list((cache / "data").glob("*"))) == 2  # used just now: kept
    month = time.time() - 30 * 86400
    for f in (cache / "data").glob("*.arrow"):
        os.utime(f, (month, month))
    cachetool.main(["prune", "--dir", str(cache), "--older-than", "1"])
    assert not list((cache / "data").glob("*"))

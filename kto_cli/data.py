"""Reading, validating, unpairing, subsampling, tokenizing and collating feedback data.

Pure and testable without a model: the only outside object is a tokenizer.

Row formats (files: .jsonl, .json, .parquet, .csv; or a `datasets` hub name):
    unpaired: {"prompt": P, "completion": C, "label": true|false}
    paired:   {"prompt": P, "chosen": C, "rejected": C}, or without "prompt": chosen and rejected
              share it as their start (Anthropic HH; pair_prompt)
where P is text or a list of {"role", "content"} messages, and C is text or a list holding the
assistant's message(s).
"""
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from . import tables
from .config import DatasetConfig, KLPartners, UnpairMode, UserError

log = logging.getLogger("kto_cli")

Text = Union[str, list]  # plain text, or a list of chat messages


@dataclass
class Example:
    prompt: Text
    completion: Text
    desirable: bool
    pair_id: Optional[int]  # the paired row it came from; None for unpaired rows
    where: str  # "file: row N", for error messages
    row: Optional[dict] = None  # the row as read: what a verifier compares a generated answer with


class Split:
    """The examples of one split, drawn from Tables (kto_cli/tables.py): example i is example at[i]
    of table src[i]. Per-example fields are arrays (a few numbers each); token ids stay in the
    tables, so a split of a million rows costs megabytes, not gigabytes. pair[i]: example i's pair
    (-1 for none); kl_partner[i]: example i's KL sequence is (prompt i, completion kl_partner[i])."""

    def __init__(self, tables: list, src, at, pair, max_length: int, max_prompt_length: int, kl_partner=None):
        self.tables, self.max_length, self.max_prompt_length = tables, max_length, max_prompt_length
        self.src, self.at, self.pair = np.asarray(src, np.int16), np.asarray(at, np.int64), np.asarray(pair, np.int64)
        self.labels = self._gather("desirable")  # (N,) bool
        self.prompt = self._gather("prompt")  # (N,) int64 prompt keys
        self.head = self._gather("head")  # (N,) tokens of each prompt that truncation keeps
        self.prompt_len, self.completion_len = self._gather("prompt_len"), self._gather("completion_len")
        self.kl_partner = np.arange(len(self.at)) if kl_partner is None else np.asarray(kl_partner, np.int64)
        self.extra = np.full(len(self.at), -1, np.int32)  # a token ending the prompt (control tokens); -1: none

    def _gather(self, field: str) -> np.ndarray:
        if len(self.tables) == 1:
            values = getattr(self.tables[0], field)
            whole = len(self.at) == len(values) and np.array_equal(self.at, np.arange(len(values)))
            return values if whole else values[self.at]  # the whole table, in order: its arrays, not copies
        out = np.zeros(len(self.at), getattr(self.tables[0], field).dtype)
        for k, t in enumerate(self.tables):
            mine = self.src == k
            out[mine] = getattr(t, field)[self.at[mine]]
        return out

    def __len__(self):
        return len(self.at)

    def take(self, keep) -> "Split":
        """The examples where keep (a bool mask or indices), in order; KL partners are drawn later."""
        return Split(self.tables, self.src[keep], self.at[keep], self.pair[keep], self.max_length, self.max_prompt_length)

    def prompt_ids(self, i: int) -> list:
        ids = self.tables[self.src[i]].prompt_ids(int(self.at[i]))
        return ids + [int(self.extra[i])] if self.extra[i] >= 0 else ids

    def completion_ids(self, i: int) -> list:
        return self.tables[self.src[i]].completion_ids(int(self.at[i]))

    def sequence(self, i: int) -> tuple:
        return truncate(self.prompt_ids(i), self.completion_ids(i), self.max_length, self.max_prompt_length,
                        int(self.head[i]))

    def kl_sequence(self, i: int) -> tuple:
        return truncate(self.prompt_ids(i), self.completion_ids(int(self.kl_partner[i])), self.max_length,
                        self.max_prompt_length, int(self.head[i]))

    def lengths(self) -> np.ndarray:
        """(N,) tokens of each example's sequence as truncated."""
        prompt = np.minimum(self.prompt_len + (self.extra >= 0), self.max_prompt_length)
        return prompt + np.clip(self.max_length - prompt, 0, self.completion_len)

    def desirable(self, idx) -> torch.Tensor:
        return torch.from_numpy(self.labels[np.asarray(idx, np.int64)].copy())

    def example(self, i: int) -> Example:
        """Example i with its texts and row (read from its source on first use)."""
        e = self.tables[self.src[i]].example(int(self.at[i]))
        return replace(e, pair_id=None if self.pair[i] < 0 else int(self.pair[i]))

    @property
    def examples(self) -> "ExampleView":
        return ExampleView(self)

    def distinct_prompts(self) -> list:
        """The index of each distinct prompt's first example, in order."""
        return sorted(np.unique(self.prompt, return_index=True)[1].tolist())

    def pairs(self) -> np.ndarray:
        """(P, 2) chosen and rejected index of every pair with both sides present, in the order of
        each pair's first example."""
        idx = np.flatnonzero(self.pair >= 0)
        groups, g = np.unique(self.pair[idx], return_inverse=True)
        chosen, rejected, first = (np.full(len(groups), -1) for _ in range(3))
        good = self.labels[idx]
        chosen[g[good]], rejected[g[~good]] = idx[good], idx[~good]
        first[:] = len(self)
        np.minimum.at(first, g, idx)
        both = (chosen >= 0) & (rejected >= 0)
        order = np.argsort(first[both], kind="stable")
        return np.stack([chosen[both][order], rejected[both][order]], axis=1).reshape(-1, 2)

    def add_control_tokens(self, good_id: int, bad_id: Optional[int]) -> None:
        """Ends each prompt with good_id (desirable) or bad_id (undesirable); bad_id None: good_id for all."""
        self.extra = np.where(self.labels | (bad_id is None), good_id, -1 if bad_id is None else bad_id).astype(np.int32)

    def digest(self) -> str:
        """A hash of what the split trains on: which tokenised examples (the tables' content keys),
        their labels, KL partners and control tokens."""
        h = hashlib.sha256(json.dumps([t.key for t in self.tables] + [self.max_length, self.max_prompt_length]).encode())
        for a in (self.src, self.at, self.labels, self.kl_partner, self.extra):
            h.update(np.ascontiguousarray(a).tobytes())
        return DIGEST_FORM + h.hexdigest()[:16]


DIGEST_FORM = "t1-"  # Split.digest's form: a checkpoint's digest of another form was made by an earlier version


class ExampleView:
    """split.examples: the split's Examples, each made when it is read (small splits: held-out
    prompts, online rounds)."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i: int) -> Example:
        return self.split.example(i)

    def __iter__(self):
        return (self.split.example(i) for i in range(len(self.split)))


# ---------------------------------------------------------------- reading

def resolve_source(spec: str) -> str:
    """`package:FILE` names data shipped inside kto-cli; anything else is returned as is."""
    if spec.startswith("package:"):
        return str(resources.files("kto_cli") / "assets" / spec[len("package:"):])
    return spec


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def read_rows(spec: str, split: str) -> tuple:
    """Returns (display name, list of (row number, row dict))."""
    path = resolve_source(spec)
    if tables.local_file(path):
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_table, ".csv": _read_table}
        return path, reader[Path(path).suffix.lower()](path)
    source = tables.hub_source(spec, split)
    return source["name"], [(n, row) for n, row, _ in source["read"]()]


def _read_jsonl(path: str) -> list:
    return [(n, row) for n, row, _ in iter_jsonl(path)]


def iter_jsonl(path: str):
    """(row number, row, byte offset of its line) of each non-blank line, as they stream past."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: row {n}: not valid UTF-8 (byte {e.start} of the line)") from None
            if line.strip():
                try:
                    yield n, json.loads(line), offset
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: row {n}: not valid JSON ({e.msg})") from None
            offset += len(raw)


def _read_json(path: str) -> list:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows")
    return list(enumerate(data, start=1))


def _read_table(path: str) -> list:
    import pandas as pd
    try:
        df = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, keep_default_na=False)
    except Exception as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    return [(n, tables.plain_row(_plain(row))) for n, row in enumerate(df.to_dict("records"), start=1)]


def csv_label(row: Any, path: str) -> Any:
    """A CSV cell has no type: a label column with a blank cell is read as text ("true", "")."""
    label = row.get("label") if path.lower().endswith(".csv") and isinstance(row, dict) else None
    if isinstance(label, str):
        row = {**row, "label": {"true": True, "false": False, "": None}.get(label.strip().lower(), label)}
    return row


def _plain(value: Any) -> Any:
    """numpy arrays and scalars from parquet/pandas into plain Python values."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- validating

def _check_text(value: Any, field: str, where: str, completion: bool) -> Text:
    if isinstance(value, str):
        if not value.strip() and completion:
            raise UserError(f"{where}: field '{field}' is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for k, m in enumerate(value):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: field '{field}' message {k}: needs string 'role' and 'content'")
        if completion and not any(m["content"].strip() for m in value):
            raise UserError(f"{where}: field '{field}' is empty")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None:
        raise UserError(f"{where}: field '{field}' is missing")
    raise UserError(f"{where}: field '{field}': expected text or a list of messages, got {type(value).__name__}")


def row_to_examples(row: Any, where: str, pair_id: int) -> list:
    """One validated row as Examples: one for an unpaired row, two for a paired row."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with fields, got {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        chosen = _check_text(row.get("chosen"), "chosen", where, completion=True)
        rejected = _check_text(row.get("rejected"), "rejected", where, completion=True)
        prompt, chosen, rejected = pair_prompt(row.get("prompt"), chosen, rejected, where)
        return [Example(prompt, chosen, True, pair_id, where, row), Example(prompt, rejected, False, pair_id, where, row)]
    prompt = _check_text(row.get("prompt"), "prompt", where, completion=False)
    completion = _check_text(row.get("completion"), "completion", where, completion=True)
    label = row.get("label")
    if label is None:
        raise UserError(f"{where}: field 'label' is missing (or use fields 'chosen' and 'rejected' for pairs)")
    if not isinstance(label, bool):
        raise UserError(f"{where}: field 'label': expected true or false, got {label!r}")
    return [Example(prompt, completion, label, None, where, row)]


HH_TURN = "\n\nAssistant:"  # Anthropic HH's plain-text turn marker


def pair_prompt(prompt: Any, chosen: Text, rejected: Text, where: str) -> tuple:
    """(prompt, chosen, rejected) of a paired row. Without a 'prompt' field (Anthropic HH, many hub
    sets) the start chosen and rejected share is the prompt: whole messages for conversations (the
    shared ones ending on a user's turn, the rest the assistant's), for plain text up to the last
    HH turn marker (`\n\nAssistant:`) they share, else their last shared whitespace. Conversations
    that repeat the prompt (UltraFeedback binarized) lose it. Anything else is a bad row."""
    if chosen == rejected:
        raise UserError(f"{where}: fields 'chosen' and 'rejected' are the same")
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = next(i for i, (a, b) in enumerate(zip(chosen + [None], rejected + [None])) if a != b)
        if k:
            shared, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            for name, side in (("chosen", chosen), ("rejected", rejected)):
                if not side:
                    raise UserError(f"{where}: field '{name}' is nothing beyond the start chosen and rejected share")
            if shared[-1]["role"] == "assistant" or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
                raise UserError(f"{where}: chosen and rejected must differ from an assistant's turn on, "
                                "after the turns they share")
            if prompt is not None and _check_text(prompt, "prompt", where, completion=False) not in \
                    (shared, [{"role": "user", "content": shared[-1]["content"]}], shared[-1]["content"]):
                raise UserError(f"{where}: field 'prompt' is not the start that chosen and rejected share")
            prompt = shared
    elif prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = split_text_pair(chosen, rejected, where)
    if prompt is None:
        raise UserError(f"{where}: field 'prompt' is missing, and chosen and rejected share no start to take as it")
    return _check_text(prompt, "prompt", where, completion=False), chosen, rejected


def split_text_pair(chosen: str, rejected: str, where: str) -> tuple:
    """(prompt, chosen, rejected) of two texts sharing a start: in HH's form, after the last
    `\n\nAssistant:` they share, the two answers holding no further turn; else after their last
    shared whitespace."""
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_TURN, 0, common)
    if cut >= 0:
        cut += len(HH_TURN)
        if any(HH_TURN.replace("Assistant", "Human") in side[cut:] for side in (chosen, rejected)):
            raise UserError(f"{where}: chosen and rejected differ before their last turn (HH's "
                            "'\n\nHuman:' after the 'Assistant:' they share)")
    elif HH_TURN in chosen or HH_TURN in rejected:
        raise UserError(f"{where}: chosen and rejected differ before an 'Assistant:' turn they share")
    else:
        cut = max(chosen.rfind(c, 0, common) for c in " \n\t") + 1
    if not chosen[:cut].strip():
        raise UserError(f"{where}: no field 'prompt', and chosen and rejected share no start to take as it")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side[cut:].strip():
            raise UserError(f"{where}: field '{name}' is nothing beyond the start chosen and rejected share")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def labelled_rows(spec: str, split: str, max_rows: Optional[int] = None, columns: Optional[dict] = None) -> tuple:
    """(display name, [(where, row, columns)]): the rows of one source as read, each with the
    column map its fields are read through ({kto-cli's field: the data's column})."""
    name, rows = read_rows(spec, split)
    return name, [(f"{name}: row {n}", row, columns or {}) for n, row in rows[:max_rows]]


def training_rows(cfg: DatasetConfig) -> tuple:
    """(display name, [(where, row, columns)]) of dataset.train, or of dataset.mix (mix_positions)."""
    if not cfg.mix:
        return labelled_rows(cfg.train, cfg.train_split, cfg.max_train_rows, column_map(cfg.columns))
    sources = [labelled_rows(m.source, m.split, None, column_map(m.columns or cfg.columns)) for m in cfg.mix]
    picked = mix_positions(cfg, [(name, len(rows)) for name, rows in sources])
    return "dataset.mix", [rows[i] for (_, rows), take in zip(sources, picked) for i in take]


def mix_positions(cfg: DatasetConfig, sources: list) -> list:
    """The row positions dataset.mix takes of each (name, number of rows) source: each source's
    rows in a seeded order, n_i = p_i N of them with N as large as the sources allow without
    repeating a row (and at most dataset.max_train_rows); each list sorted."""
    seed = 0 if cfg.seed is None else cfg.seed
    shares = [m.weight / sum(m.weight for m in cfg.mix) for m in cfg.mix]
    n = min(int(size / p + 1e-9) for (_, size), p in zip(sources, shares))
    n = min(n, cfg.max_train_rows) if cfg.max_train_rows is not None else n
    counts = apportion(n, shares, [size for _, size in sources])
    picked, taken = [], []
    for k, ((name, size), take) in enumerate(zip(sources, counts)):
        order = list(range(size))
        random.Random(f"{seed}:mix:{k}").shuffle(order)
        picked.append(sorted(order[:take]))
        taken.append(f"{take} of {size} rows of {name}")
    if not any(picked):
        raise UserError(f"dataset.mix: no rows to train on ({'; '.join(taken)})")
    log.info("dataset.mix: %s", "; ".join(taken))
    return picked


def apportion(n: int, shares: list, sizes: list) -> list:
    """n split by shares into whole counts summing to n (largest remainders), none above its size."""
    counts = [min(size, int(n * p)) for p, size in zip(shares, sizes)]
    for k in sorted(range(len(shares)), key=lambda k: n * shares[k] - int(n * shares[k]), reverse=True):
        if sum(counts) < n and counts[k] < sizes[k]:
            counts[k] += 1
    return counts


def column_map(columns) -> dict:
    """{kto-cli's field: the data's column} for the fields a Columns config renames."""
    return {f: c for f, c in vars(columns).items() if c is not None and c != f}


def mapped(row: Any, where: str, columns: dict) -> Any:
    """The row with dataset.columns' columns under kto-cli's field names (a CSV's label read as a
    truth value once it is under its name)."""
    if not columns or not isinstance(row, dict):
        return csv_label(row, where.split(": row ")[0])
    missing = [c for c in columns.values() if c not in row]
    if missing:
        raise UserError(f"{where}: dataset.columns names column '{missing[0]}', which is not there "
                        f"(columns: {', '.join(map(str, row))})")
    row = {**{k: v for k, v in row.items() if k not in columns}, **{f: row[c] for f, c in columns.items()}}
    return csv_label(row, where.split(": row ")[0])


def unpair_one(prompts: np.ndarray, seed: int) -> np.ndarray:
    """One y per x: of each prompt's completions (a pair's two sides, or several rows of one
    prompt) keeps one, desirable or undesirable, at random (seeded). Returns the kept indices."""
    rng = random.Random(seed)
    _, first, inverse, counts = np.unique(prompts, return_index=True, return_inverse=True, return_counts=True)
    members = np.argsort(inverse, kind="stable")  # each prompt's examples together, in order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    groups = np.argsort(first, kind="stable")  # prompts in order of first appearance
    pick = np.array([rng.randrange(c) for c in counts[groups].tolist()], np.int64)
    return np.sort(members[starts[groups] + pick])


def pair_by_prompt(prompts: np.ndarray, labels: np.ndarray, pair: np.ndarray) -> np.ndarray:
    """Gives each unpaired desirable example a pair id shared with an undesirable example of the same
    prompt (the k-th desirable with the k-th undesirable, in row order), so losses that need pairs
    can use unpaired data. Returns the new pair ids."""
    free = np.flatnonzero(pair < 0)
    out = pair.copy()
    if not len(free):
        return out
    key, label = prompts[free], labels[free]
    order = np.lexsort((free, label, key))  # by prompt, then label, then position
    k, lab = key[order], label[order]
    new = np.concatenate([[True], (k[1:] != k[:-1]) | (lab[1:] != lab[:-1])])
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    _, slot = np.unique(np.stack([k, rank]), axis=1, return_inverse=True)  # (prompt, k-th)
    slot = slot.reshape(-1)
    both = np.bincount(slot, weights=lab, minlength=slot.max() + 1) * np.bincount(slot, weights=~lab)
    paired = both[slot] > 0
    out[free[order[paired]]] = pair.max(initial=-1) + 1 + slot[paired]
    return out


def subsample(labels: np.ndarray, desirable_fraction: float, undesirable_fraction: float, seed: int) -> np.ndarray:
    """Keeps a seeded share of desirable and of undesirable examples, in their original order.
    Returns the kept indices."""
    rng = random.Random(seed)
    keep = []
    for label, fraction in ((True, desirable_fraction), (False, undesirable_fraction)):
        idx = np.flatnonzero(labels == label).tolist()
        keep += rng.sample(idx, round(fraction * len(idx)))
    return np.sort(np.asarray(keep, np.int64))


def prompt_key(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def distinct_prompts(examples: list) -> list:
    """The index of each distinct prompt's first example, in order."""
    first = {}
    for i, e in enumerate(examples):
        first.setdefault(prompt_key(e.prompt), i)
    return list(first.values())


def hold_out(prompts: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which examples a held-out split takes: by prompt, so no prompt is both trained on and
    evaluated on. Returns a bool mask."""
    keys = np.unique(prompts).tolist()
    random.Random(seed).shuffle(keys)
    return np.isin(prompts, np.asarray(keys[: max(1, round(fraction * len(keys)))], np.int64))


# ---------------------------------------------------------------- KL partners

def kl_partners(keys, seed: int) -> np.ndarray:
    """A seeded derangement p of range(n) (p[i] != i) where, whenever possible, example p[i] has
    another prompt than example i, so (x_i, y_p[i]) is a mismatched pair. Fixed before training,
    so shuffling and batch size do not change any example's KL sequence."""
    keys = list(keys)
    n = len(keys)
    if n < 2:
        return np.arange(n)
    rng = random.Random(seed)
    p = list(range(n))
    for i in range(n - 1, 0, -1):  # Sattolo's algorithm: one n-cycle, so no fixed point
        j = rng.randrange(i)
        p[i], p[j] = p[j], p[i]
    ok = lambda i, j: j != i and keys[j] != keys[i]  # noqa: E731
    for i in range(n):
        for _ in range(32):  # repair same-prompt partners by swapping with a random slot
            if ok(i, p[i]):
                break
            k = rng.randrange(n)
            if ok(i, p[k]) and ok(k, p[i]):
                p[i], p[k] = p[k], p[i]
    return np.asarray(p, np.int64)


def rotated_partners(n: int, block: int) -> np.ndarray:
    """TRL KTOTrainer's KL pairs: in each block of `block` consecutive examples, example k takes the
    completion of example k-1, the first one the last one's."""
    i = np.arange(n)
    return np.where(i % block != 0, i - 1, np.minimum(i + block, n) - 1)


# ---------------------------------------------------------------- tokenizing

def render(example: Example, tokenizer, use_chat_template: bool, memo=None) -> tuple:
    """(prompt text, completion text, length of the prompt's header in characters). With a chat
    template the completion is what the template adds after the generation prompt, end-of-turn
    tokens included, and the header is what precedes the first message's content (BOS, system
    prompt, role markers). memo (tables.Renderer): the last prompt's rendering and the headers seen,
    reused."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = example.prompt if isinstance(example.prompt, list) else [{"role": "user", "content": example.prompt}]
        completion = example.completion if isinstance(example.completion, list) else [
            {"role": "assistant", "content": example.completion}]
        key = prompt_key(prompt)
        try:
            if memo is not None and key in memo.prompts:
                p, header = memo.prompts[key]
            else:
                p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                header = template_header(tokenizer, prompt, p, memo)
                if memo is not None:
                    memo.prompts = {key: (p, header)}  # a pair's other side comes next
            full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        except Exception as e:  # a template that refuses this row (roles out of order, say)
            raise UserError(f"{example.where}: the tokenizer's chat template fails on this row "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not full.startswith(p):
            raise UserError(f"{example.where}: the tokenizer's chat template renders the prompt differently "
                            "alone and with its completion; set model.use_chat_template=false")
        return p, full[len(p):], header
    bos = tokenizer.bos_token or ""
    return bos + _flatten(example.prompt), _flatten(example.completion) + (tokenizer.eos_token or ""), len(bos)


HEADER_SENTINEL = "KTOCLIHEADERSENTINEL"


def template_header(tokenizer, prompt: list, rendered: str, memo=None) -> int:
    """Characters the chat template puts before the first message's content (BOS, a default system
    prompt, role markers): found by rendering a sentinel in its place, since templates may reformat
    content (trim it, say). 0 when the template does not render the same text before it. memo: the
    header found for prompts of the same roles, used where this prompt's rendering starts with it."""
    if not prompt:
        return 0
    roles = tuple(m["role"] for m in prompt)
    known = memo.headers.get(roles) if memo is not None else None
    if known and rendered.startswith(known):
        return len(known)
    probe = tokenizer.apply_chat_template([{**prompt[0], "content": HEADER_SENTINEL}] + prompt[1:], tokenize=False,
                                          add_generation_prompt=True)
    at = probe.find(HEADER_SENTINEL)
    if at > 0 and memo is not None:
        memo.headers[roles] = probe[:at]
    return at if at > 0 and rendered.startswith(probe[:at]) else 0


def _flatten(text: Text) -> str:
    return text if isinstance(text, str) else "\n".join(m["content"] for m in text)


def truncate(prompt: list, completion: list, max_length: int, max_prompt_length: int, head: int = 0) -> tuple:
    """A prompt's truncation depends on the prompt alone, so all its completions (a pair's two sides,
    an example and its KL sequence) are conditioned on the same tokens: a prompt over
    max_prompt_length keeps its first `head` tokens (BOS, the template's header; at most half the
    budget) and its end. The completion keeps its start, within max_length."""
    if len(prompt) > max_prompt_length:
        head = min(head, max_prompt_length // 2)
        prompt = prompt[:head] + prompt[len(prompt) - (max_prompt_length - head):]
    return prompt, completion[: max_length - len(prompt)]


def header_tokens(tokenizer, texts: list, header_chars: list, ids: list) -> list:
    """How many of each text's tokens lie wholly within its first header_chars characters."""
    if not any(header_chars):
        return [0] * len(texts)
    if getattr(tokenizer, "is_fast", False):
        spans = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [sum(1 for _, end in span if end <= h) for span, h in zip(spans, header_chars)]
    heads = tokenizer([t[:h] for t, h in zip(texts, header_chars)], add_special_tokens=False)["input_ids"]
    return [len(h) if p[:len(h)] == h else 0 for h, p in zip(heads, ids)]


def tokenize(examples: list, tokenizer, use_chat_template: bool, cfg: DatasetConfig, seed: int,
             kl_block: int = 1, name: str = "examples") -> Split:
    """A Split of Examples made in this run (held in memory), with KL partners."""
    table = tables.table_of_examples(examples, tokenizer, use_chat_template, name)
    pair = [-1 if e.pair_id is None else e.pair_id for e in examples]
    split = Split([table], np.zeros(len(examples)), np.arange(len(examples)), pair, cfg.max_length, cfg.max_prompt_length)
    return with_partners(split, cfg, seed, kl_block)


def with_partners(split: Split, cfg: DatasetConfig, seed: int, kl_block: int) -> Split:
    """The split with each example's KL partner drawn (dataset.kl_partners). The derangement, a
    loop over the examples, is kept in the data cache by its input (the prompt keys and the seed)."""
    if cfg.kl_partners == KLPartners.rotate:
        split.kl_partner = rotated_partners(len(split), kl_block)
    else:
        split.kl_partner = tables.cached_array(
            data_cache(cfg) if len(split) >= tables.CHUNK else None, "partners",
            [np.ascontiguousarray(split.prompt).tobytes(), str(seed).encode()],
            lambda: kl_partners(split.prompt.tolist(), seed))
    return split


# ---------------------------------------------------------------- collating

def collate(sequences: list, pad_id: int) -> dict:
    """Pads (prompt ids, completion ids) pairs on the right to the batch's longest sequence."""
    T = max(len(p) + len(c) for p, c in sequences)
    B = len(sequences)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    completion_mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T) True on completion tokens
    for b, (p, c) in enumerate(sequences):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[b, :n] = 1
        completion_mask[b, len(p):n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# ---------------------------------------------------------------- the whole path

def data_cache(cfg: DatasetConfig) -> Optional[Path]:
    """Where tokenised sources are kept (None: dataset.cache=false)."""
    from .models import cache_root
    return (Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "data") if cfg.cache else None


def open_source(cfg: DatasetConfig, spec: str, split: str, columns, tokenizer, use_chat_template: bool):
    return tables.open_table(spec, split, column_map(columns), tokenizer, use_chat_template, data_cache(cfg))


def source_split(cfg: DatasetConfig, table, max_rows: Optional[int] = None, positions=None) -> tuple:
    """(Split of one source's examples without KL partners, rows skipped): of the table's first
    max_rows rows, or of the rows at `positions`. A bad row among them is fatal unless
    dataset.skip_bad_rows."""
    rows = np.arange(min(table.n_rows, max_rows if max_rows is not None else table.n_rows)) if positions is None \
        else np.asarray(positions, np.int64)
    bad = sorted(set(table.bad) & set(rows.tolist())) if table.bad else []
    if bad and not cfg.skip_bad_rows:
        line, message = table.bad[bad[0]]
        raise UserError(f"{table.name}: row {line}: {message}")
    keep = np.flatnonzero(table.row < len(rows)) if positions is None else np.flatnonzero(np.isin(table.row, rows))
    pair = np.where(table.paired[keep], table.row[keep], -1)
    return Split([table], np.zeros(len(keep)), keep, pair, cfg.max_length, cfg.max_prompt_length), len(bad)


def concat(splits: list) -> Split:
    """One split of several sources' examples, in order; pair ids kept apart."""
    if len(splits) == 1:
        return splits[0]
    base = np.cumsum([0] + [int(s.pair.max(initial=-1)) + 1 for s in splits])[:-1]
    return Split([s.tables[0] for s in splits], np.concatenate([np.full(len(s), k) for k, s in enumerate(splits)]),
                 np.concatenate([s.at for s in splits]),
                 np.concatenate([np.where(s.pair >= 0, s.pair + b, -1) for s, b in zip(splits, base)]),
                 splits[0].max_length, splits[0].max_prompt_length)


def training_split(cfg: DatasetConfig, tokenizer, use_chat_template: bool) -> tuple:
    """(Split of dataset.train's or dataset.mix's examples, rows skipped)."""
    if not cfg.mix:
        table = open_source(cfg, cfg.train, cfg.train_split, cfg.columns, tokenizer, use_chat_template)
        split, skipped = source_split(cfg, table, cfg.max_train_rows)
        name = cfg.train
    else:
        opened = [open_source(cfg, m.source, m.split, m.columns or cfg.columns, tokenizer, use_chat_template)
                  for m in cfg.mix]
        picked = mix_positions(cfg, [(t.name, t.n_rows) for t in opened])
        parts = [source_split(cfg, table, positions=take) for table, take in zip(opened, picked)]
        split, skipped, name = concat([s for s, _ in parts]), sum(k for _, k in parts), "dataset.mix"
    if not len(split):
        raise UserError(f"{name}: no usable rows")
    return split, skipped


def eval_split(cfg: DatasetConfig, train: Split, tokenizer, use_chat_template: bool, seed: int) -> tuple:
    """(train Split, held-out Split or None, rows skipped): dataset.eval's examples, or
    dataset.eval_fraction of train's prompts held out."""
    if cfg.eval:
        table = open_source(cfg, cfg.eval, cfg.eval_split, cfg.columns, tokenizer, use_chat_template)
        evals, skipped = source_split(cfg, table, cfg.max_eval_rows)
        if not len(evals):
            raise UserError(f"{cfg.eval}: no usable rows")
        return train, evals, skipped
    if cfg.eval_fraction > 0:
        held = hold_out(train.prompt, cfg.eval_fraction, seed)
        return train.take(~held), train.take(held), 0
    return train, None, 0


def paired_by_prompt(split: Split) -> Split:
    split.pair = pair_by_prompt(split.prompt, split.labels, split.pair)
    return split


def build_splits(cfg: DatasetConfig, tokenizer, use_chat_template: bool, kl_block: int = 1) -> tuple:
    """(train Split, eval Split or None, report dict). The eval split keeps both sides of each
    pair (and is never subsampled), so held-out accuracy compares chosen with rejected.
    kl_block: the block size of dataset.kl_partners=rotate (TRL's per-device batch)."""
    seed = 0 if cfg.seed is None else cfg.seed  # a run fills it from its top-level seed
    train, skipped = training_split(cfg, tokenizer, use_chat_template)
    train, evals, skipped_eval = eval_split(cfg, train, tokenizer, use_chat_template, seed)
    skipped += skipped_eval
    if cfg.pair_by_prompt:
        train, evals = paired_by_prompt(train), evals if evals is None else paired_by_prompt(evals)
    if cfg.unpair == UnpairMode.one:
        train = train.take(unpair_one(train.prompt, seed))
    if cfg.desirable_fraction != 1.0 or cfg.undesirable_fraction != 1.0:
        train = train.take(subsample(train.labels, cfg.desirable_fraction, cfg.undesirable_fraction, seed))
    if not len(train):
        raise UserError(f"{cfg.train}: no training examples left after subsampling")
    report = {"train": len(train), "eval": 0 if evals is None else len(evals), "skipped_rows": skipped,
              "desirable": int(train.labels.sum()), "undesirable": int((~train.labels).sum())}
    train = with_partners(train, cfg, seed, kl_block)
    evals = None if evals is None else with_partners(evals, cfg, seed + 1, kl_block)
    for name, split in (("training", train), ("held-out", evals)):
        report.update(count_truncated(split, name) if split is not None else {})
    return train, evals, report


def count_truncated(split: Split, name: str) -> dict:
    """How many prompts and completions truncation cuts (a warning line when any)."""
    prompt_len = split.prompt_len + (split.extra >= 0)
    prompts = int((prompt_len > split.max_prompt_length).sum())
    completions = int((np.minimum(prompt_len, split.max_prompt_length) + split.completion_len > split.max_length).sum())
    if prompts or completions:
        log.warning("%d of %d %s prompts are longer than dataset.max_prompt_length=%d tokens (their start and end "
                    "are kept) and %d completions are cut at dataset.max_length=%d", prompts, len(split), name,
                    split.max_prompt_length, completions, split.max_length)
    return {f"{name}_prompts_cut": prompts, f"{name}_completions_cut": completions} if prompts or completions else {}


def held_out_split(cfg: DatasetConfig, tokenizer, use_chat_template: bool, kl_block: int = 1) -> Optional[Split]:
    """The eval Split alone, as build_splits makes it (None without one): for runs whose training
    data are made later (online rounds)."""
    seed = 0 if cfg.seed is None else cfg.seed
    if not cfg.eval and not cfg.eval_fraction > 0:
        return None
    train = None if cfg.eval else training_split(cfg, tokenizer, use_chat_template)[0]
    evals = eval_split(cfg, train, tokenizer, use_chat_template, seed)[1]
    evals = paired_by_prompt(evals) if cfg.pair_by_prompt else evals
    return with_partners(evals, cfg, seed + 1, kl_block)


def load_prompts(cfg: DatasetConfig, tokenizer, use_chat_template: bool) -> Split:
    """The distinct prompts of the training rows, tokenized as training conditions on them, for the
    policy to answer (online rounds): any row with a 'prompt' serves (paired, unpaired or prompt
    only), and goes with it to the verifier. Held-out prompts (dataset.eval_fraction) are left out."""
    name, rows = training_rows(cfg)
    examples = []
    for where, row, columns in rows:
        try:
            row = mapped(row, where, columns)
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected an object with fields, got {type(row).__name__}")
            paired = "chosen" in row or "rejected" in row  # its prompt as training takes it (maybe implicit)
            prompt = row_to_examples(row, where, 0)[0].prompt if paired else \
                _check_text(row.get("prompt"), "prompt", where, completion=False)
        except UserError:
            if not cfg.skip_bad_rows:
                raise
            continue
        examples.append(Example(prompt, " ", True, None, where, row))  # the completion is a placeholder
    if not examples:
        raise UserError(f"{name}: no usable rows")
    seed = 0 if cfg.seed is None else cfg.seed
    if not cfg.eval and cfg.eval_fraction > 0:  # the prompts held_out_split holds out, chosen the same way
        held = set(held_out_split(cfg, tokenizer, use_chat_template).prompt.tolist())
        examples = [e for e in examples if tables.prompt_hash(prompt_key(e.prompt)) not in held]
    return tokenize([examples[i] for i in distinct_prompts(examples)], tokenizer, use_chat_template, cfg, seed, name=name)

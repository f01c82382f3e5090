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

import torch

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


@dataclass
class Split:
    """The tokenized examples of one split, with each example's KL partner."""
    examples: list
    prompt_ids: list  # list[list[int]]
    completion_ids: list  # list[list[int]]
    kl_partner: list  # list[int]: example i's KL sequence is (prompt i, completion kl_partner[i])
    max_length: int
    max_prompt_length: int
    prompt_head: list  # list[int]: tokens of each prompt that truncation keeps (BOS, template header)

    def __len__(self):
        return len(self.examples)

    def sequence(self, i: int) -> tuple:
        return truncate(self.prompt_ids[i], self.completion_ids[i], self.max_length, self.max_prompt_length,
                        self.prompt_head[i])

    def kl_sequence(self, i: int) -> tuple:
        j = self.kl_partner[i]
        return truncate(self.prompt_ids[i], self.completion_ids[j], self.max_length, self.max_prompt_length,
                        self.prompt_head[i])

    def desirable(self, idx) -> torch.Tensor:
        return torch.tensor([self.examples[i].desirable for i in idx], dtype=torch.bool)

    def pairs(self) -> list:
        """(chosen index, rejected index) for every pair with both sides present."""
        sides = {}
        for i, e in enumerate(self.examples):
            if e.pair_id is not None:
                sides.setdefault(e.pair_id, {})[e.desirable] = i
        return [(s[True], s[False]) for s in sides.values() if len(s) == 2]

    def add_control_tokens(self, good_id: int, bad_id: Optional[int]) -> None:
        """Ends each prompt with good_id (desirable) or bad_id (undesirable); bad_id None: good_id for all."""
        for i, e in enumerate(self.examples):
            self.prompt_ids[i] = self.prompt_ids[i] + [good_id if e.desirable or bad_id is None else bad_id]


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
    suffix = Path(path).suffix.lower()
    if suffix in FILE_SUFFIXES or Path(path).exists():
        if Path(path).is_dir():
            raise UserError(f"{path}: a directory, not a data file (give a .jsonl, .json, .parquet or .csv file)")
        if not Path(path).is_file():
            raise UserError(f"{path}: no such data file")
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_table, ".csv": _read_table}.get(suffix)
        if reader is None:
            raise UserError(f"{path}: unknown data file type '{suffix}' (use .jsonl, .json, .parquet or .csv)")
        return path, reader(path)
    return f"{spec}[{split}]", _read_hub(spec, split)


def _read_jsonl(path: str) -> list:
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: row {n}: not valid UTF-8 (byte {e.start} of the line)") from None
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: row {n}: not valid JSON ({e.msg})") from None
    return rows


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
    return [(n, _plain(row)) for n, row in enumerate(df.to_dict("records"), start=1)]


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


def _read_hub(name: str, split: str) -> list:
    import datasets
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise UserError(f"could not load dataset '{name}' split '{split}': {str(e).splitlines()[0]} "
                        f"(no file of that name exists either; this machine may be offline)") from None
    return list(enumerate(ds, start=1))


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
    """(display name, [(where, row)]) of dataset.train, or of dataset.mix: each source's rows in a
    seeded order, n_i = p_i N of them with N as large as the sources allow without repeating a
    row (and at most dataset.max_train_rows)."""
    if not cfg.mix:
        return labelled_rows(cfg.train, cfg.train_split, cfg.max_train_rows, column_map(cfg.columns))
    seed = 0 if cfg.seed is None else cfg.seed
    sources = [labelled_rows(m.source, m.split, None, column_map(m.columns or cfg.columns)) for m in cfg.mix]
    shares = [m.weight / sum(m.weight for m in cfg.mix) for m in cfg.mix]
    n = min(int(len(rows) / p + 1e-9) for (_, rows), p in zip(sources, shares))
    n = min(n, cfg.max_train_rows) if cfg.max_train_rows is not None else n
    counts = apportion(n, shares, [len(rows) for _, rows in sources])
    mixed, taken = [], []
    for k, ((name, rows), take) in enumerate(zip(sources, counts)):
        order = list(range(len(rows)))
        random.Random(f"{seed}:mix:{k}").shuffle(order)
        mixed += [rows[i] for i in sorted(order[:take])]
        taken.append(f"{take} of {len(rows)} rows of {name}")
    if not mixed:
        raise UserError(f"dataset.mix: no rows to train on ({'; '.join(taken)})")
    log.info("dataset.mix: %s", "; ".join(taken))
    return "dataset.mix", mixed


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


def load_examples(spec: str, split: str, skip_bad_rows: bool, max_rows: Optional[int] = None,
                  columns: Optional[dict] = None) -> tuple:
    """(examples, number of bad rows skipped) of one source."""
    return examples_from(labelled_rows(spec, split, max_rows, columns), skip_bad_rows)


def examples_from(named_rows: tuple, skip_bad_rows: bool) -> tuple:
    """(examples, number of bad rows skipped) from (display name, [(where, row, columns)]). Paired
    rows give both of their examples."""
    name, rows = named_rows
    examples, skipped = [], 0
    for pair_id, (where, row, columns) in enumerate(rows):
        try:
            examples.extend(row_to_examples(mapped(row, where, columns), where, pair_id))
        except UserError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not examples:
        raise UserError(f"{name}: no usable rows")
    return examples, skipped


def unpair_one(examples: list, seed: int) -> list:
    """One y per x: of each prompt's completions (a pair's two sides, or several rows of one
    prompt) keeps one, desirable or undesirable, at random (seeded)."""
    rng = random.Random(seed)
    by_prompt = {}
    for i, e in enumerate(examples):
        by_prompt.setdefault(prompt_key(e.prompt), []).append(i)
    keep = {idx[rng.randrange(len(idx))] for idx in by_prompt.values()}
    return [e for i, e in enumerate(examples) if i in keep]


def pair_by_prompt(examples: list) -> list:
    """Gives each unpaired desirable example a pair id shared with an undesirable example of the same
    prompt (in row order), so losses that need pairs can use unpaired data."""
    free = {}
    for i, e in enumerate(examples):
        if e.pair_id is None:
            free.setdefault(prompt_key(e.prompt), ([], []))[0 if e.desirable else 1].append(i)
    out = list(examples)
    next_id = max((e.pair_id for e in examples if e.pair_id is not None), default=-1) + 1
    for good, bad in free.values():
        for g, b in zip(good, bad):
            out[g] = replace(out[g], pair_id=next_id)
            out[b] = replace(out[b], pair_id=next_id)
            next_id += 1
    return out


def subsample(examples: list, desirable_fraction: float, undesirable_fraction: float, seed: int) -> list:
    """Keeps a seeded share of desirable and of undesirable examples, in their original order."""
    rng = random.Random(seed)
    keep = set()
    for label, fraction in ((True, desirable_fraction), (False, undesirable_fraction)):
        idx = [i for i, e in enumerate(examples) if e.desirable == label]
        keep.update(rng.sample(idx, round(fraction * len(idx))))
    return [e for i, e in enumerate(examples) if i in keep]


def prompt_key(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def distinct_prompts(examples: list) -> list:
    """The index of each distinct prompt's first example, in order."""
    first = {}
    for i, e in enumerate(examples):
        first.setdefault(prompt_key(e.prompt), i)
    return list(first.values())


def hold_out(examples: list, fraction: float, seed: int) -> tuple:
    """Splits by prompt, so no prompt is both trained on and evaluated on. Returns (train, eval)."""
    prompts = sorted({prompt_key(e.prompt) for e in examples})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))])
    train = [e for e in examples if prompt_key(e.prompt) not in held]
    return train, [e for e in examples if prompt_key(e.prompt) in held]


# ---------------------------------------------------------------- KL partners

def kl_partners(keys: list, seed: int) -> list:
    """A seeded derangement p of range(n) (p[i] != i) where, whenever possible, example p[i] has
    another prompt than example i, so (x_i, y_p[i]) is a mismatched pair. Fixed before training,
    so shuffling and batch size do not change any example's KL sequence."""
    n = len(keys)
    if n < 2:
        return list(range(n))
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
    return p


def rotated_partners(n: int, block: int) -> list:
    """TRL KTOTrainer's KL pairs: in each block of `block` consecutive examples, example k takes the
    completion of example k-1, the first one the last one's."""
    return [i - 1 if i % block else min(i + block, n) - 1 for i in range(n)]


# ---------------------------------------------------------------- tokenizing

def render(example: Example, tokenizer, use_chat_template: bool) -> tuple:
    """(prompt text, completion text, length of the prompt's header in characters). With a chat
    template the completion is what the template adds after the generation prompt, end-of-turn
    tokens included, and the header is what precedes the first message's content (BOS, system
    prompt, role markers)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        prompt = example.prompt if isinstance(example.prompt, list) else [{"role": "user", "content": example.prompt}]
        completion = example.completion if isinstance(example.completion, list) else [
            {"role": "assistant", "content": example.completion}]
        try:
            p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        except Exception as e:  # a template that refuses this row (roles out of order, say)
            raise UserError(f"{example.where}: the tokenizer's chat template fails on this row "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not full.startswith(p):
            raise UserError(f"{example.where}: the tokenizer's chat template renders the prompt differently "
                            "alone and with its completion; set model.use_chat_template=false")
        return p, full[len(p):], template_header(tokenizer, prompt, p)
    bos = tokenizer.bos_token or ""
    return bos + _flatten(example.prompt), _flatten(example.completion) + (tokenizer.eos_token or ""), len(bos)


HEADER_SENTINEL = "KTOCLIHEADERSENTINEL"


def template_header(tokenizer, prompt: list, rendered: str) -> int:
    """Characters the chat template puts before the first message's content (BOS, a default system
    prompt, role markers): found by rendering a sentinel in its place, since templates may reformat
    content (trim it, say). 0 when the template does not render the same text before it."""
    if not prompt:
        return 0
    probe = tokenizer.apply_chat_template([{**prompt[0], "content": HEADER_SENTINEL}] + prompt[1:], tokenize=False,
                                          add_generation_prompt=True)
    at = probe.find(HEADER_SENTINEL)
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
             kl_block: int = 1) -> Split:
    rendered = [render(e, tokenizer, use_chat_template) for e in examples]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids, completion_ids = enc([p for p, _, _ in rendered]), enc([c for _, c, _ in rendered])
    for e, c in zip(examples, completion_ids):
        if not c:
            raise UserError(f"{e.where}: the completion has no tokens")
    heads = header_tokens(tokenizer, [p for p, _, _ in rendered], [h for _, _, h in rendered], prompt_ids)
    if cfg.kl_partners == KLPartners.rotate:
        partners = rotated_partners(len(examples), kl_block)
    else:
        partners = kl_partners([hashlib.sha1(repr(p).encode()).hexdigest() for p in prompt_ids], seed)
    return Split(examples, prompt_ids, completion_ids, partners, cfg.max_length, cfg.max_prompt_length, heads)


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

def build_splits(cfg: DatasetConfig, tokenizer, use_chat_template: bool, kl_block: int = 1) -> tuple:
    """(train Split, eval Split or None, report dict). The eval split keeps both sides of each
    pair (and is never subsampled), so held-out accuracy compares chosen with rejected.
    kl_block: the block size of dataset.kl_partners=rotate (TRL's per-device batch)."""
    seed = 0 if cfg.seed is None else cfg.seed  # a run fills it from its top-level seed
    train, skipped = examples_from(training_rows(cfg), cfg.skip_bad_rows)
    evals = []
    if cfg.eval:
        evals, skipped_eval = load_examples(cfg.eval, cfg.eval_split, cfg.skip_bad_rows, cfg.max_eval_rows, column_map(cfg.columns))
        skipped += skipped_eval
    elif cfg.eval_fraction > 0:
        train, evals = hold_out(train, cfg.eval_fraction, seed)
    if cfg.pair_by_prompt:
        train, evals = pair_by_prompt(train), pair_by_prompt(evals)
    if cfg.unpair == UnpairMode.one:
        train = unpair_one(train, seed)
    train = subsample(train, cfg.desirable_fraction, cfg.undesirable_fraction, seed)
    if not train:
        raise UserError(f"{cfg.train}: no training examples left after subsampling")
    report = {"train": len(train), "eval": len(evals), "skipped_rows": skipped,
              "desirable": sum(e.desirable for e in train), "undesirable": sum(not e.desirable for e in train)}
    train_split = tokenize(train, tokenizer, use_chat_template, cfg, seed, kl_block)
    eval_split = tokenize(evals, tokenizer, use_chat_template, cfg, seed + 1, kl_block) if evals else None
    for name, split in (("training", train_split), ("held-out", eval_split)):
        report.update(count_truncated(split, name) if split is not None else {})
    return train_split, eval_split, report


def count_truncated(split: Split, name: str) -> dict:
    """How many prompts and completions truncation cuts (a warning line when any)."""
    prompts = sum(len(p) > split.max_prompt_length for p in split.prompt_ids)
    completions = sum(min(len(p), split.max_prompt_length) + len(c) > split.max_length
                      for p, c in zip(split.prompt_ids, split.completion_ids))
    if prompts or completions:
        log.warning("%d of %d %s prompts are longer than dataset.max_prompt_length=%d tokens (their start and end "
                    "are kept) and %d completions are cut at dataset.max_length=%d", prompts, len(split), name,
                    split.max_prompt_length, completions, split.max_length)
    return {f"{name}_prompts_cut": prompts, f"{name}_completions_cut": completions} if prompts or completions else {}


def held_out_split(cfg: DatasetConfig, tokenizer, use_chat_template: bool, kl_block: int = 1) -> Optional[Split]:
    """The eval Split alone, as build_splits makes it (None without one): for runs whose training
    data are made later (online rounds)."""
    seed = 0 if cfg.seed is None else cfg.seed
    if cfg.eval:
        evals = load_examples(cfg.eval, cfg.eval_split, cfg.skip_bad_rows, cfg.max_eval_rows, column_map(cfg.columns))[0]
    elif cfg.eval_fraction > 0:
        evals = hold_out(examples_from(training_rows(cfg), cfg.skip_bad_rows)[0], cfg.eval_fraction, seed)[1]
    else:
        return None
    evals = pair_by_prompt(evals) if cfg.pair_by_prompt else evals
    return tokenize(evals, tokenizer, use_chat_template, cfg, seed + 1, kl_block)


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
        trained = examples_from(training_rows(cfg), cfg.skip_bad_rows)[0]
        held = {prompt_key(e.prompt) for e in hold_out(trained, cfg.eval_fraction, seed)[1]}
        examples = [e for e in examples if prompt_key(e.prompt) not in held]
    return tokenize([examples[i] for i in distinct_prompts(examples)], tokenizer, use_chat_template, cfg, seed)

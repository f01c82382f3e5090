"""A data source's examples, tokenised once and kept on disk by content (Arrow, memory-mapped).

The first run reads a source's rows as they stream past (JSON lines by Python's json, keeping each
row's byte offset; large Parquet files through datasets' Arrow reader; other files by the plain
reader), validates, renders and tokenises them a chunk at a time, and writes one Arrow IPC file,
batch by batch: KTO_CLI_CACHE/data/<key>.arrow (and <key>.json: the row count and the bad rows),
where key hashes the file's bytes, the column map, the tokenizer (vocabulary, special tokens, chat
template) and whether the template is used. A later run with the same key maps that file and reads
no row: memory holds a few numbers per example (label, prompt key, lengths), the token ids stay in
the mapping. Truncation is applied when a sequence is taken, so the lengths are not part of the
key. Bad rows are kept with their messages, so a cached run reports (or skips) the same rows as the
first. A row is read back from its source only where its fields are wanted (a verifier's).
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from .config import UserError
from .files import atomic_write

log = logging.getLogger("kto_cli")

VERSION = 1  # of the table's layout and of how rows become tokens: a change makes new keys
ARROW_MIN_BYTES = 1 << 20  # smaller Parquet files: datasets' set-up costs more than it saves
CHUNK = 4096  # rows per record batch
SCHEMA = pa.schema([
    ("row", pa.int64()),  # the row's position in the source (0-based)
    ("line", pa.int64()),  # its number in messages ("row N")
    ("offset", pa.int64()),  # where its line starts in a JSON-lines file (-1: other sources)
    ("desirable", pa.bool_()),
    ("paired", pa.bool_()),  # a side of a paired row (its pair is the row)
    ("prompt", pa.int64()),  # a hash of the prompt's text: equal prompts, equal keys
    ("head", pa.int32()),  # prompt tokens truncation keeps at the start (BOS, template header)
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
])


class Table:
    """One source's examples (a paired row gives two: chosen, then rejected), in row order.
    Per-example fields are numpy arrays; token ids are read from the Arrow batches on demand."""

    def __init__(self, arrow: pa.Table, meta: dict, name: str, key: str, rows: Callable, columns=None, examples=None):
        self.name, self.key, self.n_rows, self.columns = name, key, meta["rows"], columns
        self.bad = {pos: (line, msg) for pos, line, msg in meta["bad"]}  # row position -> (line, message)
        self._rows, self._examples = rows, examples  # raw rows by position (lazy); in-memory Examples
        col = lambda c: arrow.column(c).to_numpy()  # noqa: E731  (copies a few numbers per example)
        self.row, self.prompt, self.head = col("row"), col("prompt"), col("head")
        self._line, self._offset = arrow.column("line"), arrow.column("offset")  # read per row, when wanted
        self.desirable, self.paired = col("desirable").astype(bool), col("paired").astype(bool)
        self._chunks, lengths = [], {"prompt_ids": [], "completion_ids": []}
        for batch in arrow.to_batches():
            parts = []
            for c in ("prompt_ids", "completion_ids"):
                arr = batch.column(c)
                offsets = arr.offsets.to_numpy()
                parts += [offsets, arr.values.to_numpy(zero_copy_only=True)]
                lengths[c].append(np.diff(offsets))
            self._chunks.append(parts)
        self._starts = np.cumsum([0] + [b.num_rows for b in arrow.to_batches()])[:-1]
        join = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        self.prompt_len, self.completion_len = join(lengths["prompt_ids"]), join(lengths["completion_ids"])

    def __len__(self):
        return len(self.row)

    def _ids(self, j: int, part: int) -> list:
        k = int(np.searchsorted(self._starts, j, side="right")) - 1
        offsets, values = self._chunks[k][2 * part], self._chunks[k][2 * part + 1]
        local = j - self._starts[k]
        return values[offsets[local]:offsets[local + 1]].tolist()

    def prompt_ids(self, j: int) -> list:
        return self._ids(j, 0)

    def completion_ids(self, j: int) -> list:
        return self._ids(j, 1)

    def where(self, j: int) -> str:
        return f"{self.name}: row {self._line[j].as_py()}"

    def example(self, j: int):
        """Example j with its texts and row, from the source's row (read on first use)."""
        if self._examples is not None:
            return self._examples[j]
        from .data import mapped, row_to_examples
        where, pos = self.where(j), int(self.row[j])
        sides = row_to_examples(mapped(self._rows(pos, self._offset[j].as_py()), where, self.columns), where, pos)
        return sides[0] if len(sides) == 1 or self.desirable[j] else sides[1]


# ---------------------------------------------------------------- keys

def file_digest(path: str) -> str:
    """sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """What decides how text becomes tokens: the tokenizer's full definition (vocabulary, merges,
    normalisation, added tokens), its BOS/EOS and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                         str(getattr(tokenizer, "chat_template", None))]).encode())
    return h.hexdigest()


def table_key(content: str, columns: Optional[dict], tokenizer, use_chat_template: bool) -> str:
    parts = [VERSION, content, sorted((columns or {}).items()), tokenizer_digest(tokenizer), use_chat_template]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def prompt_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------- building

def open_table(spec: str, split: str, columns: Optional[dict], tokenizer, use_chat_template: bool,
               cache_dir: Optional[Path]) -> Table:
    """The source's Table: mapped from cache_dir when a run made it before, else built (and stored
    there, unless cache_dir is None)."""
    from .data import resolve_source
    path = resolve_source(spec)
    source = local_source(path) if local_file(path) else hub_source(spec, split)
    name, content = source["name"], source["content"]
    key = table_key(content, columns, tokenizer, use_chat_template)
    file = cache_dir / f"{key}.arrow" if cache_dir is not None else None
    if file is not None and file.is_file():
        try:
            table = mapped_table(file, name, key, source["rows"], columns)
            touch(file)
            return table
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            log.warning("data cache: %s unreadable (%s); tokenising %s again", file, e, name)
    if file is not None:
        try:
            store(file, lambda emit: build(source["read"](), name, columns, tokenizer, use_chat_template, emit))
            return mapped_table(file, name, key, source["rows"], columns)
        except OSError as e:
            log.warning("data cache: could not write %s (%s); the tokenised data stay in memory", file, e)
    batches = []
    meta = build(source["read"](), name, columns, tokenizer, use_chat_template, batches.append)
    return Table(pa.Table.from_batches(batches, SCHEMA), meta, name, key, source["rows"], columns)


def store(file: Path, build_into: Callable) -> None:
    """Writes the table as it is built, batch by batch, to a temp file; its meta (JSON) beside it;
    then renames the table into place, so an entry is whole or absent."""
    tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            meta = build_into(writer.write_batch)
        atomic_write(file.with_suffix(".json"), lambda t: t.write_text(json.dumps(meta)))
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def local_file(path: str) -> bool:
    from .data import FILE_SUFFIXES
    if Path(path).suffix.lower() in FILE_SUFFIXES or Path(path).exists():
        if Path(path).is_dir():
            raise UserError(f"{path}: a directory, not a data file (give a .jsonl, .json, .parquet or .csv file)")
        if not Path(path).is_file():
            raise UserError(f"{path}: no such data file")
        if Path(path).suffix.lower() not in FILE_SUFFIXES:
            raise UserError(f"{path}: unknown data file type '{Path(path).suffix.lower()}' "
                            "(use .jsonl, .json, .parquet or .csv)")
        return True
    return False


def local_source(path: str) -> dict:
    """A local file: its content key and its rows, as (row number, row, byte offset). JSON lines are
    parsed by Python's json as they stream past, each row's offset kept to read it back: exact values,
    where Arrow's JSON reader would make "2024-01-15" a timestamp and a column of 4 and 4.5 floats.
    A Parquet file of ARROW_MIN_BYTES or more goes through datasets' Arrow reader (memory-mapped, its
    copy in KTO_CLI_CACHE/arrow/ keyed by the file's content); .json, .csv and small Parquet files through the plain reader."""
    from .data import iter_jsonl, read_rows
    digest, suffix, state = file_digest(path), Path(path).suffix.lower(), {}

    def dataset():
        if not state:
            large = suffix == ".parquet" and os.path.getsize(path) >= ARROW_MIN_BYTES
            state["ds"] = arrow_dataset(path, digest) if large else None
            if state["ds"] is None and suffix != ".jsonl":
                state["plain"] = read_rows(path, "train")[1]
        return state["ds"]

    def read():
        if suffix == ".jsonl":
            return iter_jsonl(path)
        ds = dataset()
        return arrow_iter(ds) if ds is not None else ((n, row, -1) for n, row in state["plain"])

    def row(pos: int, offset: int):
        if suffix == ".jsonl":
            return jsonl_row(path, offset)
        ds = dataset()
        return plain_row(ds[pos]) if ds is not None else state["plain"][pos][1]

    return {"name": path, "content": f"file:{digest}:{suffix}", "read": read, "rows": row}


def jsonl_row(path: str, offset: int) -> Any:
    """The row whose line starts at byte `offset` of a JSON-lines file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline())


def hub_source(spec: str, split: str) -> dict:
    """A dataset from the hub (or datasets' own cache): keyed by datasets' fingerprint of its Arrow data."""
    import datasets
    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001  (whatever the hub or the network says, in one line)
        raise UserError(f"could not load dataset '{spec}' split '{split}': {str(e).splitlines()[0] if str(e) else e!r} "
                        f"(no file of that name exists either; this machine may be offline)") from None
    return {"name": f"{spec}[{split}]", "content": f"hub:{spec}:{split}:{ds._fingerprint}",
            "read": lambda: arrow_iter(ds), "rows": lambda pos, offset: plain_row(ds[pos])}


def arrow_dataset(path: str, digest: str):
    """A Parquet file as a memory-mapped datasets.Dataset (None where datasets cannot read it: the
    plain reader then says why). Its Arrow copy is kept under the file's content hash, so a file
    replaced under the same name and modification time is not mistaken for the old one."""
    import datasets
    from .models import cache_root
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset("parquet", data_files=path, split="train",
                                     cache_dir=str(cache_root() / "arrow" / digest[:16]))
    except Exception as e:  # noqa: BLE001  (any reader failure: the plain reader gives the error in one line)
        log.info("%s: read by the plain reader (datasets: %s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def arrow_iter(ds):
    for start in range(0, len(ds), CHUNK):
        batch = ds[start:start + CHUNK]
        names = list(batch)
        for k in range(len(batch[names[0]]) if names else 0):
            yield start + k + 1, plain_row({c: batch[c][k] for c in names}), -1


def plain_row(row: dict) -> dict:
    """A row as the file holds it: Arrow gives every row every column, None where it has none."""
    return {k: v for k, v in row.items() if v is not None}


def build(rows, name: str, columns: Optional[dict], tokenizer, use_chat_template: bool, emit: Callable) -> dict:
    """Reads, validates, renders and tokenises a source's (row number, row, byte offset) a chunk at a
    time, handing each chunk's record batch to emit; returns the meta: the number of rows and the
    bad ones with their messages."""
    renderer = Renderer(tokenizer, use_chat_template)
    bad, pos = [], 0
    while True:
        chunk = [(pos + k, line, row, offset) for k, (line, row, offset) in zip(range(CHUNK), rows)]
        if not chunk:
            break
        pos += len(chunk)
        batch, failed = tokenise_rows(chunk, name, columns, renderer, tokenizer)
        emit(batch)
        bad += failed
    return {"rows": pos, "bad": bad}


def tokenise_rows(chunk: list, name: str, columns: Optional[dict], renderer, tokenizer) -> tuple:
    """(record batch, [[position, line, message]] of bad rows) of [(position, line, row, offset)]."""
    from .data import mapped, row_to_examples
    examples, bad = [], []
    for pos, line, row, offset in chunk:
        where = f"{name}: row {line}"
        try:
            sides = row_to_examples(mapped(row, where, columns), where, pos)
            examples.append((pos, line, offset, sides, [renderer(e) for e in sides]))
        except UserError as e:
            bad.append([pos, line, relative(str(e), where)])
    flat = [(pos, line, offset, e, r) for pos, line, offset, sides, rendered in examples for e, r in zip(sides, rendered)]
    batch, empty = tokenise(flat, tokenizer)
    for pos, line in sorted(empty):
        bad.append([pos, line, "the completion has no tokens"])
    return batch, sorted(bad)


def tokenise(flat: list, tokenizer) -> tuple:
    """(record batch, {(position, line)} of rows with an empty completion) of
    [(position, line, offset, Example, rendered)]: rows with an empty completion are left out whole. Each
    distinct prompt text is tokenised once (a pair's sides share theirs)."""
    from .data import header_tokens, prompt_key
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
    texts = list(dict.fromkeys(r[0] for *_, r in flat))
    heads_of = {r[0]: r[2] for *_, r in flat}
    ids = enc(texts)
    heads = dict(zip(texts, header_tokens(tokenizer, texts, [heads_of[t] for t in texts], ids)))
    ids = dict(zip(texts, ids))
    completions = enc([r[1] for *_, r in flat])
    empty = {(pos, line) for (pos, line, *_), c in zip(flat, completions) if not c}
    keep = [k for k, (pos, line, *_) in enumerate(flat) if (pos, line) not in empty]
    cols = {
        "row": [flat[k][0] for k in keep], "line": [flat[k][1] for k in keep], "offset": [flat[k][2] for k in keep],
        "desirable": [flat[k][3].desirable for k in keep], "paired": [flat[k][3].pair_id is not None for k in keep],
        "prompt": [prompt_hash(prompt_key(flat[k][3].prompt)) for k in keep],
        "head": [heads[flat[k][4][0]] for k in keep],
        "prompt_ids": [ids[flat[k][4][0]] for k in keep], "completion_ids": [completions[k] for k in keep],
    }
    return pa.record_batch([pa.array(cols[f.name], f.type) for f in SCHEMA], schema=SCHEMA), empty


def cached_array(folder: Optional[Path], kind: str, inputs: list, compute: Callable) -> np.ndarray:
    """compute(), kept in folder under a hash of its inputs (bytes) and read back by a later run
    (numpy's own format, no pickles). folder None: computed, not kept."""
    if folder is None:
        return compute()
    h = hashlib.sha256(f"{VERSION}:{kind}".encode())
    for part in inputs:
        h.update(hashlib.sha256(part).digest())
    file = folder / f"{kind}-{h.hexdigest()[:32]}.npy"
    if file.is_file():
        try:
            out = np.load(file, allow_pickle=False)
            touch(file)
            return out
        except (OSError, ValueError) as e:
            log.warning("data cache: %s unreadable (%s); computing it again", file, e)
    out = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda tmp: save_array(tmp, out))
    except OSError as e:
        log.warning("data cache: could not write %s (%s)", file, e)
    return out


def relative(message: str, where: str) -> str:
    """A row's message without its 'file: row N: ' start (a cached table may be read under another name)."""
    return message[len(where) + 2:] if message.startswith(where + ": ") else message


class Renderer:
    """data.render with what repeats memoised: the prompt of a pair's second side, and the
    template's header by the prompt's roles (checked against each row's own rendering)."""

    def __init__(self, tokenizer, use_chat_template: bool):
        self.tokenizer, self.use_chat_template = tokenizer, use_chat_template
        self.prompts, self.headers = {}, {}

    def __call__(self, example) -> tuple:
        from .data import render
        return render(example, self.tokenizer, self.use_chat_template, self)


def touch(file: Path) -> None:
    """Marks a cached file as used now (kto-cache prune --older-than keeps it)."""
    try:
        os.utime(file)
    except OSError:
        pass


def save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def mapped_table(path: Path, name: str, key: str, rows: Callable, columns: Optional[dict]) -> Table:
    """The table in `path`, memory-mapped, with its meta from the JSON beside it; Arrow's IPC reader
    runs no code from the file."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.schema != SCHEMA:
        raise ValueError("another layout")
    meta = json.loads(path.with_suffix(".json").read_text())
    return Table(reader.read_all(), meta, name, key, rows, columns)


def table_of_examples(examples: list, tokenizer, use_chat_template: bool, name: str) -> Table:
    """A Table held in memory of Examples made in this run (online prompts, tests)."""
    renderer = Renderer(tokenizer, use_chat_template)
    flat = [(k, k + 1, -1, e, renderer(e)) for k, e in enumerate(examples)]
    batch, empty = tokenise(flat, tokenizer)
    if empty:
        pos = min(empty)[0]
        raise UserError(f"{examples[pos].where}: the completion has no tokens")
    table = Table(pa.Table.from_batches([batch], SCHEMA), {"rows": len(examples), "bad": []}, name, "", None, None, examples)
    table.key = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for part in table._chunks for v in part)
                               + table.desirable.tobytes()).hexdigest()[:32]
    return table

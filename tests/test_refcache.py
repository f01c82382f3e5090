"""The shared reference cache: reuse by content, invalidation, damage, concurrent writers, precompute."""
import multiprocessing as mp
import os
import re
import time
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kto_cli import reference
from kto_cli.refcache import RefCache, sequence_key
from kto_cli.train import train

from conftest import TINY_RUN, make_config

# 12 pairs = 24 examples; 6 steps of 4 visit every one of them.
BASE = [*TINY_RUN, "dataset.max_train_rows=12", "dataset.max_eval_rows=4"]
FIRST = [*BASE, "trainer.max_steps=6", "trainer.batch_size=4", "trainer.micro_batch_size=4"]


@pytest.fixture
def compute_calls(monkeypatch):
    """Counts the reference model's forward passes over sequences (0: the model was never asked)."""
    calls = []
    real = reference.logps_of
    monkeypatch.setattr(reference, "logps_of", lambda model, seqs, *a, **k: calls.append(len(seqs)) or real(model, seqs, *a, **k))
    return calls


def ref_values(run_dir):
    return load_file(str(run_dir / "reference_logps.safetensors"))


@pytest.mark.slow
def test_other_beta_batch_and_shuffle_reuse_bit_identical_values(tmp_path, compute_calls):
    train(make_config(*FIRST), tmp_path / "a")
    assert 0 < sum(compute_calls) <= 24 * 2 + 8 * 2  # train + KL, eval + KL; a repeated sequence once
    compute_calls.clear()
    train(make_config(*BASE, "loss.beta=0.3", "trainer.seed=7", "trainer.batch_size=2", "trainer.micro_batch_size=1",
                      "trainer.max_steps=12"), tmp_path / "b")
    assert compute_calls == []  # nothing computed: the reference model was never run
    a, b = ref_values(tmp_path / "a"), ref_values(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0)), k


@pytest.mark.slow
@pytest.mark.parametrize("change", [["model.tiny.seed=1"], ["model.use_chat_template=false"],
                                    ["dataset.max_length=40", "dataset.max_prompt_length=30"],
                                    ["trainer.precision=bf16"]])
def test_changes_that_alter_the_numbers_invalidate(tmp_path, compute_calls, change):
    train(make_config(*FIRST), tmp_path / "a")
    compute_calls.clear()
    train(make_config(*FIRST, *change), tmp_path / "b")
    assert sum(compute_calls) > 0


@pytest.mark.slow
def test_new_data_computes_only_what_is_missing(tmp_path, compute_calls):
    train(make_config(*FIRST), tmp_path / "a")
    compute_calls.clear()
    train(make_config(*FIRST, "dataset.max_train_rows=14", "trainer.max_steps=7"), tmp_path / "b")
    # 2 new pairs = 4 new examples; the 24 old examples come from the cache. The KL partners are a
    # derangement of the new dataset, so KL sequences are mostly new too (28 at most).
    assert 4 <= sum(compute_calls) <= 4 + 28


@pytest.mark.slow
def test_damaged_shard_is_set_aside_and_recomputed(tmp_path, own_cache, compute_calls):
    train(make_config(*FIRST), tmp_path / "a")
    first = sum(compute_calls)
    (shard,) = list(own_cache.rglob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    compute_calls.clear()
    train(make_config(*FIRST), tmp_path / "b")
    assert sum(compute_calls) == first
    assert list(own_cache.rglob("*.corrupt-*"))
    a, b = ref_values(tmp_path / "a"), ref_values(tmp_path / "b")
    torch.testing.assert_close(a["train"], b["train"], equal_nan=True)
    # a shard whose bytes were changed in place fails its checksum
    (shard,) = [p for p in own_cache.rglob("*.safetensors")]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = RefCache(shard.parent.parent.parent, shard.parent.parent.name, False, True)
    assert cache.corrupt == 0  # a start reads only the keys
    cache.load_all()
    assert cache.corrupt == 1 and cache.where == {}


def _write(root, barrier, values):
    cache = RefCache(root, "model", per_token=False, writable=True)
    keys = [sequence_key([1, 2], [i]) for i in range(len(values))]
    barrier.wait()
    cache.put(keys, torch.tensor(values))


@pytest.mark.distributed
def test_two_processes_writing_the_same_entry_leave_one_valid_file(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write, args=(tmp_path, barrier, [0.5, -1.25, 3.0])) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    files = list((tmp_path / "model" / "seq").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    cache = RefCache(tmp_path, "model", per_token=False, writable=False)
    assert cache.corrupt == 0 and cache.get(sequence_key([1, 2], [1]))[0] == -1.25


def test_per_token_values_round_trip(tmp_path):
    cache = RefCache(tmp_path, "m", per_token=True, writable=True)
    keys = [sequence_key([1], [2, 3]), sequence_key([1], [4])]
    cache.put(keys, torch.tensor([-3.0, -1.0]), [torch.tensor([-1.0, -2.0]), torch.tensor([-1.0])])
    again = RefCache(tmp_path, "m", per_token=True, writable=False)
    assert again.get(keys[0])[1].tolist() == [-1.0, -2.0] and again.get(keys[1])[0] == -1.0


@pytest.mark.distributed
def test_precompute_in_two_processes_then_train_computes_nothing(tmp_path, own_cache, compute_calls):
    exe = Path(sys.executable).parent / "kto-precompute"
    args = [str(exe), *BASE, f"hydra.run.dir={tmp_path / 'pre'}"]
    procs = [subprocess.Popen(args, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(list(own_cache.rglob("*.safetensors"))) == 2  # one shard per process
    train(make_config(*FIRST), tmp_path / "a")
    assert compute_calls == []


def test_a_precompute_process_that_starts_after_the_other_finished_still_computes_its_share(
        tmp_path, monkeypatch, compute_calls):
    """The split by process must not depend on what the cache held when each looked: here process 1
    has stored its share before process 0 starts (a slow start under load), and training then finds
    every value."""
    from kto_cli.precompute import precompute
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        done.append(precompute(make_config(*BASE))["computed"])
    monkeypatch.delenv("RANK"), monkeypatch.delenv("WORLD_SIZE")
    compute_calls.clear()
    train(make_config(*FIRST), tmp_path / "a")
    assert compute_calls == [] and min(done) > 0 and sum(done) <= 24 * 2 + 8 * 2


def test_the_key_changes_with_the_log_prob_code(monkeypatch):
    """A fix that changes the numbers raises models.LOGPROBS_VERSION, so values computed by the older
    code (e.g. eager attention before its mask was fixed) are not reused."""
    from kto_cli import models
    cfg = make_config(*BASE).model
    before = models.model_key(cfg, 259, "fp32")
    monkeypatch.setattr(models, "LOGPROBS_VERSION", "logprobs-next")
    assert models.model_key(cfg, 259, "fp32") != before


# ---------------------------------------------------------------- faults: the cache is an optimisation

def fill(disk: Path) -> None:
    """Leaves no free byte on the disk."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_cache_disk_is_a_warning_and_the_run_goes_on(tmp_path, small_disk, caplog, fault):
    """The values that cannot be stored stay in memory: the run equals one without a cache, and no
    temp file is left behind."""
    import logging
    train(make_config(*FIRST, "reference.cache=off"), tmp_path / "plain")
    disk = small_disk(64 * 1024, read_only=fault == "read-only")
    if fault == "full":
        fill(disk)
    with caplog.at_level(logging.WARNING, logger="kto_cli"):
        train(make_config(*FIRST, f"reference.cache_dir={disk}"), tmp_path / "run")
    assert "reference cache: could not" in caplog.text and "going on without" in caplog.text
    torch.testing.assert_close(ref_values(tmp_path / "plain")["train"], ref_values(tmp_path / "run")["train"],
                               equal_nan=True)
    assert not [p for p in disk.rglob("*") if ".tmp-" in p.name]
    if fault == "read-only":  # reading only: nothing to write, nothing to warn about but the lock-free look
        caplog.clear()
        train(make_config(*FIRST, f"reference.cache_dir={disk}", "reference.cache=read"), tmp_path / "read")


def test_a_shard_another_run_set_aside_first_is_skipped(tmp_path):
    """Two runs find the same damaged shard: the second finds it gone when it reads or moves it."""
    cache = RefCache(tmp_path, "model", per_token=False, writable=True)
    path = cache.put([sequence_key([1], [2])], torch.tensor([0.5]))
    path.write_bytes(path.read_bytes()[:-10])
    second = RefCache.__new__(RefCache)
    second.__dict__.update(entries={}, where={}, corrupt=0, read=set(), dir=cache.dir, per_token=False)
    RefCache(tmp_path, "model", per_token=False, writable=True)  # the first run sets it aside
    second._read(path)  # the second listed it before that
    assert second.corrupt == 0 and second.entries == {} and len(list(cache.dir.glob("*.corrupt-*"))) == 1


def test_the_lock_names_its_holder_and_lock_wait_stops_the_wait(tmp_path, caplog, monkeypatch):
    """A run waiting on another's lock says for whom; past reference.lock_wait it computes itself."""
    import fcntl
    import logging
    from kto_cli import refcache
    cache = RefCache(tmp_path, "model", per_token=False, writable=True, lock_wait=2.5)
    with cache.computing():
        holder = (cache.dir / ".computing.lock").read_text()
    assert holder.startswith(f"{os.uname().nodename}:{os.getpid()} (job ")
    monkeypatch.setattr(refcache, "WAIT_LINE_S", 1)
    with open(cache.dir / ".computing.lock", "r+") as other:  # another open file: a second holder for flock
        fcntl.flock(other, fcntl.LOCK_EX)
        other.seek(0), other.truncate(), other.write("node9:4242 (job 77)\n"), other.flush()
        with caplog.at_level(logging.INFO, logger="kto_cli"), cache.computing():
            pass
    assert re.search(r"waiting \d s for node9:4242 \(job 77\)", caplog.text)
    assert "stopped waiting for node9:4242 (job 77) after" in caplog.text


@pytest.mark.slow
def test_a_signal_in_the_reference_pass_keeps_its_pieces_and_the_resumed_run_computes_the_rest(
        tmp_path, monkeypatch, compute_calls):
    """Pieces of 8 sequences: SIGUSR1 while the second piece runs stops the job once it is stored
    (16 values in the cache); resumed, the job computes only the others and trains as a job nobody
    stopped."""
    import signal
    from kto_cli.metrics import read_metrics
    from kto_cli.preemption import Preempted
    train(make_config(*FIRST, "reference.cache=off"), tmp_path / "plain")
    everything = sum(compute_calls)
    compute_calls.clear()
    monkeypatch.setattr(reference, "PIECE", 8)
    real, pieces = reference.logps_of, []  # the fixture's counting one

    def signalled(model, seqs, *a, **k):
        pieces.append(1)
        if len(pieces) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(model, seqs, *a, **k)
    monkeypatch.setattr(reference, "logps_of", signalled)
    with pytest.raises(Preempted, match=r"in the reference pass, 16 of \d+ values computed \(stored in the reference cache\)"):
        train(make_config(*FIRST), tmp_path / "run")
    compute_calls.clear()
    train(make_config(*FIRST, "trainer.resume=auto"), tmp_path / "run")
    assert sum(compute_calls) == everything - 16
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "plain", "train")}
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run", "train")} == pytest.approx(want, abs=1e-6)


def test_kto_cache_du_verify_and_prune(tmp_path, capsys):
    """du sizes each model's values; verify sets a damaged shard aside; prune removes dead writes'
    temp files and set-aside shards (not a live write's), and with --older-than the values of models
    no run used for that long (not one whose lock a run holds)."""
    from kto_cli import cachetool
    root = tmp_path / "cache"
    for key in ("model-a", "model-b"):
        RefCache(root / "reference", key, False, True).put([sequence_key([1], [k]) for k in range(3)], torch.tensor([0.1, 0.2, 0.3]))
    shard = next((root / "reference" / "model-a" / "seq").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])
    dead, live = shard.with_name("x.safetensors.tmp-1"), shard.with_name("y.safetensors.tmp-2")
    dead.write_bytes(b"0"), live.write_bytes(b"0")
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    cachetool.main(["du", "--dir", str(root)])
    out = capsys.readouterr().out
    assert re.search(r"model-a/seq\s+1\s", out) and "temp files: 2, set-aside damaged shards: 0" in out
    cachetool.main(["verify", "--dir", str(root)])
    assert "model-a/seq: 0 values, 1 damaged shard(s) set aside" in capsys.readouterr().out
    cachetool.main(["prune", "--dir", str(root)])
    assert "removed 2 item(s)" in capsys.readouterr().out and live.exists() and not dead.exists()
    old = root / "reference" / "model-b" / "seq"
    os.utime(old / ".last-used", (time.time() - 40 * 86400,) * 2)
    cachetool.main(["prune", "--dir", str(root), "--older-than", "30", "--dry-run"])
    assert f"would remove {old}" in capsys.readouterr().out and old.exists()
    cachetool.main(["prune", "--dir", str(root), "--older-than", "30"])
    assert not old.exists() and (root / "reference" / "model-a" / "seq").exists()


def test_a_start_reads_only_the_keys_and_a_look_up_only_its_shard(tmp_path, monkeypatch):
    """Two shards of one model: opening the cache reads no values; looking a key up reads (and
    checks) only the shard holding it."""
    from kto_cli import refcache
    a = RefCache(tmp_path, "model", False, True)
    a.put([sequence_key([1], [k]) for k in range(3)], torch.tensor([0.5, 1.5, 2.5]))
    a.put([sequence_key([2], [k]) for k in range(3)], torch.tensor([-0.5, -1.5, -2.5]))
    loaded = []
    real = refcache.load_file
    monkeypatch.setattr(refcache, "load_file", lambda path: loaded.append(Path(path).name) or real(path))
    b = RefCache(tmp_path, "model", False, True)
    assert loaded == [] and len(b.where) == 6
    assert b.get(sequence_key([2], [1]))[0] == -1.5 and len(loaded) == 1
    assert b.get(sequence_key([2], [2]))[0] == -2.5 and len(loaded) == 1
    assert b.get(sequence_key([9], [9])) is None and len(loaded) == 1

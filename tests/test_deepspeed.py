"""kto-train under DeepSpeed ZeRO for real: two CPU processes (DS_ACCELERATOR=cpu) launched by
torchrun and by the deepspeed launcher, on the tiny model. The first start on a machine compiles
DeepSpeed's CPU ops (~2 min, cached in ~/.cache/torch_extensions); later starts take ~15 s.

Two ranks with micro-batches of 2 compute what one process with micro-batches of 4 computes
(train.Trainer.optimizer_step), KTO's KL estimate, SFT's token normalisation and PPO's advantage
whitening included, so the losses must match."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from kto_cli.metrics import read_metrics

from conftest import TINY_RUN, free_port, make_config
from slurm_cluster import run_under_slurm_by

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

COMMON = [*TINY_RUN, "trainer.lr=1e-3", "trainer.warmup_ratio=0",
          "trainer.schedule=linear", "trainer.batch_size=8", "dataset.max_train_rows=16", "dataset.max_eval_rows=8"]


# The runs compared in test_two_ranks_match_one_process have a NaN loss on rank 0 at step 2: every
# rank skips that update (ZeRO-1/2 and ZeRO-3 through the engine's overflow check, stage 0 through
# kto-cli's own), as one process does, and the steps after it still match.
NAN_AT = {"KTO_CLI_INJECT_NAN": "2"}


def launch(run_dir, *overrides, launcher="torchrun", timeout=600, env=None):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    if launcher == "torchrun":
        cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python", "kto-train"]
    else:  # the deepspeed launcher appends --local_rank=N to the command line
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), shutil.which("kto-train")]
    out = subprocess.run(cmd + [*COMMON, *overrides, f"hydra.run.dir={run_dir}"], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def train_losses(run_dir) -> dict:
    return {r["step"]: (r["loss"], r.get("kl")) for r in read_metrics(run_dir, "train")}


def final_eval(run_dir) -> dict:
    return read_metrics(run_dir, "eval")[-1]


def one_process(run_dir, *overrides, env=None) -> tuple:
    """One plain PyTorch process, micro-batches of 4."""
    from kto_cli.train import train
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KTO_CLI_CACHE", str(run_dir / "cache"))
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        train(make_config(*COMMON, "trainer.max_steps=4", "trainer.micro_batch_size=4", *overrides), run_dir)
    return train_losses(run_dir), final_eval(run_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return one_process(tmp_path_factory.mktemp("single"), env=NAN_AT)


@pytest.mark.parametrize("stage", ["zero0"])  # ZeRO-2: the lock-wait test; ZeRO-3: the resume test below
def test_two_ranks_match_one_process(tmp_path, single, stage):
    launch(tmp_path, f"deepspeed={stage}", "trainer.max_steps=4", "trainer.micro_batch_size=2", env=NAN_AT)
    check_two_ranks(tmp_path, single, stage)


PACKED_BY_BLOCKS = ["trainer.kl_prefix=false", "trainer.packing=true", "trainer.attention_blocks=0"]


@pytest.mark.parametrize("stage,layout", [("zero2", []), ("zero3", PACKED_BY_BLOCKS)])
def test_gradient_checkpointing_under_zero_matches_one_process(tmp_path, single, stage, layout):
    """Activations recomputed in the backward (under ZeRO-3 with the parameters gathered again):
    the numbers of one process without it, for the default layout (KTO's KL sequences on the
    prompt's cache, the rows' forward run again in the backward) and for packed shared-prompt rows
    by blocks."""
    launch(tmp_path, f"deepspeed={stage}", "trainer.max_steps=4", "trainer.micro_batch_size=2",
           "trainer.gradient_checkpointing=true", *layout, env=NAN_AT)
    check_two_ranks(tmp_path, single, stage)


def check_two_ranks(tmp_path, single, stage):
    got = train_losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path, "train") if "skipped" in r] == [2] and single[0][2][0] != single[0][2][0]
    for step, (loss, kl) in single[0].items():
        assert got[step][0] == pytest.approx(loss, abs=2e-5, nan_ok=True), (stage, step)
        assert got[step][1] == pytest.approx(kl, abs=2e-5), (stage, step)
    evaluated = final_eval(tmp_path)  # every rank evaluates the whole held-out split after step 4
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/accuracies", "gen/score", "gen/length"):
        assert evaluated[key] == pytest.approx(single[1][key], abs=2e-5), key
    assert not list(tmp_path.glob("kto-train-rank*")) and (tmp_path / "final" / "config.json").is_file()
    assert len(read_metrics(tmp_path)) == 4 + 2  # rank 0 alone wrote it
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2 * 8  # rank 0 alone, before and after


@pytest.mark.parametrize("loss", ["ppo"])  # sft: the SFT phase of the test below
def test_token_normalised_losses_over_two_ranks_match_one_process(tmp_path, loss):
    """ppo whitens advantages over both ranks' micro-batches and divides its token means by both
    ranks' token counts (sft's division, by the tokens of both, is the SFT phase's in the test below)."""
    expect, _ = one_process(tmp_path / "single", f"loss={loss}")
    launch(tmp_path / "two", "deepspeed=zero2", f"loss={loss}", "trainer.max_steps=4", "trainer.micro_batch_size=2")
    got = train_losses(tmp_path / "two")
    for step, (value, _) in expect.items():
        assert got[step][0] == pytest.approx(value, abs=2e-5), (loss, step)


def test_lora_under_zero3_matches_one_process(tmp_path):
    """LoRA adapters sharded by ZeRO-3 over two ranks (the reference pass with the adapters off, in
    step on both ranks): the losses and the merged final/ are one process's."""
    from safetensors.torch import load_file
    lora = ["model.lora.r=4", "eval.generation.max_new_tokens=4"]
    expect, _ = one_process(tmp_path / "single", *lora)
    launch(tmp_path / "two", "deepspeed=zero3", "trainer.max_steps=4", "trainer.micro_batch_size=2", *lora)
    got = train_losses(tmp_path / "two")
    for step, (loss, kl) in expect.items():
        assert got[step] == pytest.approx((loss, kl), abs=2e-5), step
    merged = [load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("single", "two")]
    assert set(merged[0]) == set(merged[1]) and not any("lora" in k for k in merged[0])
    for k in merged[0]:
        torch.testing.assert_close(merged[1][k], merged[0][k], rtol=0, atol=1e-5)
    assert (tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors").is_file()


@run_under_slurm_by("test_two_srun_tasks_under_zero3_equal_one_process_and_a_dead_rank_loses_only_steps_since_the_checkpoint")
def test_zero3_resume_and_consolidated_final(tmp_path, single):
    """A zero3 run matches one process; interrupted after its step-2 checkpoint and resumed, it logs
    the same losses as the uninterrupted run; final/ holds the engine's weights (check_zero3_final)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["deepspeed=zero3", "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.save_every=2"]
    launch(full, *args, launcher="deepspeed", env=NAN_AT)  # it appends --local_rank=N to the arguments
    check_two_ranks(full, single, "zero3")  # this stage's run of test_two_ranks_match_one_process
    cut.mkdir()
    shutil.copytree(full / "checkpoints" / "step_0000002", cut / "checkpoints" / "step_0000002")
    shutil.copy(full / "reference_logps.safetensors", cut)
    launch(cut, *args, "trainer.resume=auto", env=NAN_AT)
    resumed, uninterrupted = train_losses(cut), train_losses(full)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6)
    check_zero3_final(full, 4)


def check_zero3_final(run_dir, step: int) -> None:
    """final/ of a 2-rank ZeRO-3 run loads in transformers and holds the engine's weights (the fp32
    master weights of its last checkpoint, gathered from both ranks' shards); one process resuming
    that checkpoint is told so in one line, before anything loads."""
    from types import SimpleNamespace

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from kto_cli.checkpoint import load_checkpoint, read_state
    from kto_cli.config import UserError
    last = run_dir / "checkpoints" / f"step_{step:07d}"
    state = read_state(last)
    with pytest.raises(UserError, match=r"written under other settings: processes 2 -> 1\. Resume"):
        load_checkpoint(last, SimpleNamespace(name="deepspeed"), {**state, "world": 1})
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    engine = get_fp32_state_dict_from_zero_checkpoint(str(last), tag="engine")
    engine = {k[len("lm."):]: v for k, v in engine.items()}
    assert set(final) == set(engine)
    for k in final:
        torch.testing.assert_close(final[k], engine[k].to(final[k].dtype), rtol=0, atol=0)


def test_deepspeed_none_refuses_several_processes(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    out = subprocess.run([sys.executable, "-m", "kto_cli.cli", "model=tiny", f"hydra.run.dir={tmp_path}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "deepspeed=none trains in one" in out.stderr


@run_under_slurm_by("test_two_srun_tasks_under_zero3_equal_one_process_and_a_dead_rank_loses_only_steps_since_the_checkpoint")
def test_srun_style_ranks_from_slurm_variables(tmp_path, single):
    """Under srun each task has only SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the node list:
    two such processes (started by hand here, no Slurm) find each other and train as two ranks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    port = free_port(29500, 30500)  # kto-train takes MASTER_PORT = 29500 + job id % 1000 under srun
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_ID=str(port - 29500 + 4000), **NAN_AT)
    cmd = ["kto-train", *COMMON, "deepspeed=zero2", "trainer.max_steps=4", "trainer.micro_batch_size=2",
           f"hydra.run.dir={tmp_path}"]
    procs = [subprocess.Popen(cmd, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    got = train_losses(tmp_path)
    for step, (loss, kl) in single[0].items():
        assert got[step] == pytest.approx((loss, kl), abs=2e-5, nan_ok=True)


def test_sft_phase_and_online_rounds_over_two_ranks_match_one_process(tmp_path):
    """The default job's shape (SFT phase, then KTO on the policy's own labelled answers) in two
    online rounds under ZeRO-2: each rank samples its share of a round's answers, and the answers of
    both rounds and the losses of both phases are one process's."""
    job = ("trainer.sft_steps=2", "online.prompts=4", "online.rounds=2", "online.steps_per_round=2",
           "online.generation.batch_size=8",  # two prompts a batch: each rank makes one batch
           "online.generation.max_new_tokens=200", "verifier=regex", "verifier.pattern='[aeiou]'", "eval.max_prompts=2")
    losses, _ = one_process(tmp_path / "single", *job)
    launch(tmp_path / "two", "deepspeed=zero2", "trainer.max_steps=4", "trainer.micro_batch_size=2", *job)
    for phase in ("sft", "."):
        want, got = train_losses(tmp_path / "single" / phase), train_losses(tmp_path / "two" / phase)
        assert sorted(got) == sorted(want) == ([1, 2] if phase == "sft" else [1, 2, 3, 4])
        assert all(got[s][0] == pytest.approx(want[s][0], abs=2e-5) for s in want), phase
    for r in (1, 2):
        answers = [(p / "rounds" / str(r) / "samples.jsonl").read_text() for p in (tmp_path / "single", tmp_path / "two")]
        assert answers[0] == answers[1] and 0 < len(answers[0].splitlines()) <= 4 * 4


def test_two_ranks_wait_together_on_another_runs_lock_longer_than_the_collective_timeout(tmp_path, single):
    """Another run holds the reference cache's lock for longer than deepspeed.timeout_s: rank 1 waits
    with rank 0 in short collectives (not one long one that would time out); past
    reference.lock_wait the run computes the values itself, and trains as one process does (ZeRO-2:
    this is also that stage's run of test_two_ranks_match_one_process)."""
    import fcntl
    from kto_cli.models import tiny_tokenizer
    from kto_cli.reference import open_cache
    overrides = ["deepspeed=zero2", "trainer.max_steps=4", "trainer.micro_batch_size=2"]
    cache = open_cache(make_config(*COMMON, *overrides), tiny_tokenizer())
    cache.dir.mkdir(parents=True)
    with open(cache.dir / ".computing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("node9:4242 (job 77)\n")
        lock.flush()
        out = launch(tmp_path, *overrides, "deepspeed.timeout_s=8", "reference.lock_wait=16", env=NAN_AT)
    waited = re.search(r"stopped waiting for node9:4242 \(job 77\) after (\d+) s", out.stdout + out.stderr)
    assert waited and 16 <= int(waited.group(1)) <= 30  # checked about once a second: 16 s, or a little more
    check_two_ranks(tmp_path, single, "zero2")

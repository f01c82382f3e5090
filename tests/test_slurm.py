"""The sbatch scripts and the submitit launcher under a real Slurm (a one-node cluster started on
this machine by tests/slurm_cluster.py): a job signalled before its time limit checkpoints,
requeues and ends as an uninterrupted run; two srun tasks under ZeRO-3 equal one process, and when
one of them dies the job ends at once and a resubmitted job continues from the last checkpoint;
`hydra/launcher=slurm` runs a sweep whose points share the reference cache and resume after a
signal or a preemption. Skipped, with the
reason, where no cluster can start (Slurm not installed, not root)."""
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kto_cli.metrics import read_metrics

from slurm_cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "scripts" / "slurm" / "train.sbatch"
ONE_CPU = ["--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]  # two jobs at once on 2 cores

pytestmark = [pytest.mark.subprocess, pytest.mark.skipif(bool(Cluster.unavailable()), reason=str(Cluster.unavailable()))]


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = Cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"the one-node Slurm did not start: {e}")
    yield cluster
    cluster.stop()


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def wait_for(path: Path, lines: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (path.is_file() and len(path.read_text().splitlines()) >= lines):
        assert time.time() < deadline, f"{path} has not {lines} lines after {timeout:.0f} s"
        time.sleep(0.05)


def test_a_signalled_job_checkpoints_requeues_and_ends_as_an_uninterrupted_run(tmp_path, slurm):
    """`scancel --signal=USR1 --batch` (what Slurm sends three minutes before the time limit) reaches
    train.sbatch's shell, which passes it to srun; kto-train writes its checkpoint and exits 75; the
    script requeues the job, which resumes under the same run dir and ends with every step's loss
    equal to a job that ran through."""
    from test_sweep import TINY
    args = [*TINY, "trainer.max_steps=150", "trainer.schedule=constant", "trainer.warmup_ratio=0", "dataset.eval=null"]
    jobs = [slurm.sbatch([*ONE_CPU, f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", TRAIN, *args],
                         env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    signalled, through = jobs
    wait_for(tmp_path / "runs" / signalled / "metrics.jsonl", 3)
    slurm.signal(signalled, "USR1", batch=True)
    ended = {j: slurm.wait(j) for j in jobs}
    out = (tmp_path / f"slurm-{signalled}.out").read_text()
    assert ended[signalled]["JobState"] == "COMPLETED" and ended[signalled]["Restarts"] == "1", out[-3000:]
    assert f"requeueing job {signalled}" in out and "kto-train: stopped on SIGUSR1 after step " in out
    step = int(out.split("kto-train: stopped on SIGUSR1 after step ")[1].split(";")[0])
    assert f"step_{step:07d} at step {step}" in out and step < 150  # the requeued job resumed there
    resumed, uninterrupted = losses(tmp_path / "runs" / signalled), losses(tmp_path / "runs" / through)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 151))
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step
    assert not (tmp_path / "runs" / signalled / "PREEMPTED").exists()


def task_pid(job_id: str, rank: int) -> int:
    """The pid of kto-train in the job's task RANK (found by the variables srun gave it)."""
    want = {f"SLURM_JOB_ID={job_id}", f"SLURM_PROCID={rank}"}
    for proc in Path("/proc").iterdir():
        try:
            env = set((proc / "environ").read_bytes().decode(errors="replace").split("\0"))
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want <= env and any(part.endswith(b"kto-train") for part in cmd[:2]):
            return int(proc.name)
    raise LookupError(f"no kto-train of task {rank} in job {job_id}")


def test_two_srun_tasks_under_zero3_equal_one_process_and_a_dead_rank_loses_only_steps_since_the_checkpoint(
        tmp_path, slurm):
    """Two tasks of one job (ranks from SLURM_PROCID, the rendezvous from the node list) train under
    ZeRO-3 with a NaN at step 2. Task 1 is killed (-9) once the step-4 checkpoint is written: srun
    ends the job at once (not after a collective's timeout) and does not requeue it (a crash is not a
    preemption); the same sbatch again continues from the last checkpoint, every step's loss is one
    plain process's, and final/ holds the engine's weights."""
    from test_deepspeed import COMMON, NAN_AT, check_zero3_final, one_process
    steps = ["trainer.max_steps=8", "trainer.save_every=2"]
    single, _ = one_process(tmp_path / "single", *steps, env=NAN_AT)  # micro-batches of 4: 2 ranks x 2
    run_dir = tmp_path / "two"
    submit = [f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", "--ntasks-per-node=2", "--gpus-per-node=0",
              "--cpus-per-task=1", TRAIN, *COMMON, "deepspeed=zero3", "trainer.micro_batch_size=2", *steps]
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RUN_DIR": str(run_dir), **NAN_AT}
    crashed = slurm.sbatch(submit, env=env)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_0000004").is_dir():
        assert time.time() < deadline and slurm.job(crashed)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.02)
    os.kill(task_pid(crashed, 1), signal.SIGKILL)
    killed_at = time.time()
    ended = slurm.wait(crashed)
    out = (tmp_path / f"slurm-{crashed}.out").read_text()
    assert ended["JobState"] == "FAILED" and ended["Restarts"] == "0", out[-3000:]
    assert time.time() - killed_at < 60 and not (run_dir / "final").exists()
    assert not (run_dir / "PREEMPTED").exists() and "requeueing" not in out
    last = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert 4 <= last < 8

    again = slurm.sbatch(submit, env=env)
    ended = slurm.wait(again)
    out = (tmp_path / f"slurm-{again}.out").read_text()
    assert ended["JobState"] == "COMPLETED", out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{last:07d}'} at step {last}" in out
    got = {r["step"]: (r["loss"], r.get("kl")) for r in read_metrics(run_dir, "train")}  # a repeated step: its last
    assert sorted(got) == list(range(1, 9)) and (run_dir / "final" / "config.json").is_file()
    for step, (loss, kl) in single.items():
        assert got[step][0] == pytest.approx(loss, abs=2e-5, nan_ok=True), step
        assert got[step][1] == pytest.approx(kl, abs=2e-5), step
    check_zero3_final(run_dir, 8)


def test_a_slurm_launcher_sweep_shares_the_cache_and_its_interrupted_points_resume(tmp_path, slurm):
    """`kto-train -m hydra/launcher=slurm` submits one job per point through submitit; the two points
    (1 CPU each, at once) compute the reference values once: one computes and stores them, the other
    reads them (waiting on the cache lock if it finds it held). One point gets USR2 (submitit's signal before the time limit): it writes its checkpoint and
    submitit requeues it. The other is preempted (`scontrol requeue`, as PreemptMode=REQUEUE does:
    SIGTERM, then Slurm requeues it): it writes its checkpoint in the grace time. Both requeued jobs
    resume and end with the losses of an uninterrupted run (the swept key changes nothing)."""
    from test_sweep import TINY, summary
    sweep = tmp_path / "sweep"
    cmd = ["kto-train", "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
           *TINY, "trainer.max_steps=150", "trainer.schedule=constant", "trainer.warmup_ratio=0", "dataset.eval=null",
           "trainer.resume=auto", "trainer.keep_checkpoints=2,3"]
    sweeping = subprocess.Popen(cmd, env={**slurm.env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        for point in (0, 1):
            wait_for(sweep / str(point) / "metrics.jsonl", 3)
            job = next((sweep / ".submitit").glob(f"*_{point}")).name  # an array task: JOB_TASK
            slurm.signal(job, "USR2") if point == 0 else slurm.scontrol("requeue", job)
        # without accounting (no sacct here) submitit learns of a job's end from its result file alone
        _, err = sweeping.communicate(timeout=300)
    finally:
        sweeping.kill()
    assert sweeping.returncode == 0, err[-3000:]
    first, second = (losses(sweep / str(p)) for p in (0, 1))
    assert sorted(first) == sorted(second) == list(range(1, 151))
    assert all(first[s] == pytest.approx(second[s], abs=1e-6) for s in first)
    for p, signal_name in ((0, "SIGUSR2"), (1, "SIGTERM")):
        log = (sweep / str(p) / "kto-train.log").read_text()
        assert f"received {signal_name}" in log and "resumed from" in log, log[-2000:]
        assert summary(sweep / str(p))["steps"] == 150
    first_starts = [re.search(r"reference log-probs: (\d+) reused from the cache, (\d+) computed",
                              (sweep / str(p) / "kto-train.log").read_text()).groups() for p in (0, 1)]
    assert sorted(first_starts) == [("0", "47"), ("47", "0")]  # the resumed jobs read their run dir's copy
    lock = next(Path(os.environ["KTO_CLI_CACHE"]).rglob(".computing.lock")).read_text()
    assert re.fullmatch(rf"{socket.gethostname()}:\d+ \(job \d+\)\n", lock)  # the holder, as waiting runs name it

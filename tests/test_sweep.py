"""Sweeps: Hydra multirun sharing one reference cache entry, the sweep report, concurrent points,
the Slurm launcher config (and submitit's local executor), the sbatch scripts against fake Slurm
commands, and stopping on the preemption signal with a checkpoint that a new run resumes from."""
import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kto_cli.metrics import read_metrics

from conftest import TINY_RUN
from slurm_cluster import run_under_slurm_by

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_RUN, "dataset.max_train_rows=12", "dataset.max_eval_rows=6",
        "trainer.batch_size=4", "trainer.micro_batch_size=4", "trainer.lr=1e-3"]


def kto_train(*args, timeout=600, check=True, **kw):
    out = subprocess.run(["kto-train", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.subprocess
def test_multirun_2x2_computes_the_reference_once_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    kto_train("-m", *TINY, "trainer.max_steps=3", "loss.beta=0.1,0.5", "loss.desirable_weight=1,1.33",
              f"hydra.sweep.dir={sweep}")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    computed = [summary(r)["reference"]["computed"] for r in runs]
    assert computed[0] > 0 and computed[1:] == [0, 0, 0]  # the first point computed it, the others read it
    assert all((r / "final" / "config.json").is_file() for r in runs)

    out = subprocess.run(["kto-sweep-report", str(sweep)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert len(rows) == 4 and {"loss.beta", "loss.desirable_weight"} <= set(rows[0])
    assert "model" not in rows[0]  # the same in every point: not a swept column
    assert {(r["loss.beta"], r["loss.desirable_weight"]) for r in rows} == {
        ("0.1", "1"), ("0.1", "1.33"), ("0.5", "1"), ("0.5", "1.33")}
    assert all(r["status"] == "done" and r["steps"] == "3" and r["final rewards/accuracies"] for r in rows)
    assert (sweep / "sweep.md").read_text().count("\n") == 6
    assert (sweep / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_point(where: Path, overrides: list, score: float, accuracy: float) -> None:
    """A finished run dir as kto-train leaves it, for the report alone."""
    (where / ".hydra").mkdir(parents=True)
    (where / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (where / "config.yaml").write_text("seed: 0\n")
    (where / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval/gen/score": score,
                                                     "eval/rewards/accuracies": accuracy}) + "\n")
    (where / "summary.json").write_text(json.dumps({"wall_seconds": 1.0}))


def test_report_over_seeds_gives_each_setting_a_mean_and_interval(tmp_path):
    from kto_cli.report import report
    scores = {("0.1", "0"): 0.60, ("0.1", "1"): 0.64, ("0.1", "2"): 0.62, ("1.0", "0"): 0.70, ("1.0", "1"): 0.70,
              ("1.0", "2"): 0.76}
    for n, ((beta, seed), score) in enumerate(scores.items()):
        fake_point(tmp_path / str(n), ["model=tiny", f"loss.beta={beta}", f"seed={seed}"], score, 0.5 + score / 10)
    r = report(tmp_path)
    assert len(r["points"]) == 6 and [g["swept"] for g in r["groups"]] == [
        {"loss.beta": "0.1", "model": "tiny"}, {"loss.beta": "1.0", "model": "tiny"}]
    rows = list(csv.DictReader(open(tmp_path / "sweep_seeds.csv")))
    assert [(r["loss.beta"], r["seeds"]) for r in rows] == [("0.1", "3"), ("1.0", "3")]
    # 0.60, 0.64, 0.62: mean 0.62, sd 0.02, half-width t(0.975, 2) * 0.02 / sqrt(3) = 0.0497
    assert float(rows[0]["final gen/score"]) == pytest.approx(0.62, abs=1e-4)
    assert float(rows[0]["high gen/score"]) - 0.62 == pytest.approx(4.303 * 0.02 / 3 ** 0.5, abs=1e-4)
    assert float(rows[1]["final rewards/accuracies"]) == pytest.approx(0.5 + 0.72 / 10, abs=1e-4)
    assert "final gen/score" in next(csv.DictReader(open(tmp_path / "sweep.csv")))  # per run, generation too
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.subprocess
@run_under_slurm_by("test_a_slurm_launcher_sweep_shares_the_cache_and_its_interrupted_points_resume")
def test_concurrent_points_compute_the_reference_once(tmp_path):
    """Two runs started together on an empty cache: one computes, the other waits on the cache
    lock and then reads every value."""
    procs = [subprocess.Popen(["kto-train", *TINY, "trainer.max_steps=2", f"loss.beta={b}",
                               f"hydra.run.dir={tmp_path / str(b)}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for b in (0.1, 0.2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    reports = sorted((summary(tmp_path / str(b))["reference"] for b in (0.1, 0.2)), key=lambda r: r["computed"])
    assert reports[0]["computed"] == 0 and reports[0]["reused"] == reports[1]["computed"] > 0
    shards = list(Path(os.environ["KTO_CLI_CACHE"]).rglob("*.safetensors"))
    assert len(shards) == 1


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    from kto_cli.config import register_configs
    register_configs()
    with initialize_config_module("kto_cli.conf", version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 8, 8, "gpu")


@pytest.mark.subprocess
@run_under_slurm_by("test_a_slurm_launcher_sweep_shares_the_cache_and_its_interrupted_points_resume")
def test_submitit_local_executor_runs_one_point(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    kto_train("-m", "hydra/launcher=submitit_local", *TINY, "trainer.max_steps=2", "loss.beta=0.3",
              f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10")
    assert (sweep / "0" / "final" / "config.json").is_file()
    assert summary(sweep / "0")["steps"] == 2


# ---------------------------------------------------------------- sbatch scripts, fake Slurm

FAKE = {
    "sbatch": 'echo "sbatch $*" >> "$FAKE_LOG"; echo "Submitted batch job 4242"',
    "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"; if [ "$1 $2" = "show hostnames" ]; then printf "node7\\nnode8\\n"; fi',
    # srun records its command line and rendezvous, then exits FAKE_SRUN_STATUS; on USR1 it exits
    # 75 as kto-train does after writing its checkpoint, or with FAKE_SRUN_KILLED, writes the run
    # dir's marker as kto-train's rank 0 does and exits 137 as srun --kill-on-bad-exit may
    "srun": ('echo "srun $* MASTER=$MASTER_ADDR:$MASTER_PORT" >> "$FAKE_LOG"\n'
             'trap \'echo "srun got USR1" >> "$FAKE_LOG"; kill $SLEEP 2>/dev/null; if [ -n "${FAKE_SRUN_KILLED:-}" ]; '
             'then mkdir -p runs/77 && touch runs/77/PREEMPTED && exit 137; fi; exit 75\' USR1\n'
             'if [ -n "${FAKE_SRUN_SLEEP:-}" ]; then sleep "$FAKE_SRUN_SLEEP" & SLEEP=$!; wait $SLEEP; fi\n'
             'exit "${FAKE_SRUN_STATUS:-0}"'),
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log)}
    return env, log


@pytest.mark.subprocess
def test_sweep_script_submits_one_array_task_per_point(tmp_path, fake_slurm):
    env, log = fake_slurm
    env["SWEEP_DIR"] = str(tmp_path / "sw")
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm/sweep.sh"), "0.05 0.1", "1 1.33", "--partition", "gpu",
                          "--account", "proj", "--", "model=llama7b", "deepspeed=zero3"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sbatch = log.read_text().splitlines()
    assert len(sbatch) == 1 and sbatch[0].startswith("sbatch --array=0-3 --partition gpu --account proj")
    assert sbatch[0].endswith("scripts/slurm/sweep_point.sbatch model=llama7b deepspeed=zero3")
    assert f"SWEEP_DIR={tmp_path / 'sw'}" in sbatch[0]
    assert (tmp_path / "sw" / "points.txt").read_text().splitlines() == [
        "loss.beta=0.05 loss.desirable_weight=1", "loss.beta=0.05 loss.desirable_weight=1.33",
        "loss.beta=0.1 loss.desirable_weight=1", "loss.beta=0.1 loss.desirable_weight=1.33"]

    # array task 2 runs its point through train.sbatch: srun with the point's overrides, one rendezvous
    env.update(SLURM_ARRAY_TASK_ID="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[7-8]", SLURM_JOB_NUM_NODES="2",
               KTO_SLURM_DIR=str(ROOT / "scripts/slurm"))
    env.pop("MASTER_PORT", None)
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm/sweep_point.sbatch"), "model=llama7b"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    srun = [line for line in log.read_text().splitlines() if line.startswith("srun")]
    assert srun == [f"srun --kill-on-bad-exit=1 kto-train model=llama7b loss.beta=0.1 loss.desirable_weight=1 "
                    f"trainer.resume=auto hydra.run.dir={tmp_path / 'sw' / '2'} MASTER=node7:{20000 + 4242}"]
    assert "requeue" not in log.read_text()


@pytest.mark.subprocess
@pytest.mark.parametrize("killed", [False, True])
def test_train_sbatch_forwards_the_signal_and_requeues(tmp_path, fake_slurm, killed):
    """USR1 from Slurm reaches the batch shell; it passes it to srun, kto-train exits 75 after its
    checkpoint, and the script requeues the job; also when srun reports 137 (--kill-on-bad-exit)
    but rank 0 left the run dir's PREEMPTED marker."""
    env, log = fake_slurm
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node7", SLURM_JOB_NUM_NODES="1", FAKE_SRUN_SLEEP="30")
    if killed:
        env["FAKE_SRUN_KILLED"] = "1"
    p = subprocess.Popen(["bash", str(ROOT / "scripts/slurm/train.sbatch"), "model=tiny"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if log.is_file() and "srun " in log.read_text():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGUSR1)
    p.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert p.returncode == 75
    assert "srun got USR1" in lines and "scontrol requeue 77" in lines
    assert any("hydra.run.dir=runs/77" in line for line in lines)


# ---------------------------------------------------------------- preemption

def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.mark.subprocess
@run_under_slurm_by("test_a_signalled_job_checkpoints_requeues_and_ends_as_an_uninterrupted_run")
def test_preemption_signal_checkpoints_and_resume_continues(tmp_path):
    args = [*TINY, "trainer.max_steps=150", "trainer.schedule=constant", "trainer.warmup_ratio=0",
            "dataset.eval=null"]
    stopped = tmp_path / "stopped"
    p = subprocess.Popen(["kto-train", *args, f"hydra.run.dir={stopped}"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    for _ in range(1200):
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-3000:]
    step = max(losses(stopped))
    assert step < 150 and (stopped / "checkpoints" / f"step_{step:07d}").is_dir()
    assert f"after step {step}" in err and not (stopped / "final").exists()
    assert f"after step {step}" in (stopped / "PREEMPTED").read_text()  # what a batch script requeues on

    kto_train(*args, f"hydra.run.dir={stopped}", "trainer.resume=auto")
    assert not (stopped / "PREEMPTED").exists()
    full = tmp_path / "full"
    kto_train(*args, f"hydra.run.dir={full}")
    resumed, uninterrupted = losses(stopped), losses(full)
    assert sorted(resumed) == list(range(1, 151))
    for s in range(step + 1, step + 4):
        assert resumed[s] == pytest.approx(uninterrupted[s], abs=1e-6)

"""A one-node Slurm cluster on this machine, for tests of the sbatch scripts and the submitit
launcher under the real scheduler: munged, slurmctld and slurmd from Debian's packages
(`apt-get install slurmctld slurmd slurm-client munge`; .ci/run installs them), each with its own
key, socket, ports and state under one temporary directory, so a cluster the machine already runs
is left alone.

    cluster = Cluster.start()          # or a reason why not (Cluster.unavailable())
    job = cluster.sbatch(["--chdir", d, "scripts/slurm/train.sbatch", "model=tiny"])
    cluster.wait(job)                  # -> its final `scontrol show job` fields
    cluster.stop()
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from conftest import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

# cred_expire: a requeued job waits this long (+1 s) before it may start again (Slurm's default, 120 s,
# would be most of a test's time; below 5 Slurm falls back to it).
CONF = """\
ClusterName=kto
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={base}/munge/socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, base: Path):
        self.base = base

    @property
    def env(self) -> dict:
        """This process's environment as it is now (a test's own cache dir, say) for the commands and jobs."""
        return {**os.environ, "SLURM_CONF": str(self.base / "slurm.conf")}

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why no cluster can start here, or None."""
        missing = [d for d in DAEMONS if not shutil.which(d)]
        if missing:
            return (f"Slurm is not installed ({', '.join(missing)} missing): "
                    "apt-get install slurmctld slurmd slurm-client munge")
        if os.geteuid() != 0:
            return "slurmd runs jobs as their users and needs root"
        return None

    @classmethod
    def start(cls, timeout: float = 60) -> "Cluster":
        base = Path(tempfile.mkdtemp(prefix="kto-slurm-", dir="/tmp"))
        base.chmod(0o755)  # munged wants every directory above its socket searchable by all
        cluster = cls(base)
        try:
            cluster._start(timeout)
        except Exception:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout: float) -> None:
        b = self.base
        (b / "munge").mkdir(mode=0o755)
        for d in ("state", "spool"):
            (b / d).mkdir()
        (b / "slurm.conf").write_text(CONF.format(
            host=socket.gethostname().split(".")[0], base=b, cpus=os.cpu_count(),
            ctld_port=free_port(17000, 18000), slurmd_port=free_port(18000, 19000)))
        run(["mungekey", "--create", f"--keyfile={b}/munge/key"])
        run(["munged", f"--socket={b}/munge/socket", f"--key-file={b}/munge/key", f"--log-file={b}/munged.log",
             f"--pid-file={b}/munged.pid", f"--seed-file={b}/munged.seed"])
        run(["slurmctld", "-f", str(b / "slurm.conf")], env=self.env)
        run(["slurmd", "-f", str(b / "slurm.conf")], env=self.env)
        deadline = time.time() + timeout
        while self.scontrol("show", "node", "-o", check=False).find("State=IDLE") < 0:
            if time.time() > deadline:
                raise RuntimeError(f"the node did not come up in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        lines = [f"{p.name}: {line}" for p in sorted(self.base.glob("*.log")) for line in p.read_text().splitlines()[-3:]]
        return " | ".join(lines)

    def scontrol(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, args: list, env: Optional[dict] = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"sbatch: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def signal(self, job_id: str, name: str, batch: bool = False) -> None:
        """Send signal NAME to the job's steps (as Slurm does for `--signal=NAME@T` and on a
        preemption), or with batch to its batch shell (`--signal=B:NAME@T`)."""
        out = subprocess.run(["scancel", f"--signal={name}", *(["--batch"] if batch else []), job_id], env=self.env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"scancel: {out.stderr.strip()}")

    def job(self, job_id: str) -> dict:
        """The job's fields as `scontrol show job` gives them (JobState, Restarts, ExitCode, ...)."""
        text = self.scontrol("show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 600) -> dict:
        """Until the job has ended (after any requeue): its final fields."""
        deadline = time.time() + timeout
        while (fields := self.job(job_id))["JobState"] not in DONE:
            if time.time() > deadline:
                self.scontrol("cancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout:.0f} s")
            time.sleep(0.5)
        return fields

    def stop(self) -> None:
        """Cancel what is left (waiting a few seconds for its processes), stop the daemons, remove
        the directory; whatever fails on the way, the rest is still done."""
        try:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.time() + 10
            while time.time() < deadline and subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                                             text=True, timeout=30).stdout.strip():
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass
        pids = []
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            try:
                pids.append(int((self.base / pid_file).read_text()))
                os.kill(pids[-1], signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 3
        while pids and time.time() < deadline:
            pids = [p for p in pids if alive(p)]
            time.sleep(0.1)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def run(cmd: list, env: Optional[dict] = None) -> None:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"{cmd[0]} exited {out.returncode}: {(out.stderr or out.stdout).strip()[-500:]}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def run_under_slurm_by(test: str):
    """For a test of a path that tests/test_slurm.py also runs under the real scheduler (Slurm's
    variables set by hand, submitit's local executor, a signal the test sends itself): skipped where
    a cluster can start, so the suite pays for the path once."""
    import pytest
    return pytest.mark.skipif(Cluster.unavailable() is None, reason=f"tests/test_slurm.py::{test} runs it under Slurm")

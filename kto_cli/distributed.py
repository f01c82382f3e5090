"""Processes and ranks: reading them from the launcher (deepspeed, torchrun, srun), and the few
collectives the loop needs. With one process every function here is a no-op, so the loop has one
code path.

    torchrun --nproc_per_node 8 --no-python kto-train deepspeed=zero2
    deepspeed --num_gpus 8 $(which kto-train) deepspeed=zero3
    srun kto-train deepspeed=zero3        # one task per GPU; MASTER_ADDR from the node list
"""
import os
import subprocess
from typing import Any

import torch


def strip_launcher_args(argv: list) -> list:
    """The deepspeed launcher appends --local_rank=N to the command line; Hydra would read it as
    an override and fail. It moves to LOCAL_RANK, where torchrun puts it."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def env_ranks() -> tuple:
    """(rank, local rank, world size) from torchrun/deepspeed (RANK, LOCAL_RANK, WORLD_SIZE) or
    Slurm (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); (0, 0, 1) when launched as one process."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    return rank, local, world


def slurm_master() -> str:
    """The first host of the Slurm job's node list, which every task computes the same."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def export_env() -> None:
    """Fills RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT under srun, where only the SLURM_*
    variables exist, so torch.distributed's env:// rendezvous works under every launcher."""
    rank, local, world = env_ranks()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("WORLD_SIZE", str(world))
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = slurm_master()
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    os.environ.setdefault("MASTER_PORT", str(29500 + job % 1000))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on t's device (a copy; the input is left alone). NCCL reduces GPU tensors
    only, so the reduction runs on the backend's device."""
    if world() == 1:
        return t
    out = t.to(_comm_device(), copy=True)
    torch.distributed.all_reduce(out)
    return out.to(t.device)


def all_max(n: int) -> int:
    if world() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where the process group's tensors must be: this rank's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

"""Who am I in the job? Discover rank, world size and rendezvous from the launcher's environment.

One training script starts under any launcher without code changes:

| launcher | variables read |
|---|---|
| torchrun, deepspeed, any env:// launcher | RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT |
| SLURM srun (one task per GPU) | SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST, SLURM_JOB_ID |
| OpenMPI mpirun | OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE; rank 0's address and a free port are shared with mpi4py |
| plain python | nothing: rank 0 of 1 on 127.0.0.1 and a free port |

The launcher-specific variables are mapped onto the env:// ones (RANK, WORLD_SIZE, ...) so that
torch.distributed and DeepSpeed see one convention.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

from megareuse.errors import UserError


DEFAULT_PORT = 29500


class LaunchError(UserError, RuntimeError):
    """The environment describes an impossible job (one line naming the variable)."""


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # env | slurm | mpi | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def export(self, environ: MutableMapping[str, str] = os.environ) -> None:
        """Write the env:// variables that torch.distributed and DeepSpeed read."""
        environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                        "LOCAL_RANK": str(self.local_rank),
                        "LOCAL_WORLD_SIZE": str(self.local_world_size),
                        "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)})


def _int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"launch error: {name} is not set; accepted an integer")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"launch error: {name} = {value!r}: accepted an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list: "gpu[001-003,007],login2" -> gpu001, gpu002, gpu003, gpu007, login2."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    if not hosts:
        raise LaunchError(f"launch error: SLURM_JOB_NODELIST = {nodelist!r}: no hosts found")
    return hosts


def _slurm_tasks_per_node(environ: Mapping[str, str], world: int) -> int:
    if "SLURM_NTASKS_PER_NODE" in environ:
        return _int(environ, "SLURM_NTASKS_PER_NODE")
    first = environ.get("SLURM_TASKS_PER_NODE", "")  # e.g. "4(x2)" or "4,4"
    match = re.match(r"(\d+)", first)
    return int(match.group(1)) if match else max(1, world // max(1, _int(environ, "SLURM_NNODES", 1)))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _from_env(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "WORLD_SIZE")
    return LaunchEnv("env", _int(environ, "RANK"), world, _int(environ, "LOCAL_RANK", 0),
                     _int(environ, "LOCAL_WORLD_SIZE", world),
                     environ.get("MASTER_ADDR", "127.0.0.1"), _int(environ, "MASTER_PORT", DEFAULT_PORT))


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "SLURM_NTASKS")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" in environ:
        master = environ["MASTER_ADDR"]
    elif nodelist:
        master = expand_nodelist(nodelist)[0]
    else:
        raise LaunchError("launch error: SLURM_JOB_NODELIST is not set and neither is MASTER_ADDR")
    # a port every task derives alike, distinct between concurrent jobs on shared nodes
    port = _int(environ, "MASTER_PORT", 20000 + _int(environ, "SLURM_JOB_ID", 0) % 40000)
    return LaunchEnv("slurm", _int(environ, "SLURM_PROCID"), world, _int(environ, "SLURM_LOCALID", 0),
                     _slurm_tasks_per_node(environ, world), master, port)


def _from_mpi(environ: Mapping[str, str]) -> LaunchEnv:
    rank, world = _int(environ, "OMPI_COMM_WORLD_RANK"), _int(environ, "OMPI_COMM_WORLD_SIZE")
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if addr is None or port is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise LaunchError("launch error: mpirun without MASTER_ADDR/MASTER_PORT needs mpi4py "
                              "(pip install mpi4py) to share rank 0's address") from None
        if rank == 0:
            host = addr or socket.gethostname()
            shared = (host, int(port) if port else free_port("0.0.0.0"))
        else:
            shared = None
        addr, port = MPI.COMM_WORLD.bcast(shared, root=0)
    return LaunchEnv("mpi", rank, world, _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                     _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", world), str(addr), int(port))


def discover(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read the launcher's environment (env:// first: torchrun inside srun sets RANK too)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = _from_env(environ)
    elif "OMPI_COMM_WORLD_RANK" in environ:
        env = _from_mpi(environ)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        env = _from_slurm(environ)
    else:
        env = LaunchEnv("single", 0, 1, 0, 1, "127.0.0.1", _int(environ, "MASTER_PORT", 0) or free_port())
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"launch error: rank {env.rank} is outside world size {env.world_size}")
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise LaunchError(f"launch error: local rank {env.local_rank} is outside local world size "
                          f"{env.local_world_size}")
    return env

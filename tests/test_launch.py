"""Launcher environment discovery (pure: no processes started)."""
import pytest

from megareuse.parallel.launch import LaunchError, discover, expand_nodelist


def test_expand_nodelist():
    assert expand_nodelist("gpu[001-003,007],login2") == ["gpu001", "gpu002", "gpu003", "gpu007", "login2"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_nodelist("n[1-2],m[05-06]") == ["n1", "n2", "m05", "m06"]


def test_env_launchers():
    env = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("env", 3, 4, 1, "10.1.2.3", 29400)


def test_slurm_rank_arithmetic_and_master():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[017-018]",
               "SLURM_JOB_ID": "123456"}
    env = discover(environ)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 8, 1, 4)
    assert env.master_addr == "gpu017" and env.master_port == 20000 + 123456 % 40000
    exported = {}
    env.export(exported)
    assert exported["RANK"] == "5" and exported["MASTER_ADDR"] == "gpu017"
    # torchrun inside srun: the env:// variables win
    assert discover({**environ, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "env"


def test_mpi_with_explicit_master():
    env = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"})
    assert (env.launcher, env.rank, env.world_size, env.master_port) == ("mpi", 1, 2, 29555)


def test_single_process():
    env = discover({})
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert env.master_port > 0


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK = 'x': accepted an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST is not set"),
])
def test_bad_environments(environ, message):
    with pytest.raises(LaunchError, match=message):
        discover(environ)

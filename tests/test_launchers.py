"""Launch-environment discovery, SLURM list parsing, hostfiles and the exact launcher commands."""

import os
import re
import subprocess
import sys

import pytest

from mtx_launchers import LaunchEnvError, discover, parse_nodelist, parse_tasks_per_node
from mtx_launchers.command import Host, HostfileError, build, format_hostfile, plan_from_environment, read_hostfile
from mtx_launchers.slurm import NodelistError, port_for_job
from tests.helpers import DIST_VARS, REPO, run_cli

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
ADDRS = {"n1": "10.1.0.1", "gpu-001": "10.2.0.1", "node7": "10.3.0.7"}


def resolve(name):
    return ADDRS.get(name)


def slurm(procid, localid, nodeid, ntasks, tasks_per_node, nodelist, job="4242", **extra):
    """The variables srun gives one task of a step."""
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_NTASKS": str(ntasks), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_TASKS_PER_NODE":
            tasks_per_node, "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_ID": job,
            "SLURM_STEP_ID": "0", **extra}


# -- explicit launcher variables ---------------------------------------------------------------------

def test_torchrun_environment():
    env = discover(TORCHRUN)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.is_main, env.source) == ("10.0.0.1", 29500, False, "env")
    assert (env.node_rank, env.num_nodes) == (1, 2)
    out: dict = {}
    env.export(out)
    assert out == TORCHRUN


def test_torchrun_node_rank_comes_from_group_rank():
    env = discover({**TORCHRUN, "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "3", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.node_rank, env.num_nodes) == (0, 3)


def test_deepspeed_launcher_environment_uses_local_size_and_cross_rank():
    ds = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4", "CROSS_RANK": "1", "CROSS_SIZE": "2",
          "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29600"}
    env = discover(ds)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank, env.num_nodes) == \
        (5, 1, 8, 4, 1, 2)


def test_single_process_defaults_to_a_free_loopback_port():
    env = discover({})
    assert (env.rank, env.world_size, env.master_addr, env.source) == (0, 1, "127.0.0.1", "single")
    assert 0 < env.master_port < 65536


@pytest.mark.parametrize("change,message", [
    ({"MASTER_PORT": None}, "MASTER_PORT not set"),
    ({"RANK": "x"}, "RANK='x' is not an integer"),
    ({"RANK": "4"}, "RANK=4 is outside WORLD_SIZE=4"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE=8 is inconsistent with WORLD_SIZE=4"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
])
def test_bad_environments_are_named(change, message):
    environ = {**TORCHRUN, **change}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(LaunchEnvError, match=message):
        discover(environ)


# -- SLURM -------------------------------------------------------------------------------------------

def test_slurm_single_node():
    env = discover(slurm(1, 1, 0, 2, "2", "n1"), resolve)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.source) == (1, 1, 2, 2, "slurm")
    assert (env.master_addr, env.master_port, env.node_rank, env.num_nodes) == ("10.1.0.1", 20000 + 4242, 0, 1)


def test_slurm_multi_node_compressed_lists():
    # 3 nodes with 2, 2, 1 tasks: task 4 is the only one on gpu-010
    env = discover(slurm(4, 0, 2, 5, "2(x2),1", "gpu-[001-002,010]", job="123456"), resolve)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (4, 0, 5, 1)
    assert (env.node_rank, env.num_nodes, env.master_addr) == (2, 3, "10.2.0.1")
    assert env.master_port == port_for_job(123456) == 20000 + 123456 % 20000


def test_slurm_ntasks_per_node_and_job_nodelist_only():
    environ = slurm(3, 1, 1, 4, "", "n[1-2]")
    for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_NODELIST"):
        del environ[k]
    environ["SLURM_NTASKS_PER_NODE"] = "2"
    env = discover(environ, resolve)
    assert (env.rank, env.local_world_size, env.node_rank, env.num_nodes, env.master_addr) == (3, 2, 1, 2, "10.1.0.1")


def test_slurm_master_port_and_addr_can_be_given():
    env = discover(slurm(0, 0, 0, 2, "1(x2)", "n[1-2]", MASTER_ADDR="192.168.0.5", MASTER_PORT="31000"), resolve)
    assert (env.master_addr, env.master_port) == ("192.168.0.5", 31000)


def test_explicit_environment_wins_over_slurm():
    # the deepspeed launcher started 4 ranks inside one srun task per node: RANK differs from SLURM_PROCID
    environ = {**slurm(1, 0, 1, 2, "1(x2)", "n[1-2]"), "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
               "LOCAL_SIZE": "2", "CROSS_RANK": "1", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29501"}
    env = discover(environ, resolve)
    assert (env.rank, env.world_size, env.local_world_size, env.master_addr, env.source) == (3, 4, 2, "10.9.9.9", "env")


@pytest.mark.parametrize("environ,message", [
    ({**slurm(1, 0, 1, 2, "1(x2)", "n[1-2]"), "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a",
      "MASTER_PORT": "1234"}, "RANK=0 contradicts SLURM_PROCID=1"),
    ({k: v for k, v in slurm(0, 0, 0, 2, "2", "n1").items() if k != "SLURM_NTASKS"},
     "SLURM_PROCID is set but SLURM_NTASKS is not"),
    ({k: v for k, v in slurm(0, 0, 0, 2, "2", "n1").items() if k != "SLURM_LOCALID"},
     "SLURM_PROCID is set but SLURM_LOCALID is not"),
    ({k: v for k, v in slurm(0, 0, 0, 2, "1(x2)", "n[1-2]").items() if k != "SLURM_STEP_ID"},
     "come from the batch script, not from an srun step"),
    (slurm(0, 0, 0, 3, "1(x2)", "n[1-2]"),
     r"SLURM_STEP_TASKS_PER_NODE='1\(x2\)' adds up to 2 tasks but SLURM_NTASKS=3"),
    (slurm(2, 0, 0, 2, "1(x2)", "n[1-2]"), "SLURM_PROCID=2 is outside SLURM_NTASKS=2"),
    (slurm(1, 1, 1, 2, "1(x2)", "n[1-2]"), "SLURM_LOCALID=1 is outside SLURM_STEP_TASKS_PER_NODE=1"),
    (slurm(1, 0, 1, 2, "1(x2)", "n1"), "names 1 nodes but SLURM_STEP_TASKS_PER_NODE describes 2"),
    (slurm(1, 0, 1, 2, "1(x2)", "n[2-1]"), "SLURM_STEP_NODELIST: range '2-1' in node list 'n\\[2-1\\]' runs backwards"),
    (slurm(0, 0, 0, 1, "1", "unknown9"), "cannot find the address of unknown9, the first node"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, r"OpenMPI environment .* names no master"),
    ({"PMI_RANK": "0"}, "PMI_RANK is set but PMI_SIZE is not"),
    ({**slurm(1, 0, 1, 2, "1(x2)", "n[1-2]"), "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
     "OMPI_COMM_WORLD_RANK=0 contradicts SLURM_PROCID=1"),
])
def test_contradictions_and_gaps_are_named(environ, message):
    with pytest.raises(LaunchEnvError, match=message):
        discover(environ, resolve)


def test_batch_script_with_one_task_is_a_single_process():
    environ = {k: v for k, v in slurm(0, 0, 0, 1, "1", "n1").items() if k != "SLURM_STEP_ID"}
    env = discover(environ, resolve)
    assert (env.rank, env.world_size, env.source) == (0, 1, "slurm")


# -- MPI -----------------------------------------------------------------------------------------------

def test_openmpi_with_master_addr():
    env = discover({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "10.0.0.2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 4, "OpenMPI")
    assert (env.master_addr, env.master_port, env.node_rank, env.num_nodes) == ("10.0.0.2", 29500, 1, 2)


def test_mpirun_inside_an_allocation_takes_the_first_node_and_mpi_ranks():
    # mpirun's daemons are SLURM's tasks (one per node); the MPI variables describe the ranks
    environ = {**slurm(1, 0, 1, 2, "1(x2)", "node[7-8]", job="99"), "OMPI_COMM_WORLD_RANK": "6",
               "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    env = discover(environ, resolve)
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.source) == \
        (6, 8, "10.3.0.7", 20099, "OpenMPI")


def test_pmi_and_mvapich():
    env = discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "h0", "MASTER_PORT": "1111"})
    assert (env.rank, env.world_size, env.local_world_size, env.node_rank, env.source) == (2, 4, 2, 1, "PMI")
    env = discover({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h0"})
    assert (env.rank, env.world_size, env.source) == (1, 2, "MVAPICH2")


# -- SLURM lists ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("n[1-2],m[3-4]", ["n1", "n2", "m3", "m4"]),
    ("gpu-[001-004,010],cpu7", ["gpu-001", "gpu-002", "gpu-003", "gpu-004", "gpu-010", "cpu7"]),
    ("a[01-02]b[1-2]", ["a01b1", "a01b2", "a02b1", "a02b2"]),
    ("rack1-n[3,5]-ib", ["rack1-n3-ib", "rack1-n5-ib"]),
    ("node-1,node-2", ["node-1", "node-2"]),
    ("x[9-11]", ["x9", "x10", "x11"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
    ("host.example.org", ["host.example.org"]),
    ("c[0]", ["c0"]),
])
def test_parse_nodelist(text, hosts):
    assert parse_nodelist(text) == hosts


@pytest.mark.parametrize("text,message", [
    ("", "empty node list"), ("n[1-2", "unbalanced '\\['"), ("n1-2]", "unbalanced '\\]'"),
    ("n[[1]]", "nested brackets"), ("n[a-b]", "bad range 'a-b'"), ("n1,,n2", "empty entry"),
    ("n[3-1]", "runs backwards"),
])
def test_parse_nodelist_errors(text, message):
    with pytest.raises(NodelistError, match=message):
        parse_nodelist(text)


@pytest.mark.parametrize("text,counts", [
    ("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1(x2)", [1, 1]), ("8,4(x2)", [8, 4, 4]),
])
def test_parse_tasks_per_node(text, counts):
    assert parse_tasks_per_node(text) == counts


def test_parse_tasks_per_node_error():
    with pytest.raises(NodelistError, match=r"bad tasks-per-node entry '2\(3\)'"):
        parse_tasks_per_node("2(3)")


# -- hostfiles and launcher commands ------------------------------------------------------------------

def test_hostfile_round_trip_and_errors(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nworker-0 slots=4\n\nworker-1  slots=2  # smaller node\n")
    assert read_hostfile(str(hf)) == [Host("worker-0", 4), Host("worker-1", 2)]
    assert format_hostfile(read_hostfile(str(hf))) == "worker-0 slots=4\nworker-1 slots=2\n"
    for text, message in [("# nothing\n\n", "lists no hosts"), ("worker-0 4\n", "line 1: 'worker-0 4' is not of "
                          "the form 'host slots=N'"), ("a slots=1\nb slots=0\n", "line 2: 'b slots=0': slots must be"),
                          ("a slots=1\na slots=2\n", "host 'a' is listed twice")]:
        hf.write_text(text)
        with pytest.raises(HostfileError, match=message):
            read_hostfile(str(hf))
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        read_hostfile(str(tmp_path / "absent"))


TRAIN = ["train", "cfg.toml", "run.steps=10", "--resume", "latest"]


def test_deepspeed_command_for_a_slurm_allocation():
    environ = {"SLURM_JOB_NODELIST": "gpu-[001-002]", "SLURM_NODEID": "1", "SLURM_JOB_ID": "77",
               "SLURM_GPUS_ON_NODE": "8"}
    plan = plan_from_environment("deepspeed", TRAIN, environ, write_hostfile="/shared/hf", resolve=resolve,
                                 python="py")
    assert plan.hosts == [Host("gpu-001", 8), Host("gpu-002", 8)]
    assert plan.argv == ["py", "-u", "-m", "deepspeed.launcher.runner", "--hostfile", "/shared/hf", "--no_ssh",
                         "--node_rank", "1", "--master_addr", "10.2.0.1", "--master_port", "20077", "--module",
                         "mtx_dist.cli", *TRAIN]


def test_torchrun_command_for_a_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node7 slots=2\nnode8 slots=2\n")
    plan = plan_from_environment("torchrun", TRAIN, {}, hostfile=str(hf), node_rank=1, resolve=resolve, python="py")
    assert plan.argv == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                         "--node-rank", "1", "--master-addr", "10.3.0.7", "--master-port", "29500", "-m",
                         "mtx_dist.cli", *TRAIN]


def test_slots_default_to_tasks_then_one_and_can_be_overridden():
    base = {"SLURM_JOB_NODELIST": "n[1-2]"}
    assert plan_from_environment("torchrun", TRAIN, base, resolve=resolve).hosts == [Host("n1", 1), Host("n2", 1)]
    tasks = {**base, "SLURM_NTASKS_PER_NODE": "3"}
    assert plan_from_environment("torchrun", TRAIN, tasks, resolve=resolve).hosts[0].slots == 3
    gpus = {**tasks, "SLURM_GPUS_PER_NODE": "a100:4"}
    assert plan_from_environment("torchrun", TRAIN, gpus, resolve=resolve).hosts[0].slots == 4
    assert plan_from_environment("torchrun", TRAIN, gpus, nproc_per_node=2, resolve=resolve).hosts[0].slots == 2


def test_launch_errors():
    with pytest.raises(LaunchEnvError, match="no SLURM allocation .* and no --hostfile given"):
        plan_from_environment("deepspeed", TRAIN, {})
    with pytest.raises(LaunchEnvError, match="--nproc-per-node 0: must be at least 1"):
        plan_from_environment("deepspeed", TRAIN, {"SLURM_JOB_NODELIST": "n1"}, nproc_per_node=0)
    with pytest.raises(LaunchEnvError, match="torchrun starts the same number of processes on every node"):
        build("torchrun", [Host("a", 2), Host("b", 1)], TRAIN)
    with pytest.raises(LaunchEnvError, match="node rank 2 is outside the 2 hosts"):
        build("deepspeed", [Host("a", 2), Host("b", 1)], TRAIN, node_rank=2, hostfile="h")


def _cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    return {**env, **extra}


def test_launch_cli_prints_the_exact_command_and_writes_the_hostfile(tmp_path):
    hf = tmp_path / "hf"
    env = _cli_env(SLURM_JOB_NODELIST="n[1-2]", SLURM_NODEID="0", SLURM_JOB_ID="5", MASTER_ADDR="10.0.0.1")
    p = subprocess.run([sys.executable, "-m", "mtx_dist.cli", "launch", "--write-hostfile", str(hf),
                        "--nproc-per-node", "2", "--", *TRAIN], cwd=str(tmp_path), env={**env, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hf),
                                "--no_ssh", "--node_rank", "0", "--master_addr", "10.0.0.1", "--master_port",
                                "20005", "--module", "mtx_dist.cli", *TRAIN]
    assert hf.read_text() == "n1 slots=2\nn2 slots=2\n"


@pytest.mark.parametrize("args,message", [
    (["--", "train"], r"no SLURM allocation \(SLURM_JOB_NODELIST is not set\) and no --hostfile given"),
    (["--hostfile", "HF", "--", "train"], "hostfile .*HF lists no hosts"),
    ([], "nothing to launch"),
])
def test_launch_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "HF").write_text("\n")
    args = [str(tmp_path / "HF") if a == "HF" else a for a in args]
    p = run_cli(["launch", *args], cwd=str(tmp_path), timeout=120, env=_cli_env())
    assert p.returncode == 2, p.stderr
    assert re.search(message, p.stderr) and "Traceback" not in p.stderr, p.stderr

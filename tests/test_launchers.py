import pytest

from launchers import LaunchEnvError, discover

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_environment():
    env = discover(TORCHRUN)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.is_main) == ("10.0.0.1", 29500, False)
    out: dict = {}
    env.export(out)
    assert out == TORCHRUN


def test_single_process_defaults_to_a_free_loopback_port():
    env = discover({})
    assert (env.rank, env.world_size, env.master_addr, env.source) == (0, 1, "127.0.0.1", "single")
    assert 0 < env.master_port < 65536


@pytest.mark.parametrize("change,message", [
    ({"MASTER_PORT": None}, "MASTER_PORT not set"),
    ({"RANK": "x"}, "RANK='x' is not an integer"),
    ({"RANK": "4"}, "RANK=4 is outside WORLD_SIZE=4"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"),
])
def test_bad_environments_are_named(change, message):
    environ = {**TORCHRUN, **change}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(LaunchEnvError, match=message):
        discover(environ)

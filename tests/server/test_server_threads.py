"""The server's torch threads in a simulation: the CPUs its client workers leave."""

import pytest

from server.app import compose_config
from simulations.simulate import server_threads


@pytest.mark.parametrize("overrides, cpus, expected", [
    # 2 CPUs, a worker per CPU (the default): every CPU trains, the server gets one.
    (["simulation.num_clients=100"], 2, 1),
    # 16 CPUs, workers of 4: four workers take all 16.
    (["simulation.num_clients=100", "simulation.num_cpus=4"], 16, 1),
    # 16 CPUs but only 2 clients of 4 CPUs: 8 left for the server.
    (["simulation.num_clients=2", "simulation.num_cpus=4"], 16, 8),
    # 3 CPUs, workers of 2: one worker, one CPU left.
    (["simulation.num_clients=10", "simulation.num_cpus=2"], 3, 1),
    # 7 CPUs, workers of 2: three workers, one left.
    (["simulation.num_clients=10", "simulation.num_cpus=2"], 7, 1),
    # 8 CPUs, 3 clients of 1: five left.
    (["simulation.num_clients=3"], 8, 5),
])
def test_the_server_gets_the_cpus_the_workers_leave_and_at_least_one(overrides, cpus, expected):
    cfg, _ = compose_config(overrides)
    assert server_threads(cfg, cpus) == expected


def test_rays_own_cpu_count_is_used_when_set():
    cfg, _ = compose_config(["simulation.num_clients=2", "+simulation.init_args.num_cpus=6"])
    assert server_threads(cfg) == 4

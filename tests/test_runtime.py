"""The runtime module: actor-pool sizing and actor thread settings."""

import pytest


@pytest.mark.parametrize(
    ("cpus", "actors", "per", "want"),
    [
        (2, 0, 1.0, (1, 1.0)),  # the default on 2 CPUs: runs
        (2, 2, 0.75, (1, 0.75)),  # hung Ray Data 2.60 (tokenize starved): capped
        (2, 1, 4.0, (1, 1.0)),
        (16, 4, 2.0, (4, 2.0)),
        (16, 8, 2.0, (4, 2.0)),
    ],
)
def test_cpu_actor_pool_leaves_half_the_cluster_to_the_other_stages(cpus, actors, per, want):
    from raysys.runtime import pool_size

    class FakeRay:
        @staticmethod
        def cluster_resources() -> dict[str, float]:
            return {"CPU": float(cpus)}

    assert pool_size(FakeRay, actors, False, per) == want


def test_actor_threads_come_from_the_config_else_the_node_cores_per_actor(monkeypatch):
    import torch

    from raysys.runtime import set_actor_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    try:
        assert set_actor_threads({"torch_threads": 3, "actors": 2}) == 3
        assert torch.get_num_threads() == 3
        assert set_actor_threads({"torch_threads": 0, "actors": 2}) == 4
        assert set_actor_threads({"actors": 16}) == 1
    finally:
        torch.set_num_threads(before)


class _FakeCluster:
    def __init__(self, cpus: float, gpus: float) -> None:
        self.res = {"CPU": cpus, "GPU": gpus}

    def cluster_resources(self) -> dict[str, float]:
        return self.res


@pytest.mark.parametrize(
    ("gpus_up", "actors", "max_actors", "want"),
    [
        # No GPU node up yet (autoscaling cluster): still a pool that can grow.
        (0, 0, 0, {"min_size": 1, "max_size": None, "initial_size": 1}),
        (4, 0, 0, {"min_size": 1, "max_size": None, "initial_size": 4}),
        (4, 0, 2, {"min_size": 1, "max_size": 2, "initial_size": 2}),
        (0, 8, 0, {"size": 8}),  # fixed by the config, whatever is up
    ],
)
def test_gpu_pool_is_not_fixed_by_the_gpus_up_at_submit(
    monkeypatch, gpus_up, actors, max_actors, want
):
    from raysys import runtime
    from raysys.config import PoolConfig
    from raysys.runtime import pool_strategy

    # An autoscaler that can start 2 nodes of 8 GPUs.
    monkeypatch.setattr(runtime, "autoscaler_max_gpus", lambda ray: 16)

    pool = PoolConfig(use_gpu=True, actors=actors, max_actors=max_actors)
    strategy, cpus, _ = pool_strategy(_FakeCluster(16, gpus_up), pool)
    assert strategy == want and cpus == 1.0


def test_gpu_pool_strategy_is_accepted_by_ray_data():
    import ray.data

    from raysys.config import PoolConfig
    from raysys.runtime import pool_strategy

    strategy, _, _ = pool_strategy(_FakeCluster(16, 1), PoolConfig(use_gpu=True))
    s = ray.data.ActorPoolStrategy(**strategy)
    assert (s.min_size, s.max_size, s.initial_size) == (1, float("inf"), 1)

"""The tokenize -> actor-pool model stage shared by corpus encoding and reranking.

Tokenizing runs in light CPU tasks; the model runs in a class-based map over an
actor pool (one GPU per actor when asked, else CPU). Blocks are cut to one
batch each so results stream back (progress, shard completion) batch by batch
and the actors share the work evenly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def set_actor_threads(opts: dict[str, Any]) -> int:
    """Set this actor's torch threads: ``torch_threads``, else node cores / actors.

    Deliberately the node's cores, not the actor's Ray CPU share: the share is
    a scheduling reservation that leaves the tokenize tasks room, and they
    need little CPU (SciFact: the whole corpus tokenized within the first 20 s
    of a 360 s encode), so an actor that reserves 1 of 2 CPUs still uses both
    cores for its forward passes.
    """
    import os

    import torch

    threads = int(
        opts.get("torch_threads") or max(1, (os.cpu_count() or 1) // opts.get("actors", 1))
    )
    torch.set_num_threads(threads)
    return threads


def pool_size(ray: Any, actors: int, use_gpu: bool, cpus_per_actor: float) -> tuple[int, float]:
    """(actors, CPUs per actor) for this cluster; CPU pools leave room for tokenizing.

    A CPU pool gets at most half the cluster's CPUs. Ray Data reserves half
    of the resources (``op_resource_reservation_ratio``) split across the
    operators and hands the shared rest downstream first, so a pool that takes
    more can leave the read/tokenize operators no budget: on 2 CPUs, 2 actors
    x 0.75 CPU hung forever (Ray 2.60, ``backpressured:tasks(ResourceBudget)``);
    1 actor x 1 CPU runs.
    """
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return actors or max(1, gpus), 1.0
    per = min(cpus_per_actor, max(0.25, cpus / 2))
    n = actors or 1
    if n * per > cpus / 2:
        fit = max(1, int((cpus / 2) // per))
        log.warning(
            "actor pool: %d actors x %.2f CPU would take more than half of the %g CPUs "
            "(the tokenize stage would starve); using %d",
            n,
            per,
            cpus,
            fit,
        )
        n = fit
    return n, per


def tokenize_and_map(
    ds: Any,
    *,
    tokenize: Callable[..., Any],
    tokenize_kwargs: dict[str, Any],
    actor: type,
    actor_kwargs: Callable[[int], dict[str, Any]],
    batch_size: int,
    actors: int,
    use_gpu: bool,
    cpus_per_actor: float,
) -> Any:
    """``ds`` tokenized in tasks, then mapped by ``actor`` on a pool.

    ``actor_kwargs(n_actors)`` builds the actor's constructor kwargs (actors
    size their torch thread pools from the pool size).
    """
    import ray

    n_actors, cpus = pool_size(ray, actors, use_gpu, cpus_per_actor)
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = 4 * 1024 * 1024
    ds = ds.map_batches(
        tokenize,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_kwargs=tokenize_kwargs,
        num_cpus=0.25,
    )
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        actor,
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs=actor_kwargs(n_actors),
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
    )

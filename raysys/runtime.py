"""Everything about Ray itself: start-up, the worker environment, actor-pool
sizing, actor thread settings and the tokenize -> actor-pool model stage that
corpus encoding and reranking share.

Tokenizing runs in light CPU tasks; the model runs in a class-based map over an
actor pool (one GPU per actor when asked, else CPU). Blocks are cut to one
batch each so results stream back (progress, shard completion) batch by batch
and the actors share the work evenly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


_STARTED_HERE = False


def ensure_ray() -> None:
    """Connect to Ray (a cluster via RAY_ADDRESS / `ray job submit`), or start one locally.

    Workers' output is forwarded to the driver (``log_to_driver``), where
    :func:`raysys.console.session` sends it to the run's log file; Ray Data's
    own progress bars are off unless the console is verbose (raysys draws
    one bar per stage).
    """
    global _STARTED_HERE
    import ray

    from raysys.console import console

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
        _STARTED_HERE = True
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = console.verbose


def shutdown_ray() -> None:
    """Stop the local Ray that :func:`ensure_ray` started (not a cluster we joined)."""
    global _STARTED_HERE
    if not _STARTED_HERE:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _STARTED_HERE = False


class ProgressChannel:
    """A Ray actor that carries progress records from workers to the driver.

    Workers call ``put.remote(record)`` without waiting; the driver polls
    ``take`` (records in order since its last call). Records from one caller
    arrive in the order they were sent.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def put(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def take(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out


class ProgressFollower:
    """A driver thread that calls ``on_record`` for each record sent to
    ``channel``, polling every ``poll_s`` seconds until :meth:`stop`, which
    takes what is left."""

    def __init__(
        self, channel: Any, on_record: Callable[[dict[str, Any]], None], poll_s: float = 0.5
    ) -> None:
        import threading

        self.channel, self.on_record, self.poll_s = channel, on_record, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="raysys-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.drain()

    def drain(self) -> None:
        """Take every pending record and hand it on."""
        import ray

        try:
            records = ray.get(self.channel.take.remote(), timeout=30)
        except Exception as e:  # progress is best-effort; the work goes on
            log.debug("progress channel: %s", e)
            return
        for r in records:
            self.on_record(r)

    def stop(self) -> None:
        """Stop polling and take what is left."""
        self._stop.set()
        self._thread.join()
        self.drain()


@contextmanager
def follow_progress(
    channel: Any, on_record: Callable[[dict[str, Any]], None], poll_s: float = 0.5
) -> Iterator[None]:
    """Follow ``channel`` (see :class:`ProgressFollower`) while the block runs."""
    follower = ProgressFollower(channel, on_record, poll_s)
    try:
        yield
    finally:
        follower.stop()


def progress_channel() -> Any:
    """A new :class:`ProgressChannel` actor (Ray must be up)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressChannel).remote()


def autoscaler_max_gpus(ray: Any) -> int | None:
    """The most GPUs the cluster's autoscaler may start (its node types'
    max workers x GPUs), or None when there is no autoscaler config."""
    try:
        from ray._private import state

        res = state.state.get_max_resources_from_cluster_config()
    except Exception:  # no autoscaler, or the private API moved
        return None
    return int(res.get("GPU", 0)) if res else None


def require_gpus(ray: Any, what: str, wait_s: float | None = None) -> float:
    """The cluster's GPUs up now; a clear error at once when there are none
    and none can come.

    Without this, an actor or worker that asks for a GPU on a cluster with
    none stays pending forever. A cluster whose autoscaler can start GPU
    nodes (its config says so) returns 0: the pool starts small and grows as
    they join. ``RAYSYS_GPU_WAIT_S`` (or ``wait_s``) waits that long for a
    GPU to appear before failing.
    """
    import time

    from raysys.errors import GPUUnavailable

    if wait_s is None:
        wait_s = float(os.environ.get("RAYSYS_GPU_WAIT_S", "0") or 0)
    deadline = time.monotonic() + wait_s
    while True:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if gpus > 0:
            return gpus
        if (autoscaler_max_gpus(ray) or 0) > 0:
            log.info("%s: no GPU node up yet; the autoscaler can start some", what)
            return 0.0
        if time.monotonic() >= deadline:
            raise GPUUnavailable(
                f"{what}: use_gpu=true but the Ray cluster has no GPU and its autoscaler "
                f"can start none ({int(resources.get('CPU', 0))} CPUs, 0 GPUs"
                + (f" after waiting {wait_s:g} s" if wait_s else "")
                + "); set use_gpu=false, connect to a GPU cluster (RAY_ADDRESS), or set "
                "RAYSYS_GPU_WAIT_S to wait for GPU nodes started another way"
            )
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def check_worker_device(use_gpu: bool, what: str) -> None:
    """In a worker or actor that was given a GPU: fail unless torch can use it.

    A node whose NVIDIA driver is older than torch's CUDA (or a mis-set
    ``CUDA_VISIBLE_DEVICES``) would otherwise run the whole job on its CPU.
    """
    if not use_gpu:
        return
    import socket

    import torch

    from raysys.errors import GPUUnavailable

    if torch.cuda.is_available():
        return
    try:
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        ids = []
    raise GPUUnavailable(
        f"{what} on {socket.gethostname()}: a GPU was asked for (Ray GPU ids {ids}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but torch "
        f"{torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device; "
        "check the NVIDIA driver against torch's CUDA, or set use_gpu=false"
    )


@contextmanager
def surface_user_errors() -> Iterator[None]:
    """Re-raise a :class:`raysys.errors.UserError` that a Ray actor or task
    raised (Ray wraps it, e.g. in ``ActorDiedError`` when an actor's
    constructor fails) as itself, so the CLI prints one line for it."""
    try:
        yield
    except Exception as e:
        found = _user_error_in(e)
        if found is None or found is e:
            raise
        raise found from e


def _user_error_in(e: BaseException) -> BaseException | None:
    from raysys import errors

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, errors.UserError):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
    # Only the text survives some wrappers: "raysys.errors.<Name>: <message>".
    for line in str(e).splitlines():
        for name in ("GPUUnavailable", "UserError"):
            tag = f"raysys.errors.{name}: "
            if tag in line:
                return getattr(errors, name)(line.split(tag, 1)[1].strip())
    return None


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for training workers (also set for `ray job submit`)."""
    from raysys.models.hub import cache_dir

    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")
        ),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in (
        "RAYSYS_CACHE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "RAYSYS_TRAIN_THROTTLE_S",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def set_actor_threads(opts: dict[str, Any]) -> int:
    """Set this actor's torch threads: ``torch_threads``, else node cores / actors.

    Deliberately the node's cores, not the actor's Ray CPU share: the share is
    a scheduling reservation that leaves the tokenize tasks room, and they
    need little CPU (SciFact: the whole corpus tokenized within the first 20 s
    of a 360 s encode), so an actor that reserves 1 of 2 CPUs still uses both
    cores for its forward passes.
    """
    import torch

    threads = int(
        opts.get("torch_threads") or max(1, (os.cpu_count() or 1) // opts.get("actors", 1))
    )
    torch.set_num_threads(threads)
    return threads


def pool_strategy(ray: Any, pool: Any) -> tuple[dict[str, int], float, int]:
    """(``ActorPoolStrategy`` kwargs, CPUs per actor, actors for thread sizing).

    ``pool.actors > 0`` fixes the pool's size. Otherwise a GPU pool
    autoscales from 1 actor up to ``pool.max_actors`` (0: no cap), so actors
    are added as GPU nodes join an autoscaling cluster instead of being fixed
    by the GPUs up at submit time; it starts with as many actors as GPUs are
    up. A CPU pool keeps a fixed size (see :func:`pool_size`).
    """
    if pool.use_gpu:
        gpus = require_gpus(ray, "actor pool")
    if pool.use_gpu and not pool.actors:
        up = int(gpus / pool.gpus_per_actor)
        cap = pool.max_actors or None
        initial = max(1, min(up, cap) if cap else up)
        return {"min_size": 1, "max_size": cap, "initial_size": initial}, 1.0, initial
    n, per = pool_size(ray, pool.actors, pool.use_gpu, pool.cpus_per_actor)
    return {"size": n}, per, n


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
    actor_kwargs: dict[str, Any],
    pool: Any,
) -> Any:
    """``ds`` tokenized in tasks, then mapped by ``actor`` on a pool.

    ``pool`` is a :class:`raysys.config.PoolConfig`. The actor is built with
    ``actor_kwargs`` plus ``opts``: the pool section as a dict, with
    ``actors`` set to the pool's actual size (actors size their torch thread
    pools from it).
    """
    import dataclasses

    import ray

    batch_size, use_gpu = pool.batch_size, pool.use_gpu
    strategy, cpus, n_actors = pool_strategy(ray, pool)
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
        compute=ray.data.ActorPoolStrategy(**strategy),
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            **actor_kwargs,
            "opts": {**dataclasses.asdict(pool), "actors": n_actors},
        },
        num_cpus=cpus,
        num_gpus=pool.gpus_per_actor if use_gpu else 0,
    )

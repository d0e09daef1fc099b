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
    """The most GPUs the cluster may hold (its autoscaler's node types: max
    workers x GPUs), or None when there is no autoscaler config."""
    try:
        from ray._private import state

        res = state.state.get_max_resources_from_cluster_config()
    except Exception:  # no autoscaler, or the private API moved
        return None
    return int(res.get("GPU", 0)) if res else None


def declared_gpu_capacity() -> float | None:
    """``RAYSYS_GPU_CAPACITY``: the GPUs the cluster can reach, declared by
    the user where Ray cannot know it (nodes started outside an autoscaler)."""
    raw = os.environ.get("RAYSYS_GPU_CAPACITY", "").strip()
    if not raw:
        return None
    from raysys.errors import UserError

    try:
        return float(raw)
    except ValueError:
        raise UserError(f"RAYSYS_GPU_CAPACITY={raw!r}: expected a number of GPUs") from None


def require_gpus(
    ray: Any, what: str, need: float = 1.0, *, wait_s: float | None = None, how: str = ""
) -> float:
    """The cluster's GPUs up now, once the stage's ``need`` (its workers x
    GPUs per worker, or actors x GPUs per actor) can be met; a one-line
    error within seconds when it cannot.

    Without this, workers or actors that ask for more GPUs than the cluster
    can ever hold stay pending until Ray times out. The cluster can reach
    the larger of the GPUs up now and its autoscaler's maximum (from the
    autoscaler's config; a cluster without one, e.g. nodes joined by
    ``ray start``, cannot grow as far as Ray knows). ``RAYSYS_GPU_CAPACITY``
    declares that number where Ray cannot know it; ``RAYSYS_GPU_WAIT_S`` (or
    ``wait_s``) waits that long for GPUs to join before failing. ``how``
    names the need in the error (e.g. ``"16 workers x 1 GPU"``).
    """
    import time

    from raysys.errors import GPUUnavailable

    if wait_s is None:
        wait_s = float(os.environ.get("RAYSYS_GPU_WAIT_S", "0") or 0)
    deadline = time.monotonic() + wait_s
    declared = declared_gpu_capacity()
    while True:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if gpus >= need:
            return gpus
        auto = autoscaler_max_gpus(ray) if declared is None else None
        reach = declared if declared is not None else max(gpus, float(auto or 0))
        if reach >= need:
            log.info("%s: %g GPUs up, %g needed; the cluster can reach %g", what, gpus, need, reach)
            return gpus
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:g} s" if wait_s else ""
            if reach == 0:
                raise GPUUnavailable(
                    f"{what}: use_gpu=true but the Ray cluster has no GPU and its autoscaler "
                    f"can start none ({int(resources.get('CPU', 0))} CPUs, 0 GPUs{waited}); "
                    "set use_gpu=false, connect to a GPU cluster (RAY_ADDRESS), or set "
                    "RAYSYS_GPU_WAIT_S to wait for GPU nodes started another way"
                )
            if declared is not None:
                source = f"RAYSYS_GPU_CAPACITY={declared:g}"
            elif auto is None:
                source = "no autoscaler config, so Ray cannot say how far it grows"
            else:
                source = f"autoscaler max {auto}"
            raise GPUUnavailable(
                f"{what}: needs {need:g} GPU{'s' * (need != 1)}"
                + (f" ({how})" if how else "")
                + f" but the Ray cluster can reach {reach:g} ({gpus:g} up now, {source}"
                f"{waited}); ask for fewer, or set RAYSYS_GPU_CAPACITY=N if nodes "
                "started another way will bring N GPUs in all (RAYSYS_GPU_WAIT_S: wait for them)"
            )
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


# Each Ray Train worker holds one whole GPU (train.scaling.use_gpu).
TRAIN_GPUS_PER_WORKER = 1


def train_gpu_need(scaling: Any) -> tuple[float, str]:
    """(GPUs, how) that training on ``scaling`` (train.scaling) holds at once."""
    n = scaling.num_workers
    return n * TRAIN_GPUS_PER_WORKER, (
        f"train.scaling.num_workers={n} x {TRAIN_GPUS_PER_WORKER} GPU"
    )


def pool_gpu_need(pool: Any, name: str = "pool") -> tuple[float, str]:
    """(GPUs, how) that a GPU actor pool needs to start: all of a fixed
    pool's actors, one actor of an autoscaling one."""
    per = f"{pool.gpus_per_actor:g} GPU"
    if pool.actors:
        return pool.actors * pool.gpus_per_actor, f"{name}.actors={pool.actors} x {per}"
    return pool.gpus_per_actor, f"1 actor of the autoscaling {name} x {per}"


def check_gpu_stages(cfg: Any, stages: list[str], ray: Any = None) -> None:
    """Before a pipeline's first stage: every GPU stage in ``stages`` (train,
    encode, rerank) fits the cluster (see :func:`require_gpus`), so a pool
    the cluster cannot hold fails in seconds, not after hours of training.
    Connects to Ray (:func:`ensure_ray`) only when a stage uses GPUs and no
    ``ray`` is given."""
    needs: list[tuple[str, float, str]] = []
    if "train" in stages and cfg.train.enabled and cfg.train.scaling.use_gpu:
        needs.append(("training (train.scaling.use_gpu)", *train_gpu_need(cfg.train.scaling)))
    for stage, name, pool in (
        ("encode", "encode.pool", cfg.encode.pool),
        ("rerank", "reranker.pool", cfg.reranker.pool),
    ):
        if stage in stages and pool.use_gpu:
            needs.append((f"{stage} ({name}.use_gpu)", *pool_gpu_need(pool, name)))
    if not needs:
        return
    if ray is None:
        ensure_ray()
        import ray
    for what, need, how in needs:
        require_gpus(ray, what, need=need, how=how)


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


def pool_strategy(
    ray: Any, pool: Any, what: str = "actor pool"
) -> tuple[dict[str, int], float, int]:
    """(``ActorPoolStrategy`` kwargs, CPUs per actor, actors for thread sizing).

    ``pool.actors > 0`` fixes the pool's size. Otherwise a GPU pool
    autoscales from 1 actor up to ``pool.max_actors`` (0: no cap), so actors
    are added as GPU nodes join an autoscaling cluster instead of being fixed
    by the GPUs up at submit time; it starts with as many actors as GPUs are
    up. A CPU pool keeps a fixed size (see :func:`pool_size`). A GPU pool the
    cluster can never hold (fixed actors x GPUs per actor) fails here (see
    :func:`require_gpus`).
    """
    if pool.use_gpu:
        need, how = pool_gpu_need(pool)
        gpus = require_gpus(ray, what, need=need, how=how)
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
    what: str = "actor pool",
) -> Any:
    """``ds`` tokenized in tasks, then mapped by ``actor`` on a pool.

    ``pool`` is a :class:`raysys.config.PoolConfig`; ``what`` names the stage
    in errors (e.g. a GPU pool the cluster cannot hold). The actor is built with
    ``actor_kwargs`` plus ``opts``: the pool section as a dict, with
    ``actors`` set to the pool's actual size (actors size their torch thread
    pools from it).
    """
    import dataclasses

    import ray

    batch_size, use_gpu = pool.batch_size, pool.use_gpu
    strategy, cpus, n_actors = pool_strategy(ray, pool, what)
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

"""Size the Ray actor pool: how many workers, what each reserves, how many torch threads each runs.

A pure function of the cluster's nodes, so it is tested without Ray; the driver calls it with
``ray.nodes()`` before it submits anything, and a request that cannot be placed fails at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from embedkit.errors import ConfigError

log = logging.getLogger("embedkit.batch")


@dataclass(frozen=True)
class Sizing:
    """How many actors, what each reserves, and the torch threads each runs."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int
    cluster_cpus: float
    cluster_gpus: float
    nodes: int


def _fits(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many actors reserving ``cpus`` and ``gpus`` can be placed on ``nodes`` at once."""
    n = 0
    for node in nodes:
        k = math.inf
        if cpus > 0:
            k = min(k, math.floor(float(node.get("CPU", 0)) / cpus + 1e-9))
        if gpus > 0:
            k = min(k, math.floor(float(node.get("GPU", 0)) / gpus + 1e-9))
        n += 1_000_000 if k == math.inf else int(k)
    return n


def _floor(x: float) -> float:
    return math.floor(x * 100) / 100 if x >= 0.01 else math.floor(x * 1e4) / 1e4


def describe_nodes(nodes: list[dict[str, Any]]) -> str:
    """``"2 node(s) (a: 8 CPU, 1 GPU, b: ...)"``: the nodes' resources, for logs and errors."""
    shown = ", ".join(
        f"{n.get('name', '?')}: {float(n.get('CPU', 0)):g} CPU, {float(n.get('GPU', 0)):g} GPU"
        for n in nodes[:5]
    )
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return f"{len(nodes)} node(s) ({shown}{more})"


def size_workers(
    nodes: list[dict[str, Any]],
    num_workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0.0,
    where: str = "the Ray cluster",
) -> Sizing:
    """Size the actor pool for ``nodes`` (the alive nodes' resources, ``{"CPU": n, "GPU": n}``).

    Defaults: one worker per GPU (``gpus_per_worker`` > 0), else one per node; a CPU worker
    reserves its node's cores shared among the workers, while all of them together leave
    ``min(0.5, 25%)`` of the cluster's CPUs unreserved (for the driver and Ray's own tasks), so an
    actor pool never reserves every core. Raises :class:`ConfigError`, naming what the cluster
    has, when the request cannot be placed, instead of waiting for resources that never come.

    >>> s = size_workers([{"CPU": 2}], 2)
    >>> (s.cpus_per_worker, s.threads)
    (0.75, 1)
    >>> s = size_workers([{"CPU": 2}], 1)
    >>> (s.cpus_per_worker, s.threads)
    (1.5, 2)
    """
    gpus = float(gpus_per_worker or 0.0)
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(f"gpus_per_worker must be a fraction below 1 or a whole number, got {gpus:g}")
    if cpus_per_worker is not None and cpus_per_worker < 0:
        raise ConfigError(f"cpus_per_worker must be >= 0, got {cpus_per_worker:g}")
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    total_cpu = sum(float(n.get("CPU", 0)) for n in nodes)
    total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
    have = describe_nodes(nodes)
    if gpus > 0 and total_gpu == 0:
        raise ConfigError(
            f"--gpus-per-worker {gpus:g}: {where} has no GPU ({have}); run on CPUs with "
            f"--gpus-per-worker 0, or connect to a cluster with GPUs (--ray-address / RAY_ADDRESS)"
        )
    if num_workers is None:
        num_workers = (
            _fits(nodes, 0.0, gpus) if gpus > 0 else max(sum(float(n.get("CPU", 0)) >= 1 for n in nodes), 1)
        )
    n = int(num_workers)
    reserve = min(0.5, 0.25 * total_cpu)
    share = max(total_cpu - reserve, 0.0) / n
    if cpus_per_worker is None:
        cap = min(share, 1.0) if gpus > 0 else share
        candidates = {cap} | {float(node.get("CPU", 0)) / k for node in nodes for k in range(1, n + 1)}
        fitting = [c for c in candidates if 0 < c <= cap and _fits(nodes, _floor(c), gpus) >= n]
        cpus = _floor(max(fitting)) if fitting else None
    else:
        cpus = float(cpus_per_worker)
    if cpus is None or _fits(nodes, cpus, gpus) < n:
        got = _fits(nodes, cpus if cpus is not None else 0.01, gpus)
        want = f"{n} worker(s) x {cpus if cpus is not None else '>0'} CPU" + (
            f" x {gpus:g} GPU" if gpus else ""
        )
        raise ConfigError(
            f"--engine ray: {want} cannot be placed on {where}: it has {total_cpu:g} CPU(s) and "
            f"{total_gpu:g} GPU(s) in {have}, room for {got} such worker(s). Ask for fewer workers "
            f"(--num-workers), smaller ones (--cpus-per-worker / --gpus-per-worker), or a bigger cluster"
        )
    if cpus_per_worker is not None and n * cpus > total_cpu - reserve:
        log.warning(
            "ray: %d worker(s) x %g CPU reserve %g of the cluster's %g CPUs, leaving less than %g for the "
            "driver and Ray's own tasks",
            n,
            cpus,
            n * cpus,
            total_cpu,
            reserve,
        )
    threads = max(1, int(cpus + 0.5))
    return Sizing(n, cpus, gpus, threads, total_cpu, total_gpu, len(nodes))

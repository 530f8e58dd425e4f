"""One model runner for every modality: where the model runs and how batches reach it.

:class:`ModelRunner` owns what the text and image engines share (devices, precision, replicas,
transfers, the out-of-memory split, spreading batches over replicas, running totals); an engine
describes one call's batches (row indices into its inputs) as a :class:`Workload`.

>>> runner = ModelRunner("cpu", "fp32")
>>> runner.devices, runner.precision
([device(type='cpu')], 'fp32')
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from embedkit.engine.device import (
    inference_context,
    is_oom,
    prepare_module,
    resolve_devices,
    resolve_precision,
)
from embedkit.errors import OutOfMemoryError

log = logging.getLogger(__name__)


@dataclass
class RunningTotals:
    """Counters that several threads add to; subclasses declare the counters as fields."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False, kw_only=True)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class RunnerTotals(RunningTotals):
    """The totals :meth:`ModelRunner.run` counts for every workload; engines add their own."""

    batches: int = 0
    oom_splits: int = 0
    model_seconds: float = 0.0


@dataclass
class EngineStats(RunnerTotals):
    """Running totals of an :class:`~embedkit.Embedder` (thread-safe updates)."""

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    onnx_batches: int = 0


class Replica(NamedTuple):
    """One copy of the model: its device, the prepared module, and the fp32 heads run after it."""

    device: torch.device
    module: torch.nn.Module
    heads: list[torch.nn.Module]


Batch = np.ndarray  # row indices into the inputs of one call


@dataclass(frozen=True)
class Workload:
    """What an engine tells the runner about the batches of one call.

    ``prepare(batch, replica)`` gives the batch's model inputs on the replica's device;
    ``forward(inputs, replica_index)`` gives the vectors and the counters to add to ``stats``
    (beside ``batches``, ``model_seconds`` and ``oom_splits``, which the runner counts).
    After out of memory on a batch, ``shrink(batch)`` lowers the engine's budget and says how (the
    log line); ``too_big(row, device)`` is the error for a row that does not fit even alone.
    ``cost(batch)`` weighs a batch when shares of replicas are balanced.
    """

    prepare: Callable[[Batch, Replica], Any]
    forward: Callable[[Any, int], tuple[torch.Tensor, dict[str, int]]]
    shrink: Callable[[Batch], str]
    too_big: Callable[[int, torch.device], OutOfMemoryError]
    stats: RunnerTotals
    cost: Callable[[Batch], int] = len


class ModelRunner:
    """Run one model on one or more devices at one precision.

    ``device`` and ``precision`` as :class:`~embedkit.Embedder` takes them (a device list gets a
    replica per device). Call :meth:`place` before running batches. ``stats`` are the engine's
    :class:`EngineStats`; a workload may count into other totals (the image side's).
    """

    def __init__(self, device: str = "auto", precision: str = "fp32") -> None:
        self.devices = resolve_devices(device)
        self.device = self.devices[0]
        self.precision = resolve_precision(precision, self.device)
        self.replicas: list[Replica] = []
        self.fused_modules = 0
        self.stats = EngineStats()
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-pre")

    def place(
        self,
        module: torch.nn.Module,
        heads: Sequence[torch.nn.Module] = (),
        *,
        cpu_fusion: bool = True,
        unpad: bool = False,
    ) -> torch.nn.Module:
        """Prepare ``module`` for the precision on the first device (fused oneDNN linear layers on
        CPU unless ``cpu_fusion`` is False; unpadded dense layers with ``unpad`` where the model
        allows), with ``heads`` (kept fp32) beside it, and put a copy of both on every other device.
        Returns the prepared module."""
        prepared, self.fused_modules = prepare_module(
            module, self.device, self.precision, cpu_fusion=cpu_fusion, unpad=unpad
        )
        fp32_heads = [head.to(self.device).float().eval() for head in heads]
        self.replicas = [Replica(self.device, prepared, fp32_heads)]
        for dev in self.devices[1:]:
            copies = [copy.deepcopy(head).to(dev) for head in fp32_heads]
            self.replicas.append(Replica(dev, copy.deepcopy(prepared).to(dev), copies))
        return prepared

    def context(self, replica: int = 0) -> AbstractContextManager[None]:
        """Inference mode (and autocast where the precision wants it) on a replica's device."""
        return inference_context(self.precision, self.replicas[replica].device)

    @staticmethod
    def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host tensor on ``device`` (through pinned memory, without blocking, onto CUDA)."""
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        if device.type != "cpu":
            return tensor.to(device)
        return tensor

    def run(
        self, work: Workload, batch: Batch, replica: int = 0, inputs: Any = None
    ) -> list[tuple[Batch, torch.Tensor]]:
        """Run ``batch`` on a replica (``inputs``: already prepared); the vectors of each part run.
        On out of memory the batch is split in two, the budget lowered and each half run again."""
        device = self.replicas[replica].device
        try:
            if inputs is None:
                inputs = work.prepare(batch, self.replicas[replica])
            t0 = time.perf_counter()
            vecs, counters = work.forward(inputs, replica)
            work.stats.add(model_seconds=time.perf_counter() - t0, batches=1, **counters)
            return [(batch, vecs)]
        except Exception as exc:
            if not is_oom(exc):
                raise
            inputs = None
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.empty_cache()
            if len(batch) == 1:
                raise work.too_big(int(batch[0]), device) from exc
            half = len(batch) // 2
            note = work.shrink(batch)
            work.stats.add(oom_splits=1)
            log.warning("%s", note)
            return self.run(work, batch[:half], replica) + self.run(work, batch[half:], replica)

    def run_all(self, work: Workload, batches: Sequence[Batch], emit: Callable[[Batch, Any], None]) -> None:
        """Run ``batches`` and hand each part run to ``emit(rows, outputs)``.

        With one replica, the next batch's inputs are prepared in a helper thread while the model
        runs the current one (a single batch is prepared in the caller's thread: nothing to overlap,
        and the hand-off cost ~0.2 ms of a ~3 ms one-text query). With several, each replica runs
        its share in its own thread (torch releases the GIL in kernels); shares are balanced by
        ``work.cost``, greedily in the order given (longest first balances best)."""

        def emit_all(parts: list[tuple[Batch, Any]]) -> None:
            for rows, found in parts:
                emit(rows, found)

        if not batches:
            return
        if len(self.replicas) == 1 and len(batches) == 1:  # nothing to overlap: no thread hand-off
            emit_all(self.run(work, batches[0], 0))
            return
        if len(self.replicas) == 1:
            first = self.replicas[0]
            pending = self._prefetch.submit(work.prepare, batches[0], first)
            for k, batch in enumerate(batches):
                try:
                    inputs = pending.result()
                except Exception as exc:  # out of memory while preparing: run() prepares it again
                    if not is_oom(exc):
                        raise
                    inputs = None
                if k + 1 < len(batches):
                    pending = self._prefetch.submit(work.prepare, batches[k + 1], first)
                emit_all(self.run(work, batch, 0, inputs))
            return
        shares: list[list[Batch]] = [[] for _ in self.replicas]
        load = [0] * len(self.replicas)
        for batch in batches:
            r = load.index(min(load))
            shares[r].append(batch)
            load[r] += work.cost(batch)

        def run_share(replica: int) -> None:
            for batch in shares[replica]:
                emit_all(self.run(work, batch, replica))

        with ThreadPoolExecutor(max_workers=len(self.replicas), thread_name_prefix="embedkit-dev") as pool:
            for fut in [pool.submit(run_share, r) for r in range(len(self.replicas))]:
                fut.result()

    def close(self) -> None:
        self._prefetch.shutdown(wait=False)

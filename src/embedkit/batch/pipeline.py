"""The unit pipeline: plan -> read -> prepare -> embed -> write -> record, one unit at a time.

:class:`UnitPipeline` runs a unit's steps; a *modality* (:class:`TextModality` here,
:class:`~embedkit.batch.images.ImageModality` for images) plans the job and reads, checks and embeds
its units, and the pipeline writes a unit's part and rejects files, then records its marker (only
then is the unit done). Two runners drive it over this host's units still to do:
:class:`LocalRunner`, in this process, and :class:`~embedkit.batch.ray_runner.RayRunner`, whose
actors each run a pipeline of their own.

:class:`LocalRunner` overlaps I/O with compute: while the engine embeds unit *k* on the calling
thread, a reader thread reads and prepares unit *k+1* and a writer thread writes and records unit
*k-1*, so at most three units are in memory, whatever the size of the dataset. The stop flag
(SIGTERM / SIGINT, or the caller's event) is checked between chunks of a unit, so an interrupted
job saves its state within seconds: the unit in flight is abandoned (it was never recorded) and
redone by the next run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from embedkit.batch.output import OutputFolder, embeddings_table, rejects_table
from embedkit.batch.plan import Plan, Unit, make_plan
from embedkit.batch.prepare import Prepared, failed_unit, prepare_unit, read_unit, reason_kind
from embedkit.batch.report import Progress
from embedkit.batch.settings import HostPlan, JobSettings
from embedkit.batch.signals import STOP_GRACE_SECONDS, Background, StopSignals
from embedkit.batch.state import JobState
from embedkit.engine.tokenize import Tokenized
from embedkit.errors import InputError
from embedkit.io.readers import RowBlock, StreamCache

log = logging.getLogger("embedkit.batch")

# What flows from a modality's embed to the write of a unit: its valid rows' outputs by name, in row
# order: "dense" an (n, dim) float32 array, "sparse" (token ids, weights) pairs, "colbert" one
# (tokens - 1, dim) array per row (see embedkit.engine.multi); the write turns them into columns.
Outputs = dict[str, Any]


class Modality(Protocol):
    """What differs between text and image jobs; :class:`TextModality` is the reference."""

    name: str

    def plan(self, settings: JobSettings) -> Plan:
        """List the input and cut it into units."""

    def read(self, pipeline: UnitPipeline, unit: Unit) -> Any:
        """``unit``'s rows as read (on the reader thread); raises when its file cannot be read."""

    def prepare(self, pipeline: UnitPipeline, unit: Unit, rows: Any) -> Prepared:
        """Sort the ``rows`` read into valid (made ready for the model) and rejected."""

    def embed(self, pipeline: UnitPipeline, p: Prepared) -> Outputs | None:
        """``p``'s outputs in row order (may reject more rows); None if stopped before the end."""

    def close(self) -> None:
        """Release what reading held open (files, fetch threads)."""


class TextModality:
    """Texts: read and tokenise a unit's rows, embed them longest first in chunks of a few token
    budgets (the stop flag is checked between chunks)."""

    name = "text"

    def __init__(self) -> None:
        self.streams = StreamCache()  # the reader's open CSV / JSON Lines file, reused unit to unit
        self.chunk_tokens = 0  # set on the first unit, from the engine's budget as it then stands

    def plan(self, settings: JobSettings) -> Plan:
        return make_plan(
            settings.input,  # type: ignore[arg-type]
            text_column=settings.text_column,
            id_column=settings.id_column,
            keep_columns=settings.keep_columns or (),
            unit_rows=settings.unit_rows,
            max_samples=settings.max_samples,
            fail_fast=settings.fail_fast,
            region=settings.aws_region,
        )

    def read(self, pipeline: UnitPipeline, unit: Unit) -> RowBlock:
        return read_unit(pipeline.plan, unit, self.streams)

    def prepare(self, pipeline: UnitPipeline, unit: Unit, rows: RowBlock) -> Prepared:
        return prepare_unit(pipeline.plan, unit, rows, pipeline.embedder, truncate=pipeline.settings.truncate)

    def embed(self, pipeline: UnitPipeline, p: Prepared) -> Outputs | None:
        embedder, tok, outputs = pipeline.embedder, p.tok, pipeline.settings.outputs
        n = 0 if tok is None else len(tok)
        out: Outputs = {
            name: np.empty((n, embedder.dimension), np.float32) if name == "dense" else [None] * n
            for name in outputs
        }
        if tok is None or n == 0:
            return out
        chunk = self.chunk_tokens = self.chunk_tokens or max(4 * int(embedder.max_batch_tokens), 1)
        order = np.argsort(-tok.lengths, kind="stable")
        cum = np.cumsum(tok.lengths[order])
        cuts = np.searchsorted(cum, np.arange(chunk, int(cum[-1]), chunk))
        for idx in np.split(order, np.unique(cuts[(cuts > 0) & (cuts < len(order))])):
            if pipeline.stop.is_set():
                return None
            got = embed_outputs(embedder, tok.select(idx), outputs)
            for name, values in got.items():
                if name == "dense":
                    out[name][idx] = values
                else:
                    for j, i in enumerate(idx):
                        out[name][i] = values[j]
            pipeline.progress.add(rows=len(idx), tokens=int(tok.lengths[idx].sum()))
        return out

    def close(self) -> None:
        self.streams.close()


def embed_outputs(embedder: Any, tok: Tokenized, outputs: tuple[str, ...]) -> Outputs:
    """``outputs`` of ``tok`` from one pass of the engine (dense alone takes the engine's dense
    path, ONNX graph included)."""
    found = embedder.embed_tokenized_multi(tok, outputs)
    return {name: getattr(found, name) for name in outputs}


@dataclass
class UnitPipeline:
    """A unit's steps, :meth:`prepare` -> :meth:`check` -> :meth:`embed` -> :meth:`write` (which
    records the unit), with ``modality`` doing what depends on the data. ``progress`` counts rows,
    tokens, rejects and units as they go (none shown by default); ``stop`` set abandons a unit."""

    settings: JobSettings
    embedder: Any
    plan: Plan
    state: JobState
    folder: OutputFolder
    hosts: HostPlan
    modality: Modality
    progress: Progress = field(default_factory=lambda: Progress(None, 0, mode="none"))
    stop: threading.Event = field(default_factory=threading.Event)
    embed_seconds: float = field(default=0.0, init=False)  # in embed(), over the pipeline's life

    def prepare(self, unit: Unit) -> Prepared:
        """Read ``unit``, reject what cannot be embedded, make the rest ready for the model. A unit
        whose file cannot be read is rejected whole."""
        t0 = time.perf_counter()
        if unit.error is not None:
            return failed_unit(unit, unit.error, t0)
        try:
            rows = self.modality.read(self, unit)
        except Exception as exc:
            return failed_unit(unit, f"unreadable: {type(exc).__name__}: {exc}", t0)
        p = self.modality.prepare(self, unit, rows)
        p.read_seconds = time.perf_counter() - t0
        return p

    def check(self, p: Prepared) -> None:
        """With ``--fail-fast``, raise :class:`~embedkit.errors.InputError` on ``p``'s first reject."""
        if self.settings.fail_fast and p.rejects:
            src, row, _id, reason = p.rejects[0]
            where = f"{src}" if row is None else f"{src} row {row}"
            raise InputError(
                f"{where}: {reason} (--fail-fast; rerun without it to reject such rows and go on)"
            )

    def embed(self, p: Prepared) -> Outputs | None:
        """Outputs of ``p``'s valid rows (in row order); None if the stop flag was raised first."""
        t0 = time.perf_counter()
        outputs = self.modality.embed(self, p)
        self.embed_seconds += time.perf_counter() - t0
        return outputs

    def write(self, p: Prepared, outputs: Outputs) -> dict[str, Any]:
        """Write the unit's part and rejects files, then record its marker (only now is the unit
        done). Returns the marker, with its ``key``."""
        t0 = time.perf_counter()
        unit = p.unit
        table = embeddings_table(p.ids, outputs, self.settings.dtype, p.extra) if p.num_valid else None
        rejects = rejects_table(p.rejects) if p.rejects else None
        self.folder.write_unit(unit.part_name, table, rejects)
        kinds = Counter(reason_kind(r[3]) for r in p.rejects)  # records in rejects/, by kind
        marker = {
            "source": unit.source,
            "start": unit.start,
            "stop": unit.stop,
            "part": unit.part_name if p.num_valid else None,
            "rejects": f"rejects/{unit.part_name}" if p.rejects else None,
            "rows_in": p.rows_in,
            "embedded": p.num_valid,
            "rejected": p.rows_rejected,
            "truncated": p.truncated,
            "tokens": p.tokens,
            "reject_kinds": dict(kinds),
            "failed": p.failed,
            "seconds": round(p.read_seconds + time.perf_counter() - t0, 3),
            "host": self.hosts.host,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.state.record(unit.key, marker, failed=p.failed)
        self.progress.add(units=1)
        return {"key": unit.key, **marker}

    def run_unit(self, unit: Unit) -> dict[str, Any] | None:
        """Every step of one unit, in turn; its marker, or None when stopped inside it."""
        prepared = self.prepare(unit)
        self.check(prepared)
        outputs = self.embed(prepared)
        return None if outputs is None else self.write(prepared, outputs)

    def close(self) -> None:
        """Release the modality's open files and threads."""
        self.modality.close()


class LocalRunner:
    """Runs ``pipeline`` over ``todo`` in this process, reads and writes overlapping the model.

    After :meth:`run`: ``markers`` and ``units_done`` of this run, ``interrupted`` when the stop
    flag ended it before every unit was recorded."""

    def __init__(self, pipeline: UnitPipeline, todo: list[Unit]) -> None:
        self.pipeline = pipeline
        self.todo = todo
        self.markers: list[dict[str, Any]] = []
        self.units_done = 0
        self.interrupted = False

    def _write(self, p: Prepared, outputs: Outputs) -> None:
        self.markers.append(self.pipeline.write(p, outputs))
        self.units_done += 1

    def run(self) -> None:
        if not self.todo:
            return
        pipe, todo, stop = self.pipeline, self.todo, self.pipeline.stop
        reader, writer = Background("embedkit-read"), Background("embedkit-write")
        pending_write: Future | None = None
        with StopSignals(stop) as signals:
            try:
                pending_read: Future | None = reader.submit(pipe.prepare, todo[0])
                for k in range(len(todo)):
                    if stop.is_set() or pending_read is None:
                        break
                    prepared: Prepared = pending_read.result()
                    pending_read = None
                    if k + 1 < len(todo) and not stop.is_set():
                        pending_read = reader.submit(pipe.prepare, todo[k + 1])
                    pipe.check(prepared)
                    pipe.progress.add(rejects=prepared.rows_rejected)
                    outputs = pipe.embed(prepared)
                    if outputs is None:  # stopped inside the unit: abandon it, it is not recorded
                        break
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = writer.submit(self._write, prepared, outputs)
                if pending_write is not None:
                    if stop.is_set():
                        budget = STOP_GRACE_SECONDS - (time.monotonic() - (signals.at or time.monotonic()))
                        try:
                            pending_write.result(timeout=max(budget, 1.0))
                        except TimeoutError:
                            log.warning("the last unit's write did not finish in time; it will be redone")
                    else:
                        pending_write.result()
            finally:
                if pending_write is not None and not pending_write.done():
                    # an error stopped the loop: let the unit already embedded be recorded
                    try:
                        pending_write.result(timeout=STOP_GRACE_SECONDS)
                    except Exception:
                        log.debug("the last unit's write failed after an earlier error", exc_info=True)
                reader.close()
                writer.close()
                pipe.close()
                pipe.progress.close()
        self.interrupted = stop.is_set() and self.units_done < len(todo)

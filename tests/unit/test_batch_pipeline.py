"""The unit pipeline with a stand-in modality (no model): the steps, the record, the stop flag."""

from __future__ import annotations

import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.batch.output import OutputFolder
from embedkit.batch.pipeline import LocalRunner, UnitPipeline
from embedkit.batch.plan import make_plan
from embedkit.batch.prepare import Prepared
from embedkit.batch.settings import HostPlan, JobSettings
from embedkit.batch.state import JobState
from embedkit.engine.tokenize import Tokenized
from embedkit.errors import InputError
from embedkit.io.fs import get_fs


class Embedder:
    dimension = 3


class Rows:
    """Rows 3, 7, 11... are rejected, the others' vectors are their row numbers; rows 16.. cannot be
    read when ``unreadable``. Sets the stop flag when asked to embed unit ``stop_at`` (0-based), as a
    signal would."""

    name = "fake"

    def __init__(self, stop_at: int | None = None, unreadable: bool = False) -> None:
        self.stop_at, self.unreadable, self.embedded, self.closed = stop_at, unreadable, 0, False

    def plan(self, settings):
        return make_plan(settings.input, unit_rows=settings.unit_rows)

    def read(self, pipeline, unit):
        if unit.start == 16 and self.unreadable:
            raise OSError("disk on fire")
        return range(unit.start, unit.stop)

    def prepare(self, pipeline, unit, rows):
        out = Prepared(unit=unit, rows_in=len(rows))
        for row in rows:
            if row % 4 == 3:
                out.rejects.append((unit.source, row, str(row), "empty text"))
            else:
                out.ids.append(str(row))
        out.rows_rejected = len(out.rejects)
        return out

    def embed(self, pipeline, p):
        if self.embedded == self.stop_at:
            pipeline.stop.set()
            return None
        self.embedded += 1
        return {"dense": np.array([[float(i)] * 3 for i in p.ids], np.float32)}

    def close(self):
        self.closed = True


def _pipeline(tmp_path, modality, **options) -> UnitPipeline:
    inp, out = tmp_path / "in", str(tmp_path / "out")
    inp.mkdir()
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(24)]}), inp / "a.parquet", row_group_size=8)
    settings = JobSettings.build({"input": str(inp), "output": out, "unit_rows": 8, **options})
    fs, root = get_fs(out)
    state = JobState(fs, root, {"test": 1})
    state.check(overwrite=False)
    folder = OutputFolder(fs, root)
    host = HostPlan(1, 0, "h", ("h",))
    return UnitPipeline(settings, Embedder(), modality.plan(settings), state, folder, host, modality)


def test_run_unit_writes_the_part_and_rejects_then_records_the_unit(tmp_path):
    pipe = _pipeline(tmp_path, Rows())
    unit = pipe.plan.units[1]
    marker = pipe.run_unit(unit)
    assert marker["key"] == unit.key and (marker["embedded"], marker["rejected"]) == (6, 2)
    assert marker["reject_kinds"] == {"empty text": 2} and marker["host"] == "h"
    assert pipe.state.scan() == {unit.key: False} and pipe.progress.units == 1
    part = pq.read_table(tmp_path / "out" / unit.part_name)
    assert part.column("id").to_pylist() == ["8", "9", "10", "12", "13", "14"]
    assert part.column("embedding").to_pylist()[0] == [8.0] * 3
    rejects = pq.read_table(tmp_path / "out" / "rejects" / unit.part_name).to_pylist()
    assert [r["row"] for r in rejects] == [11, 15]


def test_an_unreadable_unit_is_rejected_whole_and_recorded_as_failed(tmp_path):
    pipe = _pipeline(tmp_path, Rows(unreadable=True))
    unit = pipe.plan.units[2]
    marker = pipe.run_unit(unit)
    assert (marker["failed"], marker["embedded"], marker["rejected"], marker["part"]) == (True, 0, 8, None)
    assert marker["reject_kinds"] == {"unreadable": 8} and pipe.state.scan() == {unit.key: True}
    rejects = pq.read_table(tmp_path / "out" / "rejects" / unit.part_name).to_pylist()
    assert rejects[0]["reason"] == "unreadable: OSError: disk on fire" and len(rejects) == 8


def test_fail_fast_raises_on_the_first_reject_and_records_nothing(tmp_path):
    pipe = _pipeline(tmp_path, Rows(), fail_fast=True)
    with pytest.raises(InputError, match=r"a.parquet row 3: empty text \(--fail-fast"):
        pipe.run_unit(pipe.plan.units[0])
    assert pipe.state.scan() == {}


def test_local_runner_stopped_inside_a_unit_records_the_units_before_it_only(tmp_path):
    modality = Rows(stop_at=1)
    pipe = _pipeline(tmp_path, modality)
    runner = LocalRunner(pipe, pipe.plan.units)
    handler = signal.getsignal(signal.SIGTERM)
    runner.run()
    first = pipe.plan.units[0].key
    assert runner.interrupted and runner.units_done == 1 and [m["key"] for m in runner.markers] == [first]
    assert pipe.state.scan() == {first: False} and modality.closed
    assert signal.getsignal(signal.SIGTERM) is handler  # the job's handlers are gone again


def test_drop_keeps_rejects_in_row_order_and_the_valid_rows_aligned(tmp_path):
    pipe = _pipeline(tmp_path, Rows())
    p = pipe.prepare(pipe.plan.units[0])  # rows 3 and 7 rejected
    lengths = np.arange(1, 7)
    p.tok = Tokenized([np.arange(k) for k in lengths], lengths, lengths, np.zeros(6, bool))
    p.records = list(range(6))
    p.drop([(p.unit.source, 1, "1", "too long: 9 tokens")], [0, 2, 3, 4, 5])
    assert [r[1] for r in p.rejects] == [1, 3, 7] and p.rows_rejected == 3
    assert p.ids == ["0", "2", "4", "5", "6"] and p.records == [0, 2, 3, 4, 5]
    assert p.tok.lengths.tolist() == [1, 3, 4, 5, 6] and p.tokens == 19


def test_the_ray_drivers_helper_stops_taking_units_when_the_pool_ends_or_fails_to_start():
    """The driver embeds units while its Ray starts; if the pool then fails (or ends), finish() must
    stop it after the unit in hand, not leave it to run the whole job first."""
    import threading
    import time
    from types import SimpleNamespace

    from embedkit.batch.ray_runner import driver

    class SlowPipeline:
        embed_seconds = 0.0
        progress = SimpleNamespace(add=lambda **kw: None)

        def run_unit(self, unit):
            time.sleep(0.05)
            return {"key": unit, "rejected": 0}

    runner = SimpleNamespace(
        stop=threading.Event(),
        _lock=threading.Lock(),
        _queue=list(reversed(range(100))),
        todo=[f"u{i}" for i in range(100)],
        pipeline=SlowPipeline(),
        markers=[],
        units_done=0,
        driver_units=0,
        embed_seconds=0.0,
    )
    helper = driver._DriverHelper(runner)
    helper.start()
    time.sleep(0.2)
    helper.finish()  # the pool failed to start: e.g. more workers than the machine holds
    assert 1 <= runner.driver_units == runner.units_done == len(runner.markers) < 20
    taken = 100 - len(runner._queue)
    assert taken == runner.driver_units  # every unit taken was recorded; the rest stay queued
    assert [m["key"] for m in runner.markers] == [f"u{k}" for k in range(99, 99 - taken, -1)]

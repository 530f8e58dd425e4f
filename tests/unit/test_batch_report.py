"""Progress a person can watch (a bar on a terminal), log lines a machine can parse, the summary."""

from __future__ import annotations

import io
import json
import logging
import re

from embedkit.batch.report import JobSummary, Progress, totals
from embedkit.logs import JsonFormatter


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_shows_rows_rate_tokens_eta_and_rejects():
    stream = _Tty()
    p = Progress(1000, 4, mode="auto", stream=stream)
    assert p.mode == "bar"
    p.add(rows=250, tokens=5000, rejects=3)
    p.tick(force=True)
    p.close()
    line = stream.getvalue().split("\r")[-1]
    assert "250/1,000 rows" in line and "rows/s" in line and "tok/s" in line
    assert "ETA " in line and "ETA ?" not in line and "rejects 3" in line and "25.3%" in line
    assert stream.getvalue().endswith("\n")


def test_elsewhere_progress_is_structured_log_lines(caplog):
    stream = io.StringIO()  # not a terminal: no bar is drawn
    p = Progress(None, 2, mode="auto", log_every=0.0, stream=stream)
    assert p.mode == "log"
    with caplog.at_level(logging.INFO, logger="embedkit.batch"):
        p.add(rows=10, tokens=100, units=1)
    assert stream.getvalue() == ""
    record = [r for r in caplog.records if getattr(r, "event", None) == "progress"][-1]
    assert (record.rows, record.units_done, record.units_total, record.eta_s) == (10, 1, 2, None)
    as_json = json.loads(JsonFormatter().format(record))
    assert as_json["rows"] == 10 and as_json["event"] == "progress" and "rows_per_s" in as_json


def test_totals_and_summary_table_count_each_kind():
    markers = [
        {"source": "a.parquet", "rows_in": 10, "embedded": 8, "rejected": 2, "truncated": 1, "tokens": 90,
         "reject_kinds": {"null text": 2}, "host": "h1", "stop": 10},
        {"source": "b.csv", "rows_in": 0, "embedded": 0, "rejected": 0, "failed": True, "stop": None,
         "reject_kinds": {"unreadable": 1}, "host": "h2"},
    ]  # fmt: skip
    t = totals(markers)
    assert (t["rows_in"], t["embedded"], t["rejected"], t["truncated"], t["files_rejected"]) == (
        10,
        8,
        2,
        1,
        1,
    )
    assert t["reject_kinds"] == {"null text": 2, "unreadable": 1} and t["hosts"] == ["h1", "h2"]
    assert t["files"]["b.csv"]["unreadable"] == 1
    s = JobSummary("out/", "h1", 1, 0, 2, 0, 2, rows_in=10, rows_embedded=8, rows_rejected=2,
                   reject_kinds=t["reject_kinds"], rows_embedded_this_run=8, wall_seconds=2.0, complete=True)  # fmt: skip
    table = s.table()
    assert re.search(r"^status +complete$", table, re.M) and re.search(r"^rows rejected +2$", table, re.M)
    assert "rejected: unreadable" in table and "4.0 rows/s" in table
    assert s.to_dict()["rows_per_second"] == 4.0

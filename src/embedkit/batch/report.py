"""What the job tells people and machines: live progress, the final summary, ``metadata.json``."""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

log = logging.getLogger("embedkit.batch")


def _fmt_secs(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _fmt_num(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:,.0f}"


class Progress:
    """Live progress: a bar redrawn on a terminal, periodic structured log lines elsewhere.

    ``mode``: ``auto`` (bar when ``stream`` is a TTY, else log), ``bar``, ``log`` or ``none``."""

    def __init__(
        self,
        total_rows: int | None,
        total_units: int,
        *,
        mode: str = "auto",
        log_every: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.total_rows = total_rows or None
        self.total_units = total_units
        self.log_every = log_every
        self.rows = self.tokens = self.rejects = self.units = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._drawn = False
        self._lock = threading.Lock()

    @classmethod
    def for_units(cls, units: Sequence[Any], settings: Any, stream: TextIO | None = None) -> Progress:
        """Progress over a job's units (``.rows`` each, None where a CSV / JSON Lines file's length
        is unknown, and then the row total is unknown too), in the job settings' mode."""
        known = all(u.rows is not None for u in units)
        return cls(
            sum(u.rows or 0 for u in units) if known else None,
            len(units),
            mode=settings.progress,
            log_every=settings.log_every,
            stream=stream,
        )

    def add(self, *, rows: int = 0, tokens: int = 0, rejects: int = 0, units: int = 0) -> None:
        with self._lock:
            self.rows += rows
            self.tokens += tokens
            self.rejects += rejects
            self.units += units
            self.tick()

    def snapshot(self) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.rows / dt
        done = self.rows + self.rejects
        eta = (self.total_rows - done) / rate if self.total_rows and rate > 0 else None
        return {
            "rows": self.rows,
            "rows_total": self.total_rows,
            "rejects": self.rejects,
            "units_done": self.units,
            "units_total": self.total_units,
            "rows_per_s": round(rate, 1),
            "tokens_per_s": round(self.tokens / dt, 1),
            "eta_s": None if eta is None else round(max(eta, 0.0), 1),
            "elapsed_s": round(dt, 1),
        }

    def tick(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.mode == "bar" and (force or now - self._last >= 0.2):
            self._last = now
            self._draw(self.snapshot())
        elif self.mode == "log" and (force or now - self._last >= self.log_every):
            self._last = now
            s = self.snapshot()
            total = f"/{s['rows_total']:,}" if s["rows_total"] else ""
            log.info(
                "progress: %s%s rows, units %d/%d, %s rows/s, %s tokens/s, %d rejects, ETA %s",
                f"{s['rows']:,}",
                total,
                s["units_done"],
                s["units_total"],
                _fmt_num(s["rows_per_s"]),
                _fmt_num(s["tokens_per_s"]),
                s["rejects"],
                _fmt_secs(s["eta_s"]),
                extra={"event": "progress", **s},
            )

    def _draw(self, s: dict[str, Any]) -> None:
        done = s["rows"] + s["rejects"]
        frac = min(done / s["rows_total"], 1.0) if s["rows_total"] else None
        width = shutil.get_terminal_size((100, 20)).columns
        head = f" {frac * 100:5.1f}%" if frac is not None else ""
        total = f"/{s['rows_total']:,}" if s["rows_total"] else ""
        tail = (
            f"{s['rows']:,}{total} rows | {_fmt_num(s['rows_per_s'])} rows/s | "
            f"{_fmt_num(s['tokens_per_s'])} tok/s | ETA {_fmt_secs(s['eta_s'])} | rejects {s['rejects']:,}"
        )
        bar_w = max(width - len(head) - len(tail) - 6, 0)
        bar = ""
        if frac is not None and bar_w >= 10:
            fill = int(bar_w * frac)
            bar = "[" + "#" * fill + "-" * (bar_w - fill) + "]"
        line = f"{bar}{head} {tail}"[: width - 1]
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        with self._lock:
            self.tick(force=True)
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class JobSummary:
    """What :func:`embedkit.batch.embed_dataset` did. Totals cover this host's share of the job,
    this run and earlier runs alike; ``*_this_run`` fields only this run."""

    output: str
    host: str
    num_shards: int
    shard_index: int
    units_total: int  # units of this host's share
    units_skipped: int  # recorded by an earlier run
    units_processed: int  # this run
    rows_in: int = 0
    rows_embedded: int = 0
    rows_rejected: int = 0
    rows_truncated: int = 0
    tokens: int = 0
    files_rejected: int = 0
    reject_kinds: dict[str, int] = field(default_factory=dict)
    rows_embedded_this_run: int = 0
    tokens_this_run: int = 0
    wall_seconds: float = 0.0
    complete: bool = False  # every unit of every host is recorded
    interrupted: bool = False
    metadata_path: str | None = None
    single_file: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows_embedded_this_run / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows_per_second"] = round(self.rows_per_second, 2)
        d["tokens_per_second"] = round(self.tokens_per_second, 2)
        return d

    def table(self) -> str:
        """The summary as an aligned two-column table."""
        status = "interrupted" if self.interrupted else ("complete" if self.complete else "this share done")
        rows = [
            ("status", status),
            ("output", self.output),
            ("host", f"{self.host} (shard {self.shard_index + 1} of {self.num_shards})"),
            (
                "units",
                f"{self.units_processed} processed, {self.units_skipped} skipped, {self.units_total} total",
            ),
            ("rows in", f"{self.rows_in:,}"),
            ("rows embedded", f"{self.rows_embedded:,}"),
            ("rows rejected", f"{self.rows_rejected:,}"),
            ("rows truncated", f"{self.rows_truncated:,}"),
            ("tokens", f"{self.tokens:,}"),
            ("wall time", f"{self.wall_seconds:.1f}s"),
            ("throughput", f"{self.rows_per_second:,.1f} rows/s, {self.tokens_per_second:,.0f} tokens/s"),
        ]
        if self.files_rejected:
            rows.append(("files rejected", f"{self.files_rejected:,}"))
        for kind, n in sorted(self.reject_kinds.items()):
            rows.append((f"  rejected: {kind}", f"{n:,}"))
        if self.metadata_path:
            rows.append(("metadata", self.metadata_path))
        if self.single_file:
            rows.append(("merged", self.single_file))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def totals(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum unit markers into dataset totals, per-file counts and reject kinds."""
    out = Counter()
    kinds: Counter = Counter()
    files: dict[str, Counter] = {}
    hosts: set[str] = set()
    for m in markers:
        for k in ("rows_in", "embedded", "rejected", "truncated", "tokens"):
            out[k] += int(m.get(k, 0))
        out["seconds"] += float(m.get("seconds", 0.0))
        out["files_rejected"] += int(bool(m.get("failed")) and m.get("stop") is None)
        kinds.update(m.get("reject_kinds", {}))
        f = files.setdefault(m["source"], Counter())
        for k in ("rows_in", "embedded", "rejected", "truncated"):
            f[k] += int(m.get(k, 0))
        f["units"] += 1
        if m.get("failed"):
            f["unreadable"] = 1
        hosts.add(m.get("host", "?"))
    return {
        "rows_in": out["rows_in"],
        "embedded": out["embedded"],
        "rejected": out["rejected"],
        "truncated": out["truncated"],
        "tokens": out["tokens"],
        "unit_seconds": round(out["seconds"], 3),
        "files_rejected": out["files_rejected"],
        "reject_kinds": dict(sorted(kinds.items())),
        "files": {k: dict(v) for k, v in sorted(files.items())},
        "hosts": sorted(hosts),
    }


def versions() -> dict[str, str]:
    """Versions of what made the vectors."""
    import numpy
    import pyarrow
    import torch
    import transformers

    from embedkit import __version__

    return {
        "embedkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }

"""The job's state in ``OUTPUT/_state/``: what settings made it, and which units are done.

``job.json`` holds the job's fingerprint (a rerun with another refuses unless ``--overwrite``);
``units/<unit key>@<fingerprint id>.json`` is one marker per unit, written once its files are
durable (no shared manifest is ever rewritten); ``merged.json`` follows ``--single-file``'s merge.
Why this makes a job exactly-once: docs/batch-jobs.md, "Resume and exactly once".
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import fsspec

from embedkit.errors import JobStateError
from embedkit.io.fs import (
    TMP_PREFIX,
    is_remote_fs,
    join_fs,
    list_names,
    older_than,
    read_json,
    remove,
    write_json,
)

log = logging.getLogger(__name__)

STATE_DIR = "_state"
FORMAT = "embedkit.batch/1"


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """Short stable hash of a fingerprint dict."""
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class JobState:
    """Read and write the state of the job whose output is ``root`` (a path inside ``fs``)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, fingerprint: dict[str, Any]) -> None:
        self.fs = fs
        self.root = root.rstrip("/") if is_remote_fs(fs) else root
        self.fingerprint = fingerprint
        self.fp_id = fingerprint_id(fingerprint)
        self.dir = join_fs(fs, self.root, STATE_DIR)
        self.units_dir = join_fs(fs, self.dir, "units")

    # ------------------------------------------------------------- the job
    def exists(self) -> bool:
        """True when the output already holds a job's state (``job.json`` or unit markers)."""
        return read_json(self.fs, join_fs(self.fs, self.dir, "job.json")) is not None or bool(
            self._marker_names()
        )

    def check(self, *, overwrite: bool) -> bool:
        """Compare with the recorded job; record this one. Returns True when the output already
        held a job with other settings (and ``overwrite`` allowed replacing it)."""
        job_path = join_fs(self.fs, self.dir, "job.json")
        previous = read_json(self.fs, job_path)
        replaced = False
        if previous is None:
            foreign = [m for m in self._marker_names() if not m.endswith(f"@{self.fp_id}.json")]
            if foreign and not overwrite:
                raise JobStateError(
                    f"{self.root} holds units of another job but no {STATE_DIR}/job.json; refusing to mix "
                    f"vectors; rerun with --overwrite to replace them, or choose another output"
                )
            replaced = bool(foreign)
        elif previous.get("fingerprint_id") != self.fp_id:
            old = previous.get("fingerprint", {})
            keys = [*self.fingerprint, *(k for k in old if k not in self.fingerprint)]
            new = self.fingerprint
            diff = {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)} or {
                "fingerprint": (previous.get("fingerprint_id"), self.fp_id)
            }
            if not overwrite:
                changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise JobStateError(
                    f"{self.root} holds a job made with other settings ({changes}); refusing to mix "
                    f"vectors. Rerun with the same settings to resume, --overwrite to replace it, "
                    f"or choose another output folder"
                )
            log.warning("replacing the job in %s (--overwrite): %s", self.root, sorted(diff))
            replaced = True
        if previous is None or replaced:
            write_json(
                self.fs,
                job_path,
                {
                    "format": FORMAT,
                    "fingerprint_id": self.fp_id,
                    "fingerprint": self.fingerprint,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
        return replaced

    # ----------------------------------------------------------- the units
    def _marker_names(self) -> list[str]:
        return list_names(self.fs, self.units_dir)

    def _parse(self, name: str) -> tuple[str, bool] | None:
        """``(key, failed)`` of a marker of this fingerprint, else None."""
        if name.startswith(TMP_PREFIX):
            return None
        for suffix, failed in ((f"@{self.fp_id}.json", False), (f"@{self.fp_id}.failed.json", True)):
            if name.endswith(suffix):
                return name[: -len(suffix)], failed
        return None

    def scan(self) -> dict[str, bool]:
        """Recorded units of this fingerprint: key -> True when the unit could not be read (a rerun
        retries those), False when it was embedded."""
        out: dict[str, bool] = {}
        for name in self._marker_names():
            parsed = self._parse(name)
            if parsed:
                key, failed = parsed
                out[key] = out.get(key, True) and failed
        return out

    def done_keys(self) -> set[str]:
        """Keys of the units recorded by a run with this fingerprint (unreadable ones included)."""
        return set(self.scan())

    def marker_path(self, key: str, failed: bool = False) -> str:
        tail = ".failed.json" if failed else ".json"
        return join_fs(self.fs, self.units_dir, f"{key}@{self.fp_id}{tail}")

    def record(self, key: str, info: dict[str, Any], *, failed: bool = False) -> None:
        """Record unit ``key`` as done. Call only once its files are durable. ``failed``: the unit
        could not be read (its rows are in rejects/); a rerun tries it again."""
        write_json(self.fs, self.marker_path(key, failed), {"key": key, "fingerprint_id": self.fp_id, **info})
        if not failed:
            remove(self.fs, self.marker_path(key, True))

    def markers(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Contents of the markers of this fingerprint (all, or those of ``keys``), one per unit."""
        scanned = self.scan()
        wanted = sorted(scanned if keys is None else set(keys) & set(scanned))
        paths = [self.marker_path(k, scanned[k]) for k in wanted]
        if not paths:
            return []
        blobs = self.fs.cat(paths)  # concurrent on object stores
        return [json.loads(blobs[p]) for p in paths if p in blobs]

    def remove_stale(self, keep_keys: set[str], *, all_temp: bool) -> int:
        """Delete markers of other fingerprints, of units outside the plan, failed markers of units
        since embedded, and (``all_temp``) temp files a killed run left behind."""
        n = 0
        scanned = self.scan()
        for name in self._marker_names():
            path = join_fs(self.fs, self.units_dir, name)
            if name.startswith(TMP_PREFIX):
                stale = all_temp or older_than(self.fs, path)
            else:
                parsed = self._parse(name)
                stale = (
                    parsed is None
                    or parsed[0] not in keep_keys
                    or (parsed[1] and scanned.get(parsed[0]) is False)
                )
            if stale and remove(self.fs, path):
                n += 1
        return n

    # -------------------------------------------------------------- merging
    def merged(self) -> bool:
        m = read_json(self.fs, join_fs(self.fs, self.dir, "merged.json"))
        return bool(m) and m.get("fingerprint_id") == self.fp_id

    def record_merged(self, info: dict[str, Any]) -> None:
        write_json(self.fs, join_fs(self.fs, self.dir, "merged.json"), {"fingerprint_id": self.fp_id, **info})

    def clear_merged(self) -> None:
        remove(self.fs, join_fs(self.fs, self.dir, "merged.json"))

"""Turn measurements into rows, a printed table, and JSON under ``bench/results/``.

>>> print(format_table([{"config": "baseline", "texts_per_s": 100.0, "ratio": 1.0}]))
config    texts/s  tokens/s  ratio  vs engine  min cos  MFU  RSS MiB
--------  -------  --------  -----  ---------  -------  ---  -------
baseline  100      -         1.00x  -          -        -    -
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- numbers
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(baseline_s: Sequence[float], candidate_s: Sequence[float]) -> float:
    """Speed-up of the candidate over the baseline: the median of per-round ``baseline / candidate``.

    Rounds were interleaved (A B A B), so pairing them cancels slow drift of a shared machine."""
    if len(baseline_s) != len(candidate_s) or not baseline_s:
        raise ValueError("need the same, non-zero number of baseline and candidate timings")
    return median([b / c for b, c in zip(baseline_s, candidate_s, strict=True)])


def cosine_stats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Row-wise cosine similarity (min and mean) and the max absolute difference."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape {candidate.shape} differs from the reference's {reference.shape}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    num = (ref * cand).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = num / np.maximum(den, 1e-30)
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(ref - cand).max()),
    }


# ------------------------------------------------------------------------------------------ table
def _num(v: float) -> str:
    if v >= 100_000:
        return f"{v / 1000:.0f}k"
    if v >= 10_000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("config", "config", str),
    ("texts/s", "texts_per_s", _num),
    ("tokens/s", "tokens_per_s", _num),
    ("ratio", "ratio", lambda v: f"{v:.2f}x"),
    ("vs engine", "vs_engine", lambda v: f"{v:.2f}x"),
    ("min cos", "min_cosine", lambda v: f"{v:.5f}"),
    ("MFU", "mfu", lambda v: f"{100 * v:.1f}%"),
    ("RSS MiB", "peak_rss_mib", lambda v: f"{v:.0f}"),
]


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells; a missing or None value shows as ``-``."""
    header = [h for h, _k, _f in COLUMNS]
    cells = [[("-" if r.get(k) is None else fmt(r[k])) for _h, k, fmt in COLUMNS] for r in rows]
    return header, cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    header, cells = table_cells(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    lines = [header, ["-" * w for w in widths], *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header, cells = table_cells(rows)
    align = ["---"] + ["--:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, align, *cells])


# ---------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or platform.machine()


def cpu_flags(
    wanted: Sequence[str] = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx2"),
) -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:  # pragma: no cover
        pass
    return []


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):  # pragma: no cover
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "embedkit": git_commit(),
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line: CPU, cores, torch and threads, commit."""
    commit = (m.get("embedkit") or {}).get("commit") or "unknown"
    dirty = "+local changes" if (m.get("embedkit") or {}).get("dirty") else ""
    flags = ", ".join(m.get("cpu_flags") or []) or "no avx512/amx"
    return (
        f"{m.get('cpu_model')} ({m.get('cpu_count')} cores; {flags}), {m.get('memory_gib')} GiB, "
        f"torch {m.get('torch')} with {m.get('threads')} threads, Python {m.get('python')}, "
        f"embedkit {commit[:10]}{dirty}"
    )


# ------------------------------------------------------------------------------------------- JSON
def print_and_save(text: str, result: dict[str, Any], json_out: str | None) -> int:
    """A bench script's ending: print ``text`` (its summary) and, with ``--json-out``, write ``result``
    there as JSON. Returns main's exit code, 0."""
    print(text)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return 0


def write_results(
    result: dict[str, Any], results_dir: Path = RESULTS_DIR, *, quick: bool = False
) -> tuple[Path, Path]:
    """``<UTC timestamp>.json`` and ``latest.json`` (written atomically); quick runs get a ``-quick``
    suffix so a smoke run never replaces the committed full results."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-quick" if quick else ""
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    paths = (results_dir / f"{stamp}{suffix}.json", results_dir / f"latest{suffix}.json")
    for path in paths:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths

"""The ``job`` section of ``make bench``: the batch job end to end (Parquet in, Parquet out) against
the engine's in-memory throughput on the same texts, in the same call, at the same precision.

``run(texts, precision, workdir)`` (called by :mod:`bench.run`):

1. writes ``texts`` as 4 Parquet files (so the job runs several units, overlapping read/write with
   compute) and warms the engine up;
2. times ``Embedder.encode(texts)`` (in memory), then ``embed_dataset`` (files to files, planning,
   state and metadata included), then ``encode`` again: the engine rate is the mean of the two
   encodes that bracket the job, so machine drift cancels out of the ratio;
3. measures peak RSS of the job in two child processes, on 2k rows of the texts and on 10x that
   (20k rows, same unit size): memory must stay bounded by the unit, not grow with the dataset.

Returns ``texts``, ``seconds``, ``texts_per_s``, ``tokens`` (what the harness reads), the engine's
rate and the ``vs_engine_same_call`` ratio (target >= 0.9), the RSS numbers (target ratio <= 1.1)
and ``vectors`` (the job's output in input order, which the harness compares with its baseline).

    python -m bench.bench_job --n 2000 --precision fp32      # stand-alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FILES = 4
RSS_ROWS = 2000
RSS_SCALE = 10
RSS_TARGET = 1.1


def write_dataset(texts: list[str], folder: Path, files: int = FILES, row_group: int = 1000) -> Path:
    """``texts`` as ``files`` Parquet files with ids ``t<index>`` (so output maps back to input)."""
    folder.mkdir(parents=True, exist_ok=True)
    per = math.ceil(len(texts) / files)
    for f in range(files):
        chunk = texts[f * per : (f + 1) * per]
        ids = [f"t{f * per + i:09d}" for i in range(len(chunk))]
        pq.write_table(
            pa.table({"id": ids, "text": chunk}), folder / f"part-{f:03d}.parquet", row_group_size=row_group
        )
    return folder


def prepare(
    texts: list[str],
    workdir: str,
    files: int,
    min_unit_rows: int,
    precision: str,
    model: str = "default",
    device: str = "cpu",
) -> tuple[Path, int, Path, Any]:
    """A job bench's start: ``texts`` as ``files`` Parquet files of one unit each (at least
    ``min_unit_rows`` rows) under ``workdir``/in, and a warmed-up engine. Returns the workdir, the
    unit size, the input folder and the engine."""
    from embedkit import Embedder

    work = Path(workdir)
    unit_rows = max(min_unit_rows, math.ceil(len(texts) / files))
    inp = write_dataset(texts, work / "in", files=files, row_group=unit_rows)
    emb = Embedder(model, device=device, precision=precision)
    emb.warmup()
    return work, unit_rows, inp, emb


def read_vectors(out: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(sorted(str(p) for p in out.glob("part-*.parquet")))
    table = table.sort_by("id")
    emb = table.column("embedding").combine_chunks()
    vecs = (
        emb.flatten()
        .to_numpy(zero_copy_only=False)
        .astype(np.float32)
        .reshape(len(table), emb.type.list_size)
    )
    return table.column("id").to_pylist(), vecs


def _child_rss(inp: Path, out: Path, precision: str, model: str, unit_rows: int) -> dict[str, Any]:
    """Run the job in a fresh process; its own peak RSS (VmHWM) and rate come back as JSON."""
    cmd = [sys.executable, "-m", "bench.bench_job", "child", str(inp), str(out), "--precision", precision]
    cmd += ["--model", model, "--unit-rows", str(unit_rows)]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "src")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"job child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    texts: list[str],
    precision: str,
    workdir: str,
    *,
    model: str = "default",
    device: str = "cpu",
    rss: bool = True,
    rss_rows: int = RSS_ROWS,
    rss_scale: int = RSS_SCALE,
) -> dict[str, Any]:
    """Job vs in-memory engine on ``texts`` at ``precision``; files go under ``workdir``."""
    from embedkit.batch import embed_dataset

    # One unit per file: several units in flight (read / embed / write overlap), each large enough
    # that its token-budget batches pad as little as the engine's over the whole corpus.
    work, unit_rows, inp, emb = prepare(texts, workdir, FILES, 64, precision, model=model, device=device)

    cpu: dict[str, float] = {}

    def engine() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        emb.encode(texts)
        cpu["engine"] = cpu.get("engine", 0.0) + (time.process_time() - c0) / 2
        return time.perf_counter() - t0

    e1 = engine()
    t0, c0 = time.perf_counter(), time.process_time()
    summary = embed_dataset(
        str(inp),
        str(work / "out"),
        embedder=emb,
        unit_rows=unit_rows,
        id_column="id",
        progress="none",
        overwrite=True,
    )
    job_s = time.perf_counter() - t0
    cpu["job"] = time.process_time() - c0
    e2 = engine()
    if summary.rows_embedded != len(texts):
        raise RuntimeError(f"the job embedded {summary.rows_embedded} of {len(texts)} texts")
    engine_s = (e1 + e2) / 2
    ids, vecs = read_vectors(work / "out")
    if ids != [f"t{i:09d}" for i in range(len(texts))]:
        raise RuntimeError("the job's output ids do not match its input rows one to one")
    out: dict[str, Any] = {
        "texts": len(texts),
        "seconds": job_s,
        "texts_per_s": len(texts) / job_s,
        "tokens": summary.tokens,
        "tokens_per_s": summary.tokens / job_s,
        "engine_seconds": engine_s,
        "engine_texts_per_s": len(texts) / engine_s,
        "vs_engine_same_call": engine_s / job_s,
        # CPU seconds (all threads) per run: on a shared machine the steadier view of the job's overhead
        "cpu_seconds": {"engine": cpu["engine"], "job": cpu["job"], "ratio": cpu["engine"] / cpu["job"]},
        "units": summary.units_processed,
        "unit_rows": unit_rows,
        "precision": emb.precision,
        "vectors": vecs,
    }
    if rss:
        step = max(1, len(texts) // rss_rows)
        base = texts[::step][:rss_rows]
        small = write_dataset(base, work / "rss-1x", row_group=max(1, len(base) // 8))
        big = write_dataset(
            base * rss_scale,
            work / f"rss-{rss_scale}x",
            files=FILES * rss_scale,
            row_group=max(1, len(base) // 8),
        )
        unit = max(1, len(base) // 4)
        r1 = _child_rss(small, work / "rss-1x-out", precision, model, unit)
        rn = _child_rss(big, work / f"rss-{rss_scale}x-out", precision, model, unit)
        out["rss"] = {
            "rows_1x": len(base),
            f"rows_{rss_scale}x": len(base) * rss_scale,
            "unit_rows": unit,
            "peak_rss_mib_1x": r1["peak_rss_mib"],
            f"peak_rss_mib_{rss_scale}x": rn["peak_rss_mib"],
            "ratio": rn["peak_rss_mib"] / r1["peak_rss_mib"],
            "target_ratio": RSS_TARGET,
            f"texts_per_s_{rss_scale}x_child": rn["texts_per_s"],
        }
    return out


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> int:
    from embedkit.batch import embed_dataset

    t0 = time.perf_counter()
    s = embed_dataset(
        args.input,
        args.output,
        model=args.model,
        precision=args.precision,
        unit_rows=args.unit_rows,
        id_column="id",
        progress="none",
        overwrite=True,
        device="cpu",
    )
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {"peak_rss_mib": _peak_rss_mib(), "rows": s.rows_embedded, "texts_per_s": s.rows_embedded / dt}
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_job", description=__doc__)
    sub = p.add_subparsers(dest="mode")
    c = sub.add_parser("child", help="(internal) run one job and print its peak RSS as JSON")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--precision", default="fp32")
    c.add_argument("--model", default="default")
    c.add_argument("--unit-rows", type=int, default=250)
    p.add_argument("--n", type=int, default=2000, help="texts from the benchmark corpus (stand-alone run)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--no-rss", action="store_true")
    args = p.parse_args(argv)
    if args.mode == "child":
        return _child(args)
    from bench.corpus import build_corpus

    texts = build_corpus()[: args.n]
    with tempfile.TemporaryDirectory(prefix="embedkit-bench-job-") as tmp:
        res = run(texts, args.precision, tmp, rss=not args.no_rss)
    res.pop("vectors", None)
    print(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

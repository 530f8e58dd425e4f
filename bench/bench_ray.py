"""The ``ray`` section of ``make bench``: the batch job on the Ray engine against the local engine, on
the same Parquet input, at the same precision, in the same call.

``run(texts, precision, workdir)`` (called by :mod:`bench.run`):

1. writes ``texts`` as 8 Parquet files (8 units, so two workers share the work) and starts a local Ray
   (``ray_init_s``: a cluster is normally up before a job starts, so it is reported, not charged);
2. times the job with ``--engine local``, then ``--engine ray`` with 1 worker and with 2 workers,
   then local again: the local rate is the mean of the two local runs that bracket the Ray runs, so
   machine drift cancels out of the ratios;
3. checks that each Ray output equals the local one (ids, and vectors within 1e-6).

A Ray run's wall time includes its start-up (``startup_s``: until the first actor has started and
loaded the model), a fixed cost that a long job amortises; ``warm_rows_per_s`` divides the rows by
``pool_s``, the time from the first actor ready to the last unit recorded (Ray's per-unit overhead,
without the start-up).

Returns ``texts``, ``seconds``, ``texts_per_s`` (the 1-worker Ray run, what the harness tabulates), the
per-engine rates, the ``ray1_vs_local`` / ``ray2_vs_local`` ratios (end to end) and
``ray1_warm_vs_local`` / ``ray2_warm_vs_local`` (once started; target: 1 worker within 15% of local,
i.e. >= 0.85), and ``vectors`` (the 2-worker output in input order).

    python -m bench.bench_ray --n 2000 --precision fp32      # stand-alone
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray  # the harness reports the section as skipped when the ray extra is not installed

from bench.bench_job import read_vectors, write_dataset

FILES = 8


def _job(inp: Path, out: Path, emb: Any, unit_rows: int, **engine: Any) -> dict[str, Any]:
    from embedkit.batch import embed_dataset

    t0 = time.perf_counter()
    summary = embed_dataset(
        str(inp), str(out), embedder=emb, unit_rows=unit_rows, id_column="id", progress="none", **engine
    )
    wall = time.perf_counter() - t0
    meta = json.loads((out / "metadata.json").read_text())
    runner = meta.get("runner") or {}
    row: dict[str, Any] = {
        "seconds": wall,
        "rows": summary.rows_embedded,
        "rows_per_s": summary.rows_embedded / wall,
    }
    if runner:
        row.update(
            startup_s=runner["startup_seconds"],
            pool_s=runner["pool_seconds"],
            warm_rows_per_s=summary.rows_embedded / max(runner["pool_seconds"], 1e-9),
            workers={k: v["units"] for k, v in runner["workers"].items()},
            cpus_per_worker=runner["sizing"]["cpus_per_worker"],
            threads_per_worker=runner["sizing"]["threads"],
            load_s=max((v["load_seconds"] for v in runner["workers"].values()), default=None),
        )
    return row


def run(
    texts: list[str], precision: str, workdir: str, *, model: str = "default", device: str = "cpu"
) -> dict[str, Any]:
    """Local engine vs Ray engine (1 and 2 workers) on ``texts`` at ``precision``; files under ``workdir``."""
    from embedkit import Embedder

    work = Path(workdir)
    unit_rows = max(16, math.ceil(len(texts) / FILES))
    inp = write_dataset(texts, work / "in", files=FILES, row_group=unit_rows)
    emb = Embedder(model, device=device, precision=precision)
    emb.warmup()
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=len(os.sched_getaffinity(0)),
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray_init_s = time.perf_counter() - t0
    try:
        local1 = _job(inp, work / "local-1", emb, unit_rows)
        ray1 = _job(inp, work / "ray-1", emb, unit_rows, engine="ray", num_workers=1)
        ray2 = _job(inp, work / "ray-2", emb, unit_rows, engine="ray", num_workers=2)
        local2 = _job(inp, work / "local-2", emb, unit_rows)
    finally:
        ray.shutdown()
    ids, ref = read_vectors(work / "local-1")
    if ids != [f"t{i:09d}" for i in range(len(texts))]:
        raise RuntimeError("the local job's output ids do not match its input rows one to one")
    diffs = {}
    for name in ("ray-1", "ray-2"):
        got_ids, vecs = read_vectors(work / name)
        if got_ids != ids:
            raise RuntimeError(f"{name}: output ids differ from the local engine's")
        diffs[name] = float(np.abs(vecs - ref).max())
    local_s = (local1["seconds"] + local2["seconds"]) / 2
    local_rate = len(texts) / local_s
    return {
        "texts": len(texts),
        "seconds": ray1["seconds"],
        "texts_per_s": ray1["rows_per_s"],
        "precision": emb.precision,
        "units": FILES,
        "unit_rows": unit_rows,
        "ray_init_s": ray_init_s,
        "local_rows_per_s": local_rate,
        "local_runs_s": [local1["seconds"], local2["seconds"]],
        "ray1": ray1,
        "ray2": ray2,
        "ray1_vs_local": ray1["rows_per_s"] / local_rate,
        "ray2_vs_local": ray2["rows_per_s"] / local_rate,
        "ray1_warm_vs_local": ray1["warm_rows_per_s"] / local_rate,
        "ray2_warm_vs_local": ray2["warm_rows_per_s"] / local_rate,
        "max_abs_diff_vs_local": diffs,
        "vectors": read_vectors(work / "ray-2")[1],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_ray", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="texts from the benchmark corpus")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--model", default="default")
    args = p.parse_args(argv)
    from bench.corpus import build_corpus

    texts = build_corpus()[: args.n]
    with tempfile.TemporaryDirectory(prefix="embedkit-bench-ray-") as tmp:
        res = run(texts, args.precision, tmp, model=args.model)
    res.pop("vectors", None)
    print(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

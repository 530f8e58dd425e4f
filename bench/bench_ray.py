"""The ``ray`` section of ``make bench``: the batch job on the Ray engine against the local engine, on
the same Parquet input, at the same precision, in the same call.

``run(texts, precision, workdir, pairs=1)`` (called by :mod:`bench.run`):

1. writes ``texts`` as 8 Parquet files (8 units, so two workers share the work);
2. times ``pairs`` interleaved pairs of the job with ``--engine local`` and ``--engine ray`` with 1
   worker (local first in even pairs, Ray first in odd ones, so machine drift cancels out of the
   median ratio), then one ``--engine ray`` run with 2 workers;
3. checks that each Ray output equals the local one (ids, and vectors within 1e-6).

Each Ray run is what ``embedkit embed --engine ray`` does without ``--ray-address``: it starts its own
local Ray (``ray.init``, counted: ``ray_init_s``), starts the actors, loads the model in them, runs
the units and shuts Ray down, all inside the timed wall time. Both engines get the same loaded
driver-side engine (its load is counted for neither; the Ray actors' own load is counted).
``startup_s`` is the Ray run's time until its first actor has loaded the model (``ray.init``
included); ``warm_rows_per_s`` divides the actors' rows by ``pool_s``, from then to the last unit
recorded. Until an actor is ready the driver embeds units itself (``driver_units``).

Returns ``texts``, ``seconds``, ``texts_per_s`` (the 1-worker Ray run, what the harness tabulates), the
per-engine rates, ``ray1_vs_local`` (the median over the pairs of local wall / Ray wall: the
done-when asks for Ray's wall time within 1.15x of local's, i.e. >= 1/1.15 = 0.87),
``ray1_wall_ratio`` (its inverse, Ray wall / local wall), ``ray2_vs_local``,
``ray1_warm_vs_local`` / ``ray2_warm_vs_local`` (once started), and ``vectors`` (the 2-worker output
in input order).

    python -m bench.bench_ray --pairs 3      # stand-alone: a one-minute job on this machine, 3 pairs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray  # the harness reports the section as skipped when the ray extra is not installed

from bench.bench_job import prepare, read_vectors, write_dataset

FILES = 8
DONE_WHEN_WALL_RATIO = 1.15  # Ray's wall time, start-up included, at most this times local's


def _ratio(rates: list[float | None], base: float) -> float | None:
    """The median of the known ``rates`` over ``base`` (None when the driver did every unit)."""
    known = [r for r in rates if r is not None]
    return statistics.median(known) / base if known else None


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
            ray_init_s=runner.get("connect_seconds"),
            startup_s=runner["startup_seconds"],
            pool_s=runner["pool_seconds"],
            # the actors' rows over their working time (the driver's rows, done while they started, left out)
            warm_rows_per_s=(
                sum(v["rows"] for v in runner["workers"].values()) / max(runner["pool_seconds"], 1e-9)
                if runner["pool_seconds"]
                else None
            ),
            workers={k: v["units"] for k, v in runner["workers"].items()},
            driver_units=runner.get("driver_units", 0),
            cpus_per_worker=runner["sizing"]["cpus_per_worker"],
            threads_per_worker=runner["sizing"]["threads"],
            load_s=max((v["load_seconds"] for v in runner["workers"].values()), default=None),
        )
    return row


def run(
    texts: list[str],
    precision: str,
    workdir: str,
    *,
    pairs: int = 1,
    job_seconds: float = 60.0,
    **engine: str,
) -> dict[str, Any]:
    """Local engine vs Ray engine (1 worker, ``pairs`` interleaved pairs; then 2 workers once) on
    ``texts`` at ``precision``; files under ``workdir``; ``engine``: the ``model`` and ``device`` of
    :func:`bench.bench_job.prepare`. With ``job_seconds``, ``texts`` are cycled until the local job
    takes about that long on this machine (a first local run measures its rate), so start-up weighs
    what it does on a one-minute job whatever the machine's speed."""
    if ray.is_initialized():
        raise RuntimeError("bench_ray times Ray's own start-up: call it without a connected Ray")
    given = len(texts)
    work, unit_rows, inp, emb = prepare(texts, workdir, FILES, 16, precision, **engine)
    if os.environ.get("EMBEDKIT_BENCH_QUICK", "") not in ("", "0"):  # bench.run --quick: the texts as given
        job_seconds = 0
    if job_seconds:
        probe = _job(inp, work / "probe", emb, unit_rows)
        n = math.ceil(probe["rows_per_s"] * job_seconds)
        if n > given:
            texts = (texts * math.ceil(n / given))[:n]
            unit_rows = max(16, math.ceil(n / FILES))
            inp = write_dataset(texts, work / f"in-{n}", files=FILES, row_group=unit_rows)
    locals_: list[dict[str, Any]] = []
    rays: list[dict[str, Any]] = []
    for k in range(max(1, pairs)):
        order = ("local", "ray") if k % 2 == 0 else ("ray", "local")
        for engine in order:
            if engine == "local":
                locals_.append(_job(inp, work / f"local-{k}", emb, unit_rows))
            else:
                rays.append(_job(inp, work / f"ray1-{k}", emb, unit_rows, engine="ray", num_workers=1))
    ray2 = _job(inp, work / "ray-2", emb, unit_rows, engine="ray", num_workers=2)
    ids, ref = read_vectors(work / "local-0")
    if ids != [f"t{i:09d}" for i in range(len(texts))]:
        raise RuntimeError("the local job's output ids do not match its input rows one to one")
    diffs = {}
    for name in [f"ray1-{k}" for k in range(len(rays))] + ["ray-2"]:
        got_ids, vecs = read_vectors(work / name)
        if got_ids != ids:
            raise RuntimeError(f"{name}: output ids differ from the local engine's")
        diffs[name] = float(np.abs(vecs - ref).max())
    wall_ratios = [r["seconds"] / loc["seconds"] for r, loc in zip(rays, locals_, strict=True)]
    local_s = statistics.median(loc["seconds"] for loc in locals_)
    local_rate = len(texts) / local_s
    ray1 = min(rays, key=lambda r: abs(r["seconds"] - statistics.median(x["seconds"] for x in rays)))
    wall_ratio = statistics.median(wall_ratios)
    return {
        "texts": len(texts),
        "seconds": ray1["seconds"],
        "texts_per_s": ray1["rows_per_s"],
        "precision": emb.precision,
        "units": FILES,
        "unit_rows": unit_rows,
        "pairs": len(rays),
        "ray_init_s": statistics.median(r["ray_init_s"] or 0.0 for r in rays),
        "local_rows_per_s": local_rate,
        "local_runs_s": [loc["seconds"] for loc in locals_],
        "ray1_runs_s": [r["seconds"] for r in rays],
        "ray1_wall_ratios": wall_ratios,
        "ray1": ray1,
        "ray1_runs": rays,
        "ray2": ray2,
        "ray1_wall_ratio": wall_ratio,
        "ray1_vs_local": 1.0 / wall_ratio,
        "ray2_vs_local": ray2["rows_per_s"] / local_rate,
        "ray1_warm_vs_local": _ratio([r["warm_rows_per_s"] for r in rays], local_rate),
        "ray2_warm_vs_local": _ratio([ray2["warm_rows_per_s"]], local_rate),
        "done_when_ok": wall_ratio <= DONE_WHEN_WALL_RATIO,
        "max_abs_diff_vs_local": diffs,
        "vectors": read_vectors(work / "ray-2")[1][:given],  # the texts as given, in order
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_ray", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n", type=int, default=2000, help="texts from the benchmark corpus (cycled past its end)"
    )
    p.add_argument(
        "--job-seconds",
        type=float,
        default=60.0,
        help="cycle the texts until the local job takes about this long (0: exactly --n texts)",
    )
    p.add_argument("--pairs", type=int, default=1, help="interleaved local / Ray 1-worker pairs")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--model", default="default")
    args = p.parse_args(argv)
    from bench.corpus import build_corpus

    corpus = build_corpus()
    texts = (corpus * math.ceil(args.n / len(corpus)))[: args.n]
    with tempfile.TemporaryDirectory(prefix="embedkit-bench-ray-") as tmp:
        res = run(
            texts, args.precision, tmp, model=args.model, pairs=args.pairs, job_seconds=args.job_seconds
        )
    res.pop("vectors", None)
    print(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

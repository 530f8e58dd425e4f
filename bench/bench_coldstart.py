"""Cold start of ``embedkit serve``: process start to the first ``/ping`` 200, per backend, with the
ONNX graph baked next to the weights and without one.

A serverless endpoint starts a fresh container at every cold start, so every case here starts with
an empty ``EMBEDKIT_CACHE_DIR`` (no cached graph, no memoised content hash). The model is a copy of
``model`` (default: all-MiniLM-L6-v2, fp32): a plain copy for the cases without a graph, and a copy
baked by ``embedkit graph bake`` (what the image and ``sagemaker package-model`` ship) for the
others. Cases run in interleaved rounds; each number is the median of ``reps`` starts.

* ``torch``: ``--backend torch`` (no graph looked for: the start as it was before ONNX Runtime);
* ``auto, baked`` / ``onnx, baked``: the graph is found next to the weights;
* ``auto, no graph`` / ``onnx, no graph``: the graph is exported at start-up (its export time,
  from the server's log, is reported too);
* ``openvino, baked``: the baked graph compiled by OpenVINO at start-up (only where OpenVINO is
  installed).

Any start-up measurement ``auto`` makes counts in these times. Target: ``auto, baked`` at most
1 s over ``torch``.

    python -m bench.bench_coldstart                    # 3 rounds
    python -m bench.bench_coldstart --reps 1 --json-out /tmp/cold.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_serve import ROOT, _env, _free_port, start_server, stop_server
from bench.report import print_and_save

# (name, backend, baked graph)
CASES = (
    ("torch", "torch", False),
    ("auto, baked", "auto", True),
    ("auto, no graph", "auto", False),
    ("onnx, baked", "onnx", True),
    ("onnx, no graph", "onnx", False),
    ("openvino, baked", "openvino", True),
)
TARGET_BAKED_OVER_TORCH_S = 1.0
EXPORT_LINE = re.compile(r"exported the ONNX graph in ([0-9.]+)s")
MEASURE_LINE = re.compile(r"backend auto: (.*) \(measured in ([0-9.]+)s\)")


def bake(model_dir: Path, cache: Path) -> dict[str, Any]:
    """``embedkit graph bake --model model_dir`` in a subprocess (scratch cache ``cache``)."""
    cmd = [
        sys.executable,
        "-m",
        "embedkit",
        "--log-level",
        "WARNING",
        "graph",
        "bake",
        "--model",
        str(model_dir),
    ]
    t0 = time.perf_counter()
    env = {**_env(), "EMBEDKIT_CACHE_DIR": str(cache)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(
            f"embedkit graph bake failed ({out.returncode}): {out.stdout[-1000:]}{out.stderr[-2000:]}"
        )
    return {**json.loads(out.stdout), "wall_s": time.perf_counter() - t0}


def start_once(model_dir: Path, backend: str, cache: Path, log_path: Path) -> dict[str, Any]:
    """One cold start: seconds from ``Popen`` to the first ``/ping`` 200, plus what the log says."""
    port = _free_port()
    proc = start_server(
        str(model_dir),
        "fp32",
        port,
        log_path,
        timeout=900.0,
        extra=("--backend", backend),
        env={"EMBEDKIT_CACHE_DIR": str(cache)},
        log_level="INFO",
        poll=0.02,
    )
    ready_s = proc._bench_ready_s  # type: ignore[attr-defined]
    stop_server(proc)
    log = log_path.read_text(errors="replace")
    export = EXPORT_LINE.search(log)
    measured = MEASURE_LINE.search(log)
    return {
        "ready_s": ready_s,
        "export_s": float(export.group(1)) if export else None,
        "auto_measure_s": float(measured.group(2)) if measured else None,
        "auto_choice": measured.group(1) if measured else None,
        "graph_exported": export is not None,
    }


def summarize(starts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median start per case, the export times, and the baked-vs-torch target."""
    rows = []
    for name, runs in starts.items():
        exports = [r["export_s"] for r in runs if r["export_s"] is not None]
        measures = [r["auto_measure_s"] for r in runs if r["auto_measure_s"] is not None]
        rows.append(
            {
                "case": name,
                "ready_s": statistics.median(r["ready_s"] for r in runs),
                "runs_s": [r["ready_s"] for r in runs],
                "export_s": statistics.median(exports) if exports else None,
                "auto_measure_s": statistics.median(measures) if measures else None,
                "auto_choice": next((r["auto_choice"] for r in runs if r["auto_choice"]), None),
                "graph_exported": any(r["graph_exported"] for r in runs),
            }
        )
    by = {r["case"]: r for r in rows}
    out: dict[str, Any] = {"rows": rows, "target_baked_over_torch_s": TARGET_BAKED_OVER_TORCH_S}
    if "torch" in by and "auto, baked" in by:
        out["auto_baked_over_torch_s"] = by["auto, baked"]["ready_s"] - by["torch"]["ready_s"]
        out["ok"] = out["auto_baked_over_torch_s"] <= TARGET_BAKED_OVER_TORCH_S
    return out


def run(model: str = "default", reps: int = 3, workdir: Path | None = None) -> dict[str, Any]:
    from embedkit.engine.graph import openvino_version
    from embedkit.models import resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-coldstart-", dir=workdir))
    try:
        source = Path(resolve_model(model))
        plain = Path(shutil.copytree(source, tmp / "model", ignore=shutil.ignore_patterns(".embedkit")))
        baked_dir = Path(shutil.copytree(plain, tmp / "model-baked"))
        baked = bake(baked_dir, tmp / "bake-cache")
        cases = [c for c in CASES if c[1] != "openvino" or openvino_version() is not None]
        starts: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
        for rep in range(reps):
            for k, (name, backend, with_graph) in enumerate(cases):
                cache = tmp / f"cache-{rep}-{k}"  # a fresh container: nothing cached
                run_ = start_once(
                    baked_dir if with_graph else plain, backend, cache, tmp / f"serve-{rep}-{k}.log"
                )
                starts[name].append(run_)
                print(f"[coldstart] round {rep + 1}/{reps}: {name}: {run_['ready_s']:.2f}s", file=sys.stderr)
                shutil.rmtree(cache, ignore_errors=True)
        out = summarize(starts)
        out.update(
            model=model,
            reps=reps,
            bake={k: baked[k] for k in ("digest", "seconds", "wall_s") if k in baked},
            starts=starts,
        )
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(res: dict[str, Any]) -> list[str]:
    cells = []
    for r in res["rows"]:
        extra = f", export {r['export_s']:.1f}s" if r["export_s"] is not None else ""
        extra += f", auto measured {r['auto_measure_s']:.2f}s" if r["auto_measure_s"] is not None else ""
        cells.append(f"{r['case']} {r['ready_s']:.2f}s{extra}")
    line = f"cold start to /ping 200 (median of {res['reps']}, empty cache): " + "; ".join(cells)
    if "ok" in res:
        line += (
            f"; auto baked - torch = {res['auto_baked_over_torch_s']:+.2f}s "
            f"({'PASS' if res['ok'] else 'FAIL'} <= {TARGET_BAKED_OVER_TORCH_S:g}s)"
        )
    return [line]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_coldstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    res = run(a.model, a.reps, Path(a.workdir) if a.workdir else None)
    return print_and_save("\n".join(describe(res)), res, a.json_out)


if __name__ == "__main__":
    sys.exit(main())

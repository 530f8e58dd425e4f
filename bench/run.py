"""``make bench``: embedkit against the naive sentence-transformers baseline, in one run.

Sections (``--sections``, default all):

* ``engine``: ``SentenceTransformer.encode(batch_size=32)`` and the embedkit ``Embedder`` in each
  precision (fp32, bf16 where the CPU has native bf16, int8) on a mixed corpus (3,000 short
  docstring summaries + ~170 passages of ~500 tokens). Each config lives in its own process (one
  untimed warm-up batch, then timed encodes of the whole corpus); rounds are interleaved
  (A B C A B C ...) and each number is the median of ``--reps`` rounds.
* ``iter``: ``encode_iter`` over 2k and 20k short texts: peak RSS at 10x the rows within 1.1x.
* ``job``, ``serve``: ``bench/bench_job.py`` / ``bench/bench_serve.py`` if present: the batch job
  and the HTTP server on the same corpus ("vs engine": their own same-call ratio to the engine).
  The job also measures its peak RSS at 2k and 20k rows; the server its p50 for one short text at
  concurrency 1 against naive ``SentenceTransformer.encode([text])``, 1-text requests at
  concurrency 32 against the engine with batches capped at 32 and against infinity-emb (from
  ``.venv-infinity``, built by ``make bench-venvs``), and its RSS over 20k mixed requests.
* ``coldstart``: ``bench/bench_coldstart.py``: process start to the first ``/ping`` 200 per
  backend, with the ONNX graph baked next to the weights and without (export time reported).
* ``ray``: ``bench/bench_ray.py``: the job on the local engine vs ``--engine ray`` (1 and 2 workers).
* ``images``: ``bench/bench_images.py``: the batch job's images/s on CLIP (ViT-B/32 vision tower)
  against a naive per-image loop, on webdataset shards and a URL list.
* ``m3``: ``bench/bench_m3.py``: BGE-M3's three outputs against dense alone and against
  FlagEmbedding (from ``.venv-flagembedding``, ``make reference``) on a random BGE-M3-geometry
  model, and the peak memory of one 8192-token input per precision.

The machine's peak matmul rate (torch.mm 2048^2 per dtype, same threads) is measured first, giving
model FLOP utilisation (see :mod:`bench.flops`). Prints a table and writes
``bench/results/<UTC>.json`` and ``latest.json``; ``--quick`` (or ``EMBEDKIT_BENCH_QUICK=1``) runs
a small smoke version of the engine and iter sections in under two minutes (name other sections
to add them) and writes ``*-quick.json`` instead.

    python -m bench.run                       # everything, ~20-25 min on 2 cores
    python -m bench.run --quick               # smoke run
    python -m bench.run --quick --sections engine,iter,job,serve,ray,images
    python -m bench.run --sections engine --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench import corpus as bench_corpus
from bench import report
from bench.flops import PEAK_DTYPE, mfu
from bench.procs import Worker, WorkerError, run_once

SECTIONS = ("engine", "iter", "job", "serve", "coldstart", "ray", "images", "m3")
QUICK_SECTIONS = ("engine", "iter")  # --quick without --sections: the harness's own, under two minutes
# Optional sections written beside the harness: ``run(texts, precision, workdir)`` for the job and
# the Ray job, ``run(texts, precision)`` for the server. Each returns a dict with ``seconds`` or
# ``texts_per_s`` (and ``texts`` when it used a sample), optionally ``tokens`` and ``vectors`` (in
# input order, for the cosine check), and anything else it wants kept in the JSON.
DOOR_MODULES = {"job": "bench.bench_job", "serve": "bench.bench_serve", "ray": "bench.bench_ray"}
# A door's own ratio to the engine measured in the same call (steadier than across sections).
SAME_CALL_RATIO = {"job": "vs_engine_same_call", "serve": "vs_offline"}
IN_PROCESS = ("job",)
# The user's own OpenMP wait policy, read before anything imports embedkit (which sets PASSIVE on
# import): the naive baseline and the peak-rate probe run in the environment a plain
# sentence-transformers / torch script would get; embedkit's workers in what embedkit sets.
USER_ENV = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
COSINE_BAR = 0.99
FULL_ITER_SIZES = (2_000, 20_000)
QUICK_ITER_SIZES = (500, 5_000)
RSS_RATIO_BAR = 1.1  # peak RSS at 10x the rows (encode_iter, the batch job, the server's requests)
BASELINE = "naive ST fp32 bs=32"
BASELINE_SAME_ENV = "naive ST, OMP passive"
EMBEDKIT_ENV = {"OMP_WAIT_POLICY": USER_ENV["OMP_WAIT_POLICY"] or "PASSIVE"}  # what importing embedkit sets
TIMEOUT = 3600.0  # per worker answer; generous because the machine may be shared


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    corpus_path: Path
    short_path: Path
    n_texts: int
    threads: int
    calib: dict[str, Any] = field(default_factory=dict)
    engine_rows: list[dict[str, Any]] = field(default_factory=list)
    baseline_vectors: np.ndarray | None = None
    # Peak matmul rates: the best seen at any of several moments of the run (start, between rounds,
    # before each encode_iter run), so a busy moment on a shared machine does not lower the peak.
    peaks: dict[str, float] = field(default_factory=dict)
    peak_samples: list[dict[str, float | None]] = field(default_factory=list)

    @property
    def common(self) -> list[str]:
        return [
            "--threads",
            str(self.threads),
            "--model",
            self.args.model,
            "--peak-reps",
            str(self.args.peak_reps),
        ]

    def add_peaks(self, sample: dict[str, float | None]) -> None:
        self.peak_samples.append(sample)
        for dtype, rate in sample.items():
            if rate:
                self.peaks[dtype] = max(rate, self.peaks.get(dtype, 0.0))

    def peak(self, precision: str) -> float | None:
        return self.peaks.get(PEAK_DTYPE.get(precision, precision))

    def fast_precision(self, requested: str) -> str:
        """``auto``: the fastest embedkit precision of this run with min cosine >= 0.99."""
        if requested != "auto":
            return requested
        ok = [
            r
            for r in self.engine_rows
            if r["kind"] == "embedkit" and (r.get("min_cosine") is None or r["min_cosine"] >= COSINE_BAR)
        ]
        if ok:
            return max(ok, key=lambda r: r["texts_per_s"])["precision"]
        return "bf16" if self.calib.get("bf16_native") else "fp32"


# ------------------------------------------------------------------------------------- sections
def calibrate(ctx: Context) -> dict[str, Any]:
    log("calibrating: corpus tokens, peak matmul rates (torch.mm 2048^2)")
    args = [*ctx.common, "--corpus", str(ctx.corpus_path)]
    calib = run_once("calibrate", args, log_dir=ctx.tmp, timeout=TIMEOUT, env=USER_ENV)
    ctx.add_peaks(calib["peak_flops"])
    return calib


Config = tuple[str, str, str, "dict[str, str | None] | None"]


def measure_encoders(ctx: Context, configs: list[Config], reps: int) -> dict[str, dict]:
    """Start one worker per ``(name, kind, precision, env)``, then time them in interleaved rounds."""
    workers: dict[str, Worker] = {}
    out: dict[str, dict] = {}
    try:
        for k, (name, kind, precision, env) in enumerate(configs):
            vec = ctx.tmp / f"config{k}.npy"
            args = [*ctx.common, "--corpus", str(ctx.corpus_path), "--kind", kind, "--precision", precision]
            workers[name] = Worker(
                "encode", [*args, "--vectors-out", str(vec)], log_dir=ctx.tmp, name=f"config{k}", env=env
            )
            out[name] = {"kind": kind, "precision": precision, "vectors": vec, "seconds": []}
        for name, w in workers.items():
            msg = w.recv(TIMEOUT)
            out[name]["load_s"] = msg["load_s"]
            out[name]["omp_wait_policy"] = msg.get("omp_wait_policy")
            log(f"ready: {name} (loaded in {msg['load_s']:.1f}s)")
        for r in range(reps):
            for name, w in workers.items():
                w.send("run")
                msg = w.recv(TIMEOUT)
                out[name]["seconds"].append(msg["seconds"])
                out[name]["peak_rss_mib"] = msg["rss"]["peak"]
                log(f"round {r + 1}/{reps}: {name}: {msg['seconds']:.2f}s")
            if reps > 1:  # the peak again, between rounds, from the first worker (idle otherwise)
                first = next(iter(workers.values()))
                first.send("peak")
                ctx.add_peaks(first.recv(TIMEOUT)["peak_flops"])
    except BaseException:
        for w in workers.values():
            w.kill()
        raise
    finally:
        for w in workers.values():
            w.close()
    return out


def _rate_row(ctx: Context, config: str, kind: str, precision: str, seconds: float) -> dict[str, Any]:
    tokens = ctx.calib["tokens"]
    return {
        "config": config,
        "kind": kind,
        "precision": precision,
        "median_s": seconds,
        "texts_per_s": ctx.n_texts / seconds,
        "tokens_per_s": tokens / seconds,
        "flops": ctx.calib["corpus_flops"],
    }


def engine_section(ctx: Context) -> dict[str, Any]:
    precisions = ctx.args.precisions.split(",") if ctx.args.precisions else ["fp32", "bf16", "int8"]
    if not ctx.args.precisions and not ctx.calib.get("bf16_native"):
        precisions.remove("bf16")
    if not ctx.args.precisions and not ctx.calib.get("int8_native", True):
        precisions.remove("int8")
    configs: list[Config] = [(BASELINE, "baseline", "fp32", USER_ENV)]
    if USER_ENV["OMP_WAIT_POLICY"] != EMBEDKIT_ENV["OMP_WAIT_POLICY"] and not ctx.args.no_same_env_baseline:
        # the same script in the OpenMP setting embedkit's workers get: what is left is the engine's
        configs.append((BASELINE_SAME_ENV, "baseline", "fp32", EMBEDKIT_ENV))
    configs += [(f"embedkit {p}", "embedkit", p, None) for p in precisions]
    measured = measure_encoders(ctx, configs, ctx.args.reps)
    base = measured[BASELINE]
    ctx.baseline_vectors = np.load(base["vectors"])
    rows = []
    for name, m in measured.items():
        row = _rate_row(ctx, name, m["kind"], m["precision"], report.median(m["seconds"]))
        row.update(
            seconds=m["seconds"],
            peak_rss_mib=m["peak_rss_mib"],
            load_s=m["load_s"],
            omp_wait_policy=m["omp_wait_policy"],
        )
        if name == BASELINE:
            row["ratio"] = 1.0
        else:
            row["ratio"] = report.paired_ratio(base["seconds"], m["seconds"])
            row.update(report.cosine_stats(ctx.baseline_vectors, np.load(m["vectors"])))
            if BASELINE_SAME_ENV in measured and m["kind"] == "embedkit":
                same = measured[BASELINE_SAME_ENV]["seconds"]
                row["ratio_same_omp_env"] = report.paired_ratio(same, m["seconds"])
        rows.append(row)
    ctx.engine_rows = rows
    return {"reps": ctx.args.reps, "rows": rows}


def iter_section(ctx: Context) -> dict[str, Any]:
    precision = ctx.fast_precision(ctx.args.iter_precision)
    runs = []
    for n in ctx.args.iter_sizes:
        log(f"encode_iter over {n} short texts ({precision})")
        args = [*ctx.common, "--corpus", str(ctx.short_path), "--precision", precision, "--n", str(n)]
        msg = run_once("iter", args, log_dir=ctx.tmp, timeout=TIMEOUT, name=f"iter{n}")
        if msg["rows"] != n:
            raise WorkerError(f"encode_iter yielded {msg['rows']} rows for {n} texts")
        ctx.add_peaks(msg.get("peak_flops") or {})
        flops = ctx.calib["dense_flops_per_token"] * msg["tokens"] + (
            4 * ctx.calib["shape"]["layers"] * ctx.calib["shape"]["hidden"] * msg["tokens_sq"]
        )
        runs.append(
            {
                "config": f"encode_iter {n // 1000}k short ({precision})",
                "kind": "iter",
                "precision": precision,
                "n": n,
                "median_s": msg["seconds"],
                "texts_per_s": n / msg["seconds"],
                "tokens_per_s": msg["tokens"] / msg["seconds"],
                "flops": flops,
                "peak_rss_mib": msg["rss"]["peak"],
                "rss_after_warmup_mib": msg["rss_before"]["current"],
                "chunk_size": msg["chunk_size"],
            }
        )
    ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    return {"precision": precision, "runs": runs, "rss_ratio": ratio, "ok": ratio <= RSS_RATIO_BAR}


def door_section(ctx: Context, section: str) -> dict[str, Any]:
    module = DOOR_MODULES[section]
    if importlib.util.find_spec(module) is None:
        return {"skipped": f"{module.replace('.', '/')}.py is not present"}
    precision = ctx.fast_precision(ctx.args.door_precision)
    log(f"{section} section ({precision})")
    vec = ctx.tmp / f"{section}.npy"
    args = [*ctx.common, "--corpus", str(ctx.corpus_path), "--section", section, "--precision", precision]
    args += ["--module", module, "--workdir", str(ctx.tmp / f"{section}-work"), "--vectors-out", str(vec)]
    # the user's own OpenMP setting, for baselines a door runs in processes of their own
    env = {"EMBEDKIT_BENCH_USER_OMP_WAIT_POLICY": USER_ENV["OMP_WAIT_POLICY"] or ""}
    if ctx.args.quick:
        env["EMBEDKIT_BENCH_QUICK"] = "1"
    msg = run_once("door", args, log_dir=ctx.tmp, timeout=TIMEOUT, name=section, env=env)
    if msg.get("skipped"):
        return {"skipped": msg["skipped"]}
    res = msg["result"]
    n = int(res.get("texts") or ctx.n_texts)
    if not res.get("texts_per_s") and not res.get("seconds"):
        return {"skipped": f"{module}.run returned neither 'seconds' nor 'texts_per_s'", "result": res}
    if res.get("texts_per_s"):
        rate = float(res["texts_per_s"])
        seconds = n / rate
    else:
        seconds = float(res["seconds"])
        rate = n / seconds
    same_corpus = n == ctx.n_texts
    tokens = res.get("tokens") or (ctx.calib["tokens"] if same_corpus else None)
    row: dict[str, Any] = {
        "config": f"{section} ({precision})" + ("" if same_corpus else f" {n} texts"),
        "kind": section,
        "precision": precision,
        "texts": n,
        "median_s": seconds,
        "texts_per_s": rate,
        "tokens_per_s": tokens / seconds if tokens else None,
        "flops": ctx.calib["corpus_flops"] if same_corpus else None,
        # the worker's own memory only where the door runs in it (the server and Ray run elsewhere)
        "peak_rss_mib": res.get("peak_rss_mib") or (msg["rss"]["peak"] if section in IN_PROCESS else None),
    }
    # Only same-call ratios: texts/s measured minutes apart on a shared machine do not compare.
    own = res.get(SAME_CALL_RATIO.get(section, ""))
    if own is not None:
        row["vs_engine"] = float(own)
        engine = next(
            (r for r in ctx.engine_rows if r["kind"] == "embedkit" and r["precision"] == precision), None
        )
        if engine is not None:  # chained: (door / engine, same call) x (engine / baseline, interleaved)
            row["ratio"] = row["vs_engine"] * engine["ratio"]
    if msg.get("has_vectors") and ctx.baseline_vectors is not None and same_corpus:
        row.update(report.cosine_stats(ctx.baseline_vectors, np.load(vec)))
    return {"row": row, "result": res}


def images_section(ctx: Context) -> dict[str, Any]:
    """``bench/bench_images.py`` in its own process: the batch job's images/s against seed 003's
    naive loop (CLIP ViT-B/32 vision tower, webdataset shards and a URL list)."""
    return script_section(ctx, "images", ["--n", "32"] if ctx.args.quick else [])


def coldstart_section(ctx: Context) -> dict[str, Any]:
    """``bench/bench_coldstart.py`` in its own process: process start to the first ``/ping`` 200
    per backend, baked graph and not (one round with ``--quick``, else three)."""
    return script_section(
        ctx, "coldstart", ["--model", ctx.args.model, "--reps", "1" if ctx.args.quick else "3"]
    )


def script_section(ctx: Context, section: str, extra: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.bench_<section> --workdir W --json-out F *extra``; its JSON is the result."""
    module = f"bench.bench_{section}"
    if importlib.util.find_spec(module) is None:
        return {"skipped": f"bench/bench_{section}.py is not present"}
    log(f"{section} section")
    out = ctx.tmp / f"{section}.json"
    work = ctx.tmp / f"{section}-work"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", module, "--workdir", str(work), "--json-out", str(out), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"failed: no answer within {TIMEOUT:.0f}s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"failed: {tail[0]}", "error": (proc.stderr or "")[-3000:]}
    return {"result": json.loads(out.read_text())}


# -------------------------------------------------------------------------------------- summary
def done_when(result: dict[str, Any]) -> dict[str, Any]:
    """The bars: fp32 >= 1.3x; a non-exact precision >= 2.5x at min cosine >= 0.99 (both no worse than
    the previous run on the same CPU); peak RSS at 10x the rows within 1.1x (encode_iter, batch job,
    server); serving: one short text at concurrency 1 <= 0.35x of naive sentence-transformers p50
    (``inputs`` and ``search_term``), 1-text requests at concurrency 32 >= 0.9x of the engine with
    batches capped at 32 and >= 2x infinity-emb; cold start with a baked graph <= 1 s over torch's."""
    checks: dict[str, Any] = {}
    rows = (result.get("engine") or {}).get("rows") or []
    fp32 = next((r for r in rows if r["kind"] == "embedkit" and r["precision"] == "fp32"), None)
    if fp32:
        checks["fp32_ratio"] = fp32["ratio"]
        checks["fp32_ok"] = fp32["ratio"] >= 1.3
        checks["fp32_ratio_same_omp_env"] = fp32.get("ratio_same_omp_env")
    approx = [r for r in rows if r["kind"] == "embedkit" and r["precision"] != "fp32"]
    if approx:
        fastest = max(approx, key=lambda r: r["ratio"])
        good = [r for r in approx if r["min_cosine"] >= COSINE_BAR]
        best = max(good, key=lambda r: r["ratio"]) if good else None
        keys = ("precision", "ratio", "min_cosine", "ratio_same_omp_env")
        checks["fastest_non_exact"] = {k: fastest.get(k) for k in keys}
        checks["best_non_exact_at_cosine_bar"] = {k: best.get(k) for k in keys} if best else None
        checks["non_exact_ok"] = bool(best and best["ratio"] >= 2.5)
    previous = result.get("previous") or {}
    if previous.get("same_cpu"):
        for key, label in (("fp32_ratio", "fp32"), ("best_non_exact_ratio", "non_exact")):
            now = (
                checks.get("fp32_ratio")
                if key == "fp32_ratio"
                else ((checks.get("best_non_exact_at_cosine_bar") or {}).get("ratio"))
            )
            if now is not None and previous.get(key) is not None:
                checks[f"{label}_previous_ratio"] = previous[key]
                # 5%: the run-to-run spread of these ratios on a quiet machine
                checks[f"{label}_not_worse"] = now >= 0.95 * previous[key]
    it = result.get("iter") or {}
    if "rss_ratio" in it:
        checks["iter_rss_ratio"] = it["rss_ratio"]
        checks["iter_ok"] = it["ok"]
    job = (result.get("job") or {}).get("result") or {}
    if "ratio" in (job.get("rss") or {}):
        checks["job_rss_ratio"] = job["rss"]["ratio"]
        checks["job_rss_ok"] = job["rss"]["ratio"] <= RSS_RATIO_BAR
    serve = (result.get("serve") or {}).get("result") or {}
    for key in (
        "latency_ratio_inputs",
        "latency_ratio_search_term",
        "vs_offline",
        "vs_replay",
        "vs_infinity",
    ):
        if serve.get(key) is not None:
            checks[f"serve_{key}"] = serve[key]
    if "latency_ok" in serve:
        checks["serve_latency_ok"] = serve["latency_ok"]
    if serve.get("vs_offline") is not None:
        checks["serve_c32_ok"] = serve["ok"]
    default = serve.get("c32_default_precision")
    if default:  # the section ran another precision: the bar at the server's default (fp32) too
        checks["serve_vs_offline_default_precision"] = default["vs_offline"]
        checks["serve_c32_default_precision_ok"] = default["ok"]
        if default.get("vs_replay") is not None:  # reported, as the section's own vs_replay
            checks["serve_vs_replay_default_precision"] = default["vs_replay"]
    if "infinity_ok" in serve:
        checks["serve_vs_infinity_ok"] = serve["infinity_ok"]
    elif serve:
        checks["serve_vs_infinity_skipped"] = (serve.get("infinity") or {}).get("skipped")
    if "ratio" in (serve.get("memory") or {}):
        checks["serve_rss_ratio"] = serve["memory"]["ratio"]
        checks["serve_rss_ok"] = serve["memory_ok"]
    cold = (result.get("coldstart") or {}).get("result") or {}
    if cold.get("rows"):
        checks["coldstart_s"] = {r["case"]: r["ready_s"] for r in cold["rows"]}
        checks["coldstart_export_s"] = next((r["export_s"] for r in cold["rows"] if r["export_s"]), None)
    if "ok" in cold:
        checks["coldstart_baked_over_torch_s"] = cold["auto_baked_over_torch_s"]
        checks["coldstart_ok"] = cold["ok"]
    m3 = (result.get("m3") or {}).get("result") or {}
    for key in ("all_over_dense", "all_over_dense_ok", "vs_flag", "vs_flag_ok"):
        if key in m3:
            checks[f"m3_{key}"] = m3[key]
    return checks


def previous_ratios(results_dir: Path, cpu_model: str | None) -> dict[str, Any]:
    """The engine ratios of the last full run (``latest.json``), to check they got no worse; only
    comparable on the same CPU model."""
    try:
        prev = json.loads((results_dir / "latest.json").read_text())
    except (OSError, ValueError):
        return {}
    checks = prev.get("done_when") or {}
    best = checks.get("best_non_exact_at_cosine_bar") or {}
    prev_cpu = (prev.get("machine") or {}).get("cpu_model")
    return {
        "created_utc": prev.get("created_utc"),
        "cpu_model": prev_cpu,
        "same_cpu": bool(cpu_model) and prev_cpu == cpu_model,
        "fp32_ratio": checks.get("fp32_ratio"),
        "best_non_exact_ratio": best.get("ratio"),
        "best_non_exact_precision": best.get("precision"),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    c, cal = result["done_when"], result.get("calibration") or {}
    lines = [f"machine: {report.describe_machine(result['machine'])}"]
    corp = result["corpus"]
    lines.append(
        f"corpus: {corp['texts']} texts ({corp['short']} short docstring summaries + {corp['long']} "
        f"language-reference passages), {corp.get('tokens', '?')} tokens after truncation"
    )
    peaks = result.get("peak_flops") or cal.get("peak_flops") or {}
    if peaks:
        lines.append(
            f"peak torch.mm 2048^2 (best of {len(result.get('peak_samples') or [])} samples over the run): "
            + ", ".join(
                f"{k} {v / 1e9:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in peaks.items() if v
            )
            + f"; model: {cal.get('dense_flops_per_token', 0) / 1e6:.1f} MFLOP/token dense + attention"
        )
    if cal.get("backend_plan"):
        unpadded = {True: "yes", False: "no"}.get(cal.get("unpadded"), "?")
        lines.append(f"embedkit fp32 backend (auto): {cal['backend_plan']}; unpadded forward: {unpadded}")
    if cal.get("backend_plan_bf16"):
        lines.append(f"embedkit bf16 backend (auto): {cal['backend_plan_bf16']}")
    same_env = f" ({BASELINE_SAME_ENV}: {{:.2f}}x)"
    if "fp32_ok" in c:
        extra = same_env.format(c["fp32_ratio_same_omp_env"]) if c.get("fp32_ratio_same_omp_env") else ""
        lines.append(
            f"done-when fp32 >= 1.3x baseline: {c['fp32_ratio']:.2f}x {'PASS' if c['fp32_ok'] else 'FAIL'}"
            + extra
        )
    if "non_exact_ok" in c:
        b = c["best_non_exact_at_cosine_bar"]
        got = (
            f"{b['precision']} {b['ratio']:.2f}x at min cos {b['min_cosine']:.5f}"
            if b
            else "none reaches cos 0.99"
        )
        extra = same_env.format(b["ratio_same_omp_env"]) if b and b.get("ratio_same_omp_env") else ""
        lines.append(
            f"done-when non-exact >= 2.5x with min cos >= 0.99: {got} {'PASS' if c['non_exact_ok'] else 'FAIL'}"
            + extra
        )
    if "iter_ok" in c:
        it = result["iter"]
        runs = ", ".join(f"{r['n']}: {r['peak_rss_mib']:.0f} MiB in {r['median_s']:.0f}s" for r in it["runs"])
        sizes = [r["n"] for r in it["runs"]]
        label = "done-when" if sizes == list(FULL_ITER_SIZES) else "smoke sizes, not the 2k/20k check:"
        lines.append(
            f"{label} encode_iter peak RSS ratio <= {RSS_RATIO_BAR}: {c['iter_rss_ratio']:.3f} ({runs}) "
            f"{'PASS' if c['iter_ok'] else 'FAIL'}"
        )
    for label in ("fp32", "non_exact"):
        if f"{label}_not_worse" in c:
            prev = result["previous"]
            lines.append(
                f"done-when {label} ratio no worse than the previous run on this CPU ({prev['created_utc']}, "
                f"{c[f'{label}_previous_ratio']:.2f}x, 5% spread): {'PASS' if c[f'{label}_not_worse'] else 'FAIL'}"
            )
    job = (result.get("job") or {}).get("result")
    if job and job.get("vs_engine_same_call") is not None:
        rss = job.get("rss") or {}
        lines.append(f"job vs in-memory engine (same call): {job['vs_engine_same_call']:.2f}x")
        if "ratio" in rss:
            lines.append(
                f"done-when batch job peak RSS {rss['rows_10x']} vs {rss['rows_1x']} rows <= {RSS_RATIO_BAR}x: "
                f"{rss['peak_rss_mib_10x']:.0f} / {rss['peak_rss_mib_1x']:.0f} MiB = {rss['ratio']:.3f}x "
                f"{'PASS' if c['job_rss_ok'] else 'FAIL'}"
            )
    serve = (result.get("serve") or {}).get("result")
    if serve and serve.get("vs_offline") is not None:
        from bench.bench_serve import describe as describe_serve

        lines += [f"done-when {line}" for line in describe_serve(serve)]
    cold = (result.get("coldstart") or {}).get("result")
    if cold and cold.get("rows"):
        from bench.bench_coldstart import describe as describe_cold

        lines += [f"done-when {line}" for line in describe_cold(cold)]
    ray = (result.get("ray") or {}).get("result")
    if ray:
        ok = ray.get("done_when_ok", ray["ray1_vs_local"] >= 1 / 1.15)

        def x(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        startup = ray["ray1"].get("startup_s")
        lines.append(
            f"ray engine vs local job ({ray['texts']} texts, {ray['units']} units): 1 worker "
            f"{ray['ray1_vs_local']:.2f}x end to end, wall {ray.get('ray1_wall_ratio', 0):.2f}x local's "
            f"(median of {ray.get('pairs', 1)} pair(s); {startup or 0:.0f}s start-up: ray.init "
            f"{ray['ray_init_s']:.0f}s, actor start, model load; the driver embedded "
            f"{ray['ray1'].get('driver_units', 0)} unit(s) meanwhile), {x(ray['ray1_warm_vs_local'])} once "
            f"started; 2 workers {ray['ray2_vs_local']:.2f}x / {x(ray['ray2_warm_vs_local'])}; "
            f"done-when 1 worker wall within 1.15x of local's, start-up included: {'PASS' if ok else 'FAIL'}"
        )
    img = (result.get("images") or {}).get("result")
    if img:
        lines.append(
            f"images ({img['images']} x 256px JPEG, CLIP ViT-B/32 vision): job vs naive loop: URL list "
            f"({img['latency_ms']:g} ms/GET) {img['urls']['speedup']:.2f}x, local shards "
            f"{img['shards']['speedup']:.2f}x; done-when >= 1.5x: {'PASS' if img['met'] else 'FAIL'}"
        )
    m3 = (result.get("m3") or {}).get("result")
    if m3:
        from bench.bench_m3 import table as describe_m3

        lines += describe_m3(m3).splitlines()
    for section in ("iter", *DOOR_MODULES, "coldstart", "images", "m3"):
        note = (result.get(section) or {}).get("skipped")
        if note:
            lines.append(f"{section}: skipped ({note})")
    return lines


def all_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = list((result.get("engine") or {}).get("rows") or [])
    rows += (result.get("iter") or {}).get("runs") or []
    return rows + [result[s]["row"] for s in DOOR_MODULES if "row" in (result.get(s) or {})]


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the printed table: engine configs, encode_iter runs, then the door sections."""
    return all_rows(result)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sections",
        default=None,
        help=f"comma list of: {', '.join(SECTIONS)} (default all; with --quick: {','.join(QUICK_SECTIONS)})",
    )
    p.add_argument(
        "--quick", action="store_true", default=os.environ.get("EMBEDKIT_BENCH_QUICK", "") not in ("", "0")
    )
    p.add_argument("--model", default="default", help="model spec (all-MiniLM-L6-v2 unless testing)")
    p.add_argument("--precisions", default="", help="embedkit precisions (default fp32,bf16 if native,int8)")
    p.add_argument(
        "--no-same-env-baseline",
        action="store_true",
        help="skip the second baseline run in embedkit's OpenMP setting",
    )
    p.add_argument("--reps", type=int, default=3, help="timed rounds per config (median taken)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads for every config (default: all cores)"
    )
    p.add_argument("--short", type=int, default=None, help="short texts in the corpus")
    p.add_argument("--long", type=int, default=None, help="long passages in the corpus (0 = all)")
    p.add_argument("--iter-sizes", default=None, help="encode_iter sizes, e.g. 2000,20000")
    p.add_argument("--iter-precision", default="auto")
    p.add_argument("--door-precision", default="auto", help="precision for the job/serve/ray sections")
    p.add_argument("--peak-reps", type=int, default=None)
    p.add_argument("--results-dir", default=str(report.RESULTS_DIR))
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep worker logs and vectors")
    args = p.parse_args(argv)
    q = args.quick
    args.short = (
        args.short if args.short is not None else (bench_corpus.QUICK_SHORT if q else bench_corpus.FULL_SHORT)
    )
    args.long = (
        args.long if args.long is not None else (bench_corpus.QUICK_LONG if q else bench_corpus.FULL_LONG)
    )
    sizes = args.iter_sizes or ",".join(map(str, QUICK_ITER_SIZES if q else FULL_ITER_SIZES))
    args.iter_sizes = [int(s) for s in sizes.split(",")]
    args.peak_reps = args.peak_reps or (2 if q else 5)
    if args.sections is None:
        args.sections = ",".join(QUICK_SECTIONS if q else SECTIONS)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="embedkit-bench-"))
    try:
        texts = bench_corpus.build_corpus(args.short, args.long)
        threads = args.threads or len(os.sched_getaffinity(0))
        ctx = Context(
            args=args,
            tmp=tmp,
            corpus_path=bench_corpus.save(texts, tmp / "corpus.json"),
            short_path=bench_corpus.save(bench_corpus.docstring_summaries(), tmp / "short.json"),
            n_texts=len(texts),
            threads=threads,
        )
        ctx.calib = calibrate(ctx)
        n_long = len(texts) - args.short
        result: dict[str, Any] = {
            "schema": 1,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "machine": {
                **report.machine_info(),
                "torch": ctx.calib["torch"],
                "threads": ctx.calib["threads"],
                "bf16_native": ctx.calib["bf16_native"],
                "int8_native": ctx.calib.get("int8_native"),
            },
            "corpus": {
                "texts": len(texts),
                "short": args.short,
                "long": n_long,
                "tokens": ctx.calib["tokens"],
                "truncated": ctx.calib["truncated"],
                "source": "first lines of stdlib docstrings + pydoc_data language-reference passages (embedkit.corpus)",
                "seed": bench_corpus.SEED,
            },
            "model": {k: ctx.calib[k] for k in ("model", "model_path", "shape", "dense_flops_per_token")},
            "calibration": ctx.calib,
        }
        for section in args.sections:
            t0 = time.perf_counter()
            try:
                if section == "engine":
                    result["engine"] = engine_section(ctx)
                elif section == "iter":
                    result["iter"] = iter_section(ctx)
                elif section == "images":
                    result["images"] = images_section(ctx)
                elif section == "coldstart":
                    result["coldstart"] = coldstart_section(ctx)
                elif section == "m3":
                    quick = ["--n", "200", "--reps", "1"] if ctx.args.quick else ["--memory"]
                    result["m3"] = script_section(ctx, "m3", quick)
                else:
                    result[section] = door_section(ctx, section)
            except WorkerError as exc:
                if section == "engine":
                    raise
                log(f"{section} section failed: {exc}")
                result[section] = {"skipped": f"failed: {str(exc).splitlines()[0]}", "error": str(exc)}
            result.setdefault(section, {})["section_s"] = time.perf_counter() - t0
        result["peak_flops"] = dict(ctx.peaks)
        result["peak_samples"] = ctx.peak_samples
        for row in all_rows(result):
            flops = row.get("flops")
            row["mfu"] = mfu(flops, row["median_s"], ctx.peak(row["precision"])) if flops else None
        if not args.quick:
            result["previous"] = previous_ratios(Path(args.results_dir), result["machine"].get("cpu_model"))
        result["done_when"] = done_when(result)
        result["table"] = table_rows(result)
        result["summary"] = summary_lines(result)
        result["total_s"] = time.perf_counter() - started
        print(report.format_table(result["table"]))
        print()
        print("\n".join(result["summary"]))
        print(f"total {result['total_s']:.0f}s")
        if not args.no_write:
            paths = report.write_results(result, Path(args.results_dir), quick=args.quick)
            print(f"wrote {', '.join(str(p) for p in paths)}")
        return result
    finally:
        if args.keep_tmp:
            log(f"worker logs and vectors kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)  # so workers are stopped and temp files removed
    try:
        run(argv)
    except WorkerError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

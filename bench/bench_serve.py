"""Load test of ``embedkit serve`` against the engine offline, naive sentence-transformers and infinity.

:func:`run` starts ``embedkit serve`` (default model) in a subprocess on a random loopback port and
drives it from a *separate* client process (a raw asyncio HTTP/1.1 keep-alive client, so the client
costs as little CPU as possible on a small machine). In the same call it measures:

* **latency**: p50 of one short text per request at concurrency 1, as ``{"inputs": text}`` and as
  ``{"search_term": text}``, against naive ``SentenceTransformer(model).encode([text])`` p50 on the
  same texts in a process of its own (target: <= 0.35x), always on an fp32 server (the server's
  default and the bar's precision; a second server when the section runs another precision);
* **throughput**: 1-text requests at concurrency 32 against the engine offline with batches capped
  at 32 texts (``Embedder(..., max_batch_size=32)``, same precision, a fresh process with the
  server's environment, before and after the server phase; target >= 0.9x), and against
  infinity-emb 0.0.78 on the same texts through its OpenAI-style ``/embeddings`` route (from
  ``.venv-infinity``, which ``make bench-venvs`` builds; skipped with the reason when absent;
  target: embedkit >= 2x); reported beside the bar, the same texts replayed in that process in
  arrival order, 32 at a time, each batch computed as the server's worker computes it
  (:func:`embedkit.server.batcher.embed_merged`), which splits the bar's gap into what serving
  costs (served / replay) and what the batches' composition costs (replay / offline);
* **memory**: the server's RSS over ``memory_requests`` mixed-length 1-text requests at concurrency
  32: peak after the first tenth against peak at the end (10x the requests; target <= 1.1x).

Bounded: a deadline per phase.

    python -m bench.bench_serve --precision bf16            # prints a summary and the JSON result
    python -m bench.bench_serve --quick                     # smoke run

``bench/run.py`` calls ``run(texts, precision)``; ``texts_per_s`` in the result is the server's
rate at concurrency 32 (one text per request) and ``vs_offline`` its ratio to the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.9  # c=32 server / engine offline with batches capped at CONCURRENCY texts
TARGET_LATENCY_RATIO = 0.35  # c=1 p50 / naive SentenceTransformer.encode([text]) p50
LATENCY_PRECISION = "fp32"  # the c=1 bar's precision (the server's default), whatever the section's
TARGET_VS_INFINITY = 2.0
TARGET_RSS_RATIO = 1.1
CONCURRENCY = 32
# Rounds of each c=32 rate (served, offline, replay), the median reported: one pass over the sample
# takes ~4 s, and this machine's speed wanders by several percent between passes.
ROUNDS = 3
INFINITY_VERSION = "0.0.78"
INFINITY_VENV = ROOT / ".venv-infinity"
# The user's OpenMP wait policy for the naive baseline (bench.run passes it: by the time this module
# runs in a bench worker, importing embedkit has set PASSIVE for the process).
USER_OMP_ENV = "EMBEDKIT_BENCH_USER_OMP_WAIT_POLICY"
USER_OMP = os.environ.get(USER_OMP_ENV, os.environ.get("OMP_WAIT_POLICY", ""))
# Request bodies and what a good answer starts with, per route.
BODIES = {
    "inputs": ("/invocations", lambda t: {"inputs": t}, b'{"embeddings":'),
    "search_term": ("/invocations", lambda t: {"search_term": t}, b'{"embedding":'),
    "openai": ("/embeddings", lambda t: {"model": "bench", "input": [t]}, b'{"object":"list"'),
}


# ----------------------------------------------------------------------------- offline
def offline_rate(
    texts: list[str], precision: str, model: str, tmp: Path, rounds: int = ROUNDS
) -> dict[str, Any]:
    """In a fresh process with the server's environment, texts/s of ``Embedder(max_batch_size=32)
    .encode`` on ``texts`` (``offline``: what the server could reach if serving cost nothing) and of
    the same texts in arrival order, 32 at a time, each merged batch computed as the server's
    worker computes it (``replay``: the server's own batches without HTTP, so that served / replay
    is what serving costs and replay / offline what the server's batch composition costs)."""
    path = tmp / "offline-texts.json"
    path.write_text(json.dumps(texts))
    cmd = [sys.executable, "-m", "bench.bench_serve", "offline", "--texts", str(path)]
    cmd += ["--precision", precision, "--model", model, "--rounds", str(rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"offline measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _offline_in_process(
    texts: list[str], precision: str, model: str = "default", rounds: int = ROUNDS
) -> dict[str, Any]:
    """:func:`offline_rate`'s two rates in this process (after one warm-up batch): ``rounds``
    alternating rounds of each, the median of each reported (this machine's speed wanders by
    several percent from one pass to the next)."""
    from embedkit import Embedder
    from embedkit.server.batcher import adopt_packed, embed_merged

    emb = Embedder(model, device="cpu", precision=precision, max_batch_size=CONCURRENCY, packed=True)
    emb.encode(texts[:32])
    session = emb.open_packed()  # as the server does once ready
    if session is not None:
        adopt_packed(emb, session)
    offline: list[float] = []
    replay: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        emb.encode(texts)
        offline.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for start in range(0, len(texts), CONCURRENCY):
            tok = emb.tokenize(texts[start : start + CONCURRENCY])
            embed_merged(emb, tok, emb.max_batch_tokens)
        replay.append(len(texts) / (time.perf_counter() - t0))
    emb.close()
    return {
        "offline": statistics.median(offline),
        "replay": statistics.median(replay),
        "offline_rounds": offline,
        "replay_rounds": replay,
        "merged_batches": emb.packed_note,
    }


def drive_rounds(
    port: int, texts: list[str], max_seconds: float, tmp: Path, rounds: int = ROUNDS
) -> dict[str, Any]:
    """:func:`drive` at concurrency 32 ``rounds`` times over ``texts``: the round with the median
    requests/s, with every round's rate in ``rounds``."""
    runs = [drive(port, texts, CONCURRENCY, max_seconds, tmp) for _ in range(rounds)]
    rates = [r["requests_per_s"] for r in runs]
    mid = sorted(runs, key=lambda r: r["requests_per_s"])[len(runs) // 2]
    return {**mid, "rounds": rates}


def naive_latency(texts: list[str], model: str, tmp: Path) -> dict[str, float]:
    """p50/p99 ms of naive ``SentenceTransformer(model).encode([text])``, one text at a time, in a
    fresh process with the user's environment (as a plain sentence-transformers script runs)."""
    path = tmp / "naive-texts.json"
    path.write_text(json.dumps(texts))
    cmd = [sys.executable, "-m", "bench.bench_serve", "naive", "--texts", str(path), "--model", model]
    env = _env()
    env.pop("OMP_WAIT_POLICY", None)
    if USER_OMP:
        env["OMP_WAIT_POLICY"] = USER_OMP
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"naive latency measurement failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _naive_in_process(texts: list[str], model: str) -> dict[str, float]:
    from sentence_transformers import SentenceTransformer

    from embedkit.models import resolve_model

    st = SentenceTransformer(str(resolve_model(model)), device="cpu")
    for t in texts[:5]:  # warm-up
        st.encode([t], show_progress_bar=False)
    latencies = []
    for t in texts:
        t0 = time.perf_counter()
        st.encode([t], show_progress_bar=False)
        latencies.append(time.perf_counter() - t0)
    return {
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "n": len(texts),
    }


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q`` quantile of ``seconds`` in ms (nearest rank below; 0 when empty)."""
    if not seconds:
        return 0.0
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# ------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what `embedkit serve` runs with; offline gets the same
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_server(
    model: str,
    precision: str,
    port: int,
    log_path: Path,
    timeout: float = 300.0,
    *,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    log_level: str = "WARNING",
    poll: float = 0.2,
):
    """``embedkit serve`` in a subprocess; returns it once ``/ping`` answers 200."""
    cmd = [sys.executable, "-m", "embedkit", "--log-level", log_level, "serve"]
    cmd += ["--model", model, "--precision", precision, "--device", "cpu", "--port", str(port), *extra]
    return start_process(
        cmd, f"http://127.0.0.1:{port}/ping", log_path, timeout, env={**_env(), **(env or {})}, poll=poll
    )


def wait_settled(port: int, timeout: float = 120.0) -> dict[str, Any]:
    """``/info`` once the server's work after ready is done (with ``auto``: the graph attached and
    measured, the packed graph compiled and measured), so that the timed phases measure the server
    as it runs from then on, not its start-up; what ``/info`` says when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=5) as r:
            info = json.loads(r.read())
        pending = "until the ONNX graph is attached" in str(info.get("backend_plan", ""))
        pending |= str(info.get("merged_batches", "")).startswith("length groups until")
        if not pending:
            return info
        time.sleep(0.2)
    return info


def start_process(
    cmd: list[str], ready_url: str, log_path: Path, timeout: float, *, env: dict[str, str], poll: float = 0.2
) -> subprocess.Popen:
    """Start ``cmd`` (output to ``log_path``) and return it once ``ready_url`` answers 200; the
    process carries ``_bench_started`` (monotonic start) and ``_bench_ready_s`` (seconds to ready)."""
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed by stop_server
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc._bench_log = log  # type: ignore[attr-defined]
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as r:
                if r.status == 200:
                    proc._bench_ready_s = time.monotonic() - started  # type: ignore[attr-defined]
                    return proc
        except OSError:
            pass
        time.sleep(poll)
    stop_server(proc)
    raise TimeoutError(f"{' '.join(cmd[:4])} not ready after {timeout:.0f}s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> int | None:
    proc.terminate()
    try:
        code = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    proc._bench_log.close()  # type: ignore[attr-defined]
    return code


def process_memory_mib(pid: int) -> dict[str, float]:
    """Resident memory of process ``pid`` now (``current``, VmRSS) and at its peak (``peak``, VmHWM)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["peak" if key == "VmHWM" else "current"] = int(value.split()[0]) / 1024
    return out


def server_batches(port: int) -> dict[str, float]:
    """Mean texts per inference batch and batch count, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for name in ("embedkit_batch_size_sum", "embedkit_batch_size_count"):
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        values[name] = float(m.group(1)) if m else 0.0
    count = values["embedkit_batch_size_count"]
    return {"batches": count, "mean_batch_texts": values["embedkit_batch_size_sum"] / count if count else 0.0}


# ------------------------------------------------------------------------------ client
def drive(
    port: int, texts: list[str], concurrency: int, max_seconds: float, tmp: Path, body: str = "inputs"
) -> dict[str, Any]:
    """Send each text once as a 1-text request (``body``: a key of :data:`BODIES`) from
    ``concurrency`` connections, in a separate process."""
    path = tmp / f"texts-{concurrency}.json"
    path.write_text(json.dumps(texts))
    cmd = [sys.executable, "-m", "bench.bench_serve", "client", "--port", str(port), "--body", body]
    cmd += ["--concurrency", str(concurrency), "--texts", str(path), "--max-seconds", str(max_seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=max_seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _client(
    port: int, texts: list[str], concurrency: int, max_seconds: float, body: str = "inputs"
) -> dict[str, Any]:
    route, make, good = BODIES[body]
    bodies = iter([json.dumps(make(t)).encode() for t in texts])
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + max_seconds

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for payload_out in bodies:
                if time.perf_counter() > deadline:
                    return
                head = (
                    b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % (route.encode(), len(payload_out))
                )
                t0 = time.perf_counter()
                writer.write(head + payload_out)
                header = await reader.readuntil(b"\r\n\r\n")
                start = header.lower().find(b"content-length:") + 15
                payload = await reader.readexactly(int(header[start : header.find(b"\r\n", start)]))
                latencies.append(time.perf_counter() - t0)
                status = header[9:12].decode()
                if status != "200" or not payload.startswith(good):
                    errors[status] = errors.get(status, 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "body": body,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "errors": errors,
    }


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--texts", required=True)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--body", choices=sorted(BODIES), default="inputs")
    a = p.parse_args(argv)
    texts = json.loads(Path(a.texts).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass
    print(json.dumps(asyncio.run(_client(a.port, texts, a.concurrency, a.max_seconds, a.body))))
    return 0


# ---------------------------------------------------------------------------- infinity
def infinity_binary() -> Path | None:
    """``infinity_emb`` of the bench venv (or ``$EMBEDKIT_BENCH_INFINITY``), if installed: the venv
    counts once ``make bench-venvs`` finished (its stamp file), not after a half-done install."""
    given = os.environ.get("EMBEDKIT_BENCH_INFINITY")
    if given:
        exe = Path(given)
    elif any(INFINITY_VENV.glob(".installed-*")):
        exe = INFINITY_VENV / "bin" / "infinity_emb"
    else:
        return None
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def infinity_rate(texts: list[str], model: str, tmp: Path, max_seconds: float) -> dict[str, Any]:
    """infinity-emb on ``model`` (torch, fp32, CPU, its default batch size 32) loaded with the same
    1-text requests at concurrency 32 through its OpenAI-style ``/embeddings`` route. Runs in the
    server's environment (``OMP_WAIT_POLICY=PASSIVE``: with spinning OpenMP threads its event loop
    and tokeniser starve on 2 cores), so the comparison does not handicap it. ``{"skipped": why}``
    when it is not installed."""
    exe = infinity_binary()
    if exe is None:
        return {
            "skipped": f"infinity-emb {INFINITY_VERSION} is not installed in {INFINITY_VENV.name} "
            f"(`make bench-venvs` builds it; its pip install failed or was not run)"
        }
    from embedkit.models import resolve_model

    port = _free_port()
    cmd = [str(exe), "v2", "--model-id", str(resolve_model(model)), "--served-model-name", "bench"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--engine", "torch", "--device", "cpu"]
    cmd += ["--dtype", "float32", "--no-bettertransformer", "--log-level", "warning"]
    try:
        proc = start_process(cmd, f"http://127.0.0.1:{port}/health", tmp / "infinity.log", 600.0, env=_env())
    except (RuntimeError, TimeoutError) as exc:
        return {"skipped": f"infinity-emb did not start: {str(exc).splitlines()[0][:300]}"}
    try:
        drive(port, texts[:CONCURRENCY], CONCURRENCY, max_seconds, tmp, body="openai")  # warm-up
        c32 = drive(port, texts, CONCURRENCY, max_seconds, tmp, body="openai")
    finally:
        stop_server(proc)
    return {"version": INFINITY_VERSION, "start_s": proc._bench_ready_s, **c32}  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ memory
def server_memory(
    port: int, pid: int, texts: list[str], n: int, max_seconds: float, tmp: Path
) -> dict[str, Any]:
    """The server's RSS over ``n`` 1-text requests at concurrency 32, cycling through ``texts``
    (mixed lengths): peak after the first tenth, then after all ``n`` (10x the requests)."""
    cycled = list(itertools.islice(itertools.cycle(texts), n))
    first = max(1, n // 10)
    start = process_memory_mib(pid)
    a = drive(port, cycled[:first], CONCURRENCY, max_seconds, tmp)
    at_tenth = process_memory_mib(pid)
    b = drive(port, cycled[first:], CONCURRENCY, max_seconds, tmp)
    at_end = process_memory_mib(pid)
    return {
        "requests": a["requests"] + b["requests"],
        "requests_first_tenth": a["requests"],
        "rss_start_mib": start["current"],
        "peak_rss_mib_tenth": at_tenth["peak"],
        "peak_rss_mib": at_end["peak"],
        "rss_end_mib": at_end["current"],
        "ratio": at_end["peak"] / at_tenth["peak"],
        "requests_per_s": (a["requests"] + b["requests"]) / (a["seconds"] + b["seconds"]),
        "errors": {**a["errors"], **b["errors"]},
    }


# --------------------------------------------------------------------------------- run
def short_texts(n: int) -> list[str]:
    """``n`` short real texts (first lines of standard-library docstrings, ~15 tokens each)."""
    from bench.corpus import docstring_summaries

    return docstring_summaries()[:n]


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The ratios and pass/fail of each target, from the measurements in ``res``."""
    offline = res["offline_texts_per_s"]
    rate = res["texts_per_s"]
    naive = res["naive_p50_ms"]
    replay = res.get("replay_texts_per_s")
    out: dict[str, Any] = {
        "vs_offline": rate / offline if offline else None,
        "vs_replay": rate / replay if replay else None,  # reported: what serving alone costs
        "latency_ratio_inputs": res["p50_ms_c1"] / naive if naive else None,
        "latency_ratio_search_term": res["p50_ms_c1_search_term"] / naive if naive else None,
    }
    out["ok"] = bool(out["vs_offline"] is not None and out["vs_offline"] >= TARGET_RATIO)
    default = res.get("c32_default_precision")
    if default:
        default["ok"] = default["vs_offline"] >= TARGET_RATIO
    out["latency_ok"] = all(
        out[k] is not None and out[k] <= TARGET_LATENCY_RATIO
        for k in ("latency_ratio_inputs", "latency_ratio_search_term")
    )
    inf = res.get("infinity") or {}
    if inf.get("requests_per_s"):
        out["vs_infinity"] = rate / inf["requests_per_s"]
        out["infinity_ok"] = out["vs_infinity"] >= TARGET_VS_INFINITY
    mem = res.get("memory") or {}
    if "ratio" in mem:
        out["memory_ok"] = mem["ratio"] <= TARGET_RSS_RATIO
    return out


def latency_phases(port: int, short: list[str], max_seconds: float, tmp: Path) -> tuple[dict, dict]:
    """Concurrency 1: ``{"inputs"}`` then ``{"search_term"}`` requests, one short text each."""
    c1 = drive(port, short, 1, max_seconds, tmp)
    return c1, drive(port, short, 1, max_seconds, tmp, body="search_term")


def run(
    texts: list[str],
    precision: str = "fp32",
    *,
    model: str = "default",
    max_texts: int = 1500,
    c1_requests: int | None = None,
    memory_requests: int | None = None,
    infinity: bool = True,
    max_seconds: float = 180.0,
) -> dict[str, Any]:
    """Serve ``model`` at ``precision`` and load it with 1-text requests; returns the measurements.

    Phases: offline engine on the sample (batches capped at 32); naive sentence-transformers p50 on
    ``c1_requests`` short texts; the server at concurrency 1 on those texts (``inputs``, then
    ``search_term``), at concurrency 32 (the sample, each text once: requests/s and p99), then
    ``memory_requests`` mixed-length requests for its RSS; infinity-emb on the sample (``infinity``);
    offline again. ``max_texts`` bounds the sample and ``max_seconds`` each timed phase.
    """
    quick = os.environ.get("EMBEDKIT_BENCH_QUICK", "") not in ("", "0")  # bench.run --quick sets it
    c1_requests = c1_requests if c1_requests is not None else (50 if quick else 200)
    memory_requests = memory_requests if memory_requests is not None else (2000 if quick else 20_000)
    rounds = 1 if quick else ROUNDS
    sample = list(texts[:max_texts])
    if not sample:
        raise ValueError("no texts to benchmark")
    short = short_texts(c1_requests)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        offline_before = offline_rate(sample, precision, model, tmp, rounds)
        naive = naive_latency(short, model, tmp)
        port = _free_port()
        proc = start_server(model, precision, port, tmp / "server.log")
        try:
            settled = wait_settled(port)
            drive(port, sample[:CONCURRENCY], CONCURRENCY, max_seconds, tmp)  # warm the server up
            if precision == LATENCY_PRECISION:
                c1, c1_search = latency_phases(port, short, max_seconds, tmp)
            before = server_batches(port)
            c32 = drive_rounds(port, sample, max_seconds, tmp, rounds)
            after = server_batches(port)
            memory = (
                server_memory(port, proc.pid, texts, memory_requests, max(max_seconds, 900.0), tmp)
                if memory_requests
                else {}
            )
        finally:
            exit_code = stop_server(proc)
        default: dict[str, Any] | None = None
        if precision != LATENCY_PRECISION:  # the bars in fp32, the server's default, too
            port = _free_port()
            proc = start_server(model, LATENCY_PRECISION, port, tmp / "server-c1.log")
            try:
                default_settled = wait_settled(port)
                drive(port, sample[:CONCURRENCY], CONCURRENCY, max_seconds, tmp)
                c1, c1_search = latency_phases(port, short, max_seconds, tmp)
                default_c32 = drive_rounds(port, sample, max_seconds, tmp, rounds)
            finally:
                stop_server(proc)
            default_offline = offline_rate(sample, LATENCY_PRECISION, model, tmp, rounds)
            default = {
                "precision": LATENCY_PRECISION,
                "requests_per_s": default_c32["requests_per_s"],
                "requests_per_s_rounds": default_c32["rounds"],
                "p99_ms": default_c32["p99_ms"],
                "offline_texts_per_s": default_offline["offline"],
                "offline_rounds": default_offline.get("offline_rounds"),
                "replay_rounds": default_offline.get("replay_rounds"),
                "vs_offline": default_c32["requests_per_s"] / default_offline["offline"],
                "replay_texts_per_s": default_offline["replay"],
                "vs_replay": default_c32["requests_per_s"] / default_offline["replay"],
                "merged_batches": default_settled.get("merged_batches"),
                "errors": default_c32["errors"],
            }
        inf = infinity_rate(sample, model, tmp, max_seconds) if infinity else {"skipped": "not asked for"}
        offline_after = offline_rate(sample, precision, model, tmp, rounds)
    offline = (offline_before["offline"] + offline_after["offline"]) / 2
    replay = (offline_before["replay"] + offline_after["replay"]) / 2
    rate = c32["requests_per_s"]
    batches = after["batches"] - before["batches"]
    texts_in = after["mean_batch_texts"] * after["batches"] - before["mean_batch_texts"] * before["batches"]
    res: dict[str, Any] = {
        "model": model,
        "precision": precision,
        "texts": c32["requests"],
        "texts_per_s": rate,
        "requests_per_s": rate,
        "requests_per_s_rounds": c32["rounds"],
        "offline_texts_per_s": offline,
        "offline_runs": [offline_before["offline"], offline_after["offline"]],
        "replay_texts_per_s": replay,
        "replay_runs": [offline_before["replay"], offline_after["replay"]],
        "replay_merged_batches": offline_after["merged_batches"],
        "server_merged_batches": settled.get("merged_batches"),
        "server_backend_plan": settled.get("backend_plan"),
        "offline_max_batch_size": CONCURRENCY,
        "target_ratio": TARGET_RATIO,
        "c1_precision": LATENCY_PRECISION,
        "p50_ms_c1": c1["p50_ms"],
        "p99_ms_c1": c1["p99_ms"],
        "p50_ms_c1_search_term": c1_search["p50_ms"],
        "p99_ms_c1_search_term": c1_search["p99_ms"],
        "c1_requests": c1["requests"],
        "naive_p50_ms": naive["p50_ms"],
        "naive_p99_ms": naive["p99_ms"],
        "target_latency_ratio": TARGET_LATENCY_RATIO,
        "p50_ms_c32": c32["p50_ms"],
        "p99_ms_c32": c32["p99_ms"],
        "errors": {
            **c1["errors"],
            **c1_search["errors"],
            **c32["errors"],
            **memory.get("errors", {}),
            **(default or {}).get("errors", {}),
        },
        "mean_batch_texts_c32": texts_in / batches if batches else 0.0,
        "memory": memory,
        "target_rss_ratio": TARGET_RSS_RATIO,
        "infinity": inf,
        "target_vs_infinity": TARGET_VS_INFINITY,
        "server_exit_code": exit_code,
        # c=32 against offline at the server's default precision when the section ran another one
        "c32_default_precision": default,
    }
    res.update(summarize(res))
    return res


def describe(res: dict[str, Any]) -> list[str]:
    """Human lines for a result of :func:`run`."""

    def verdict(ok: bool | None) -> str:
        return "PASS" if ok else "FAIL"

    lines = [
        f"serve c=32: {res['requests_per_s']:.1f} req/s ({res['texts']} 1-text requests) vs engine offline "
        f"(batches <= {CONCURRENCY}) {res['offline_texts_per_s']:.1f} texts/s: {res['vs_offline']:.2f}x "
        f"({verdict(res['ok'])} >= {TARGET_RATIO}); p99 {res['p99_ms_c32']:.1f} ms, mean batch "
        f"{res['mean_batch_texts_c32']:.1f} texts",
        f"serve c=1 p50 ({res.get('c1_precision', res['precision'])}): inputs {res['p50_ms_c1']:.1f} ms ({res['latency_ratio_inputs']:.2f}x), search_term "
        f"{res['p50_ms_c1_search_term']:.1f} ms ({res['latency_ratio_search_term']:.2f}x) vs naive "
        f"SentenceTransformer.encode([text]) {res['naive_p50_ms']:.1f} ms "
        f"({verdict(res['latency_ok'])} <= {TARGET_LATENCY_RATIO}x)",
    ]
    if res.get("vs_replay") is not None:
        lines.append(
            f"serve c=32 vs the same texts replayed in process as the server's worker computes "
            f"them (arrival order, {CONCURRENCY} at a time, no HTTP) {res['replay_texts_per_s']:.1f} "
            f"texts/s: {res['vs_replay']:.2f}x (reported: what serving costs; replay / offline "
            f"{res['replay_texts_per_s'] / res['offline_texts_per_s']:.2f}x is what the batches' "
            "composition costs)"
        )
    default = res.get("c32_default_precision")
    if default:
        lines.append(
            f"serve c=32 in {default['precision']} (the server's default): {default['requests_per_s']:.1f} "
            f"req/s vs engine offline {default['offline_texts_per_s']:.1f} texts/s: "
            f"{default['vs_offline']:.2f}x ({verdict(default['ok'])} >= {TARGET_RATIO}); p99 "
            f"{default['p99_ms']:.1f} ms"
            + (
                f"; vs its batches replayed in process {default['replay_texts_per_s']:.1f} texts/s: "
                f"{default['vs_replay']:.2f}x (reported)"
                if default.get("vs_replay")
                else ""
            )
        )
    inf = res.get("infinity") or {}
    if "vs_infinity" in res:
        lines.append(
            f"serve c=32 vs infinity-emb {inf['version']} ({inf['requests_per_s']:.1f} req/s, p99 "
            f"{inf['p99_ms']:.0f} ms): {res['vs_infinity']:.2f}x ({verdict(res['infinity_ok'])} >= "
            f"{TARGET_VS_INFINITY}x)"
        )
    else:
        lines.append(f"infinity-emb: skipped ({inf.get('skipped', 'no result')})")
    mem = res.get("memory") or {}
    if mem:
        lines.append(
            f"server RSS over {mem['requests']} mixed 1-text requests: start {mem['rss_start_mib']:.0f} MiB, "
            f"peak {mem['peak_rss_mib_tenth']:.0f} MiB after {mem['requests_first_tenth']}, "
            f"{mem['peak_rss_mib']:.0f} MiB after all: {mem['ratio']:.3f}x "
            f"({verdict(res.get('memory_ok'))} <= {TARGET_RSS_RATIO}x)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    if argv[:1] in (["offline"], ["naive"]):
        p = argparse.ArgumentParser(prog=f"python -m bench.bench_serve {argv[0]}")
        p.add_argument("--texts", required=True)
        p.add_argument("--precision", default="fp32")
        p.add_argument("--model", default="default")
        p.add_argument("--rounds", type=int, default=ROUNDS)
        a = p.parse_args(argv[1:])
        texts = json.loads(Path(a.texts).read_text())
        if argv[0] == "naive":
            print(json.dumps(_naive_in_process(texts, a.model)))
        else:
            print(json.dumps(_offline_in_process(texts, a.precision, a.model, a.rounds)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--model", default="default")
    p.add_argument("--max-texts", type=int, default=1500)
    p.add_argument("--memory-requests", type=int, default=20_000)
    p.add_argument("--no-infinity", action="store_true")
    p.add_argument("--quick", action="store_true", help="a small smoke run (200 texts, 2k memory requests)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.corpus import build_corpus

    texts = build_corpus()
    res = run(
        texts,
        a.precision,
        model=a.model,
        max_texts=200 if a.quick else a.max_texts,
        c1_requests=50 if a.quick else None,
        memory_requests=2000 if a.quick else a.memory_requests,
        infinity=not a.no_infinity,
    )
    print("\n".join(describe(res)))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

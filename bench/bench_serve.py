"""Load test of ``embedkit serve``: 1-text requests at concurrency 1 and 32 against the engine offline.

:func:`run` starts ``embedkit serve`` (default model) in a subprocess on a random loopback port,
drives it from a *separate* client process (a raw asyncio HTTP/1.1 keep-alive client, so the client
costs as little CPU as possible on a small machine), and measures the engine's offline throughput
on the same texts in the same call, before and after the server phase (in a fresh process with the
server's environment, ``OMP_WAIT_POLICY=PASSIVE`` included), so the ratio compares like with like
on a noisy machine. Bounded: at most ``max_texts`` texts per phase and a deadline each.

    python -m bench.bench_serve --precision bf16            # prints a table and the JSON result
    python -m bench.bench_serve --max-texts 200 --quick     # smoke run

``bench/run.py`` calls ``run(texts, precision)``; ``texts_per_s`` in the result is the server's
rate at concurrency 32 (one text per request) and ``vs_offline`` its ratio to the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.75
CONCURRENCY = 32


# ----------------------------------------------------------------------------- offline
def offline_rate(texts: list[str], precision: str, model: str, tmp: Path) -> float:
    """texts/s of ``Embedder.encode`` on ``texts`` in a fresh process with the server's environment."""
    path = tmp / "offline-texts.json"
    path.write_text(json.dumps(texts))
    cmd = [sys.executable, "-m", "bench.bench_serve", "offline", "--texts", str(path)]
    cmd += ["--precision", precision, "--model", model]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"offline measurement failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _offline_in_process(texts: list[str], precision: str, model: str = "default") -> float:
    """texts/s of ``Embedder.encode`` on ``texts`` (after one warm-up batch), in this process."""
    from embedkit import Embedder

    emb = Embedder(model, device="cpu", precision=precision)
    emb.encode(texts[:32])
    t0 = time.perf_counter()
    emb.encode(texts)
    rate = len(texts) / (time.perf_counter() - t0)
    emb.close()
    return rate


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


def start_server(model: str, precision: str, port: int, log_path: Path, timeout: float = 300.0):
    """``embedkit serve`` in a subprocess; returns it once ``/ping`` answers 200."""
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed by stop_server
    cmd = [sys.executable, "-m", "embedkit", "--log-level", "WARNING", "serve"]
    cmd += ["--model", model, "--precision", precision, "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    proc._bench_log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"embedkit serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise TimeoutError(f"embedkit serve not ready after {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> int | None:
    proc.terminate()
    try:
        code = proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    proc._bench_log.close()  # type: ignore[attr-defined]
    return code


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
def drive(port: int, texts: list[str], concurrency: int, max_seconds: float, tmp: Path) -> dict[str, Any]:
    """Send each text once as ``{"inputs": text}`` from ``concurrency`` connections, in a separate process."""
    path = tmp / f"texts-{concurrency}.json"
    path.write_text(json.dumps(texts))
    cmd = [sys.executable, "-m", "bench.bench_serve", "client", "--port", str(port)]
    cmd += ["--concurrency", str(concurrency), "--texts", str(path), "--max-seconds", str(max_seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=max_seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _client(port: int, texts: list[str], concurrency: int, max_seconds: float) -> dict[str, Any]:
    bodies = iter([json.dumps({"inputs": t}).encode() for t in texts])
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + max_seconds

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for body in bodies:
                if time.perf_counter() > deadline:
                    return
                head = (
                    b"POST /invocations HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                t0 = time.perf_counter()
                writer.write(head + body)
                header = await reader.readuntil(b"\r\n\r\n")
                start = header.lower().find(b"content-length:") + 15
                payload = await reader.readexactly(int(header[start : header.find(b"\r\n", start)]))
                latencies.append(time.perf_counter() - t0)
                status = header[9:12].decode()
                if status != "200" or not payload.startswith(b'{"embeddings":'):
                    errors[status] = errors.get(status, 0) + 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
    }


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--texts", required=True)
    p.add_argument("--max-seconds", type=float, default=60.0)
    a = p.parse_args(argv)
    texts = json.loads(Path(a.texts).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass
    print(json.dumps(asyncio.run(_client(a.port, texts, a.concurrency, a.max_seconds))))
    return 0


# --------------------------------------------------------------------------------- run
def run(
    texts: list[str],
    precision: str = "fp32",
    *,
    model: str = "default",
    max_texts: int = 1500,
    c1_requests: int = 100,
    max_seconds: float = 180.0,
) -> dict[str, Any]:
    """Serve ``model`` at ``precision`` and load it with 1-text requests; returns the measurements.

    Phases: offline engine on the sample, server at concurrency 1 (``c1_requests`` texts, p50),
    server at concurrency 32 (the whole sample, each text once: requests/s and p99), offline again.
    ``max_texts`` bounds the sample and ``max_seconds`` each server phase.
    """
    sample = list(texts[:max_texts])
    if not sample:
        raise ValueError("no texts to benchmark")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        offline_before = offline_rate(sample, precision, model, tmp)
        port = _free_port()
        proc = start_server(model, precision, port, tmp / "server.log")
        try:
            drive(port, sample[:CONCURRENCY], CONCURRENCY, max_seconds, tmp)  # warm the server up
            c1 = drive(port, sample[:c1_requests], 1, max_seconds, tmp)
            before = server_batches(port)
            c32 = drive(port, sample, CONCURRENCY, max_seconds, tmp)
            after = server_batches(port)
        finally:
            exit_code = stop_server(proc)
        offline_after = offline_rate(sample, precision, model, tmp)
    offline = (offline_before + offline_after) / 2
    rate = c32["requests_per_s"]
    batches = after["batches"] - before["batches"]
    texts_in = after["mean_batch_texts"] * after["batches"] - before["mean_batch_texts"] * before["batches"]
    return {
        "model": model,
        "precision": precision,
        "texts": c32["requests"],
        "texts_per_s": rate,
        "requests_per_s": rate,
        "offline_texts_per_s": offline,
        "offline_runs": [offline_before, offline_after],
        "vs_offline": rate / offline if offline else None,
        "target_ratio": TARGET_RATIO,
        "ok": bool(offline and rate / offline >= TARGET_RATIO),
        "p50_ms_c1": c1["p50_ms"],
        "p99_ms_c1": c1["p99_ms"],
        "p50_ms_c32": c32["p50_ms"],
        "p99_ms_c32": c32["p99_ms"],
        "errors": {**c1["errors"], **c32["errors"]},
        "mean_batch_texts_c32": texts_in / batches if batches else 0.0,
        "server_exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    if argv[:1] == ["offline"]:
        p = argparse.ArgumentParser(prog="python -m bench.bench_serve offline")
        p.add_argument("--texts", required=True)
        p.add_argument("--precision", default="fp32")
        p.add_argument("--model", default="default")
        a = p.parse_args(argv[1:])
        print(_offline_in_process(json.loads(Path(a.texts).read_text()), a.precision, a.model))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="fp32")
    p.add_argument("--model", default="default")
    p.add_argument("--max-texts", type=int, default=1500)
    p.add_argument("--quick", action="store_true", help="a small smoke run (200 texts)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.corpus import build_corpus

    texts = build_corpus()
    res = run(texts, a.precision, model=a.model, max_texts=200 if a.quick else a.max_texts)
    print(
        f"server c=32: {res['requests_per_s']:.1f} req/s ({res['texts']} 1-text requests), "
        f"engine offline: {res['offline_texts_per_s']:.1f} texts/s -> ratio {res['vs_offline']:.2f} "
        f"({'PASS' if res['ok'] else 'FAIL'} >= {TARGET_RATIO}); p50 c=1 {res['p50_ms_c1']:.1f} ms, "
        f"p99 c=32 {res['p99_ms_c32']:.1f} ms; mean batch {res['mean_batch_texts_c32']:.1f} texts"
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

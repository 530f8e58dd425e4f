"""One benchmark config in its own process, so peak RSS, warm-up and thread pools are its own.

Started by :mod:`bench.run`; speaks JSON lines on stdout (everything else a library prints goes to
stderr). Modes:

* ``calibrate``: corpus token counts, model shape, the peak matmul rates, torch facts.
* ``encode``: load one config (``baseline`` = ``SentenceTransformer.encode(batch_size=32)``, or the
  embedkit ``Embedder`` at a precision), run one untimed warm-up batch, answer ``ready``; then each
  ``run`` line on stdin times one encode of the whole corpus (``time.perf_counter`` around the
  call only) and answers its seconds. The first run's vectors are saved for the cosine check.
* ``iter``: stream ``n`` short texts through ``Embedder.encode_iter`` and report peak RSS.
* ``door``: call ``run`` of ``bench.bench_job`` / ``bench_ray`` (``texts, precision, workdir``) or
  ``bench.bench_serve`` (``texts, precision``) and report what it returns.

Run by hand: ``python -m bench.worker calibrate --corpus /tmp/corpus.json --threads 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bench import corpus as bench_corpus

WARMUP_TEXTS = 32
# OpenMP's wait policy as torch loaded (OpenMP reads it then); set in main().
OMP_POLICY: dict[str, str | None] = {"at_torch_load": None}


def memory_mib() -> dict[str, float]:
    """Resident memory of this process: ``peak`` (VmHWM) and ``current`` (VmRSS), in MiB.

    Read from /proc rather than ``getrusage``, whose maximum can carry over the parent's size
    across fork and exec."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out["peak" if key == "VmHWM" else "current"] = int(value.split()[0]) / 1024
    except OSError:  # pragma: no cover - non-Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"peak": peak, "current": peak}
    return out


class Channel:
    """JSON lines to the parent on the real stdout; stray prints from libraries go to stderr."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **msg: Any) -> None:
        self._out.write(json.dumps(msg) + "\n")
        self._out.flush()


def _set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def peaks(dtypes: str, reps: int) -> dict[str, float | None]:
    """Peak matmul rates now, for each of the comma-separated ``dtypes``."""
    from bench.flops import measure_peak
    from embedkit.engine.device import cpu_supports_bf16, cpu_supports_int8

    # Without native bf16 / int8 dot products (e.g. AVX2-only CPUs) those 2048^2 matmuls run emulated
    # at ~1 GFLOP/s: minutes per sample, and no peak worth quoting. Record None there.
    native = {"bf16": cpu_supports_bf16(), "int8": cpu_supports_int8()}
    return {
        dtype: measure_peak(dtype, reps=reps) if native.get(dtype, True) else None
        for dtype in dtypes.split(",")
        if dtype
    }


def calibrate(args: argparse.Namespace, ch: Channel) -> None:
    import torch

    from bench.flops import ModelShape, corpus_flops_from_sums
    from embedkit import Embedder
    from embedkit.engine.device import cpu_supports_bf16, cpu_supports_int8

    texts = bench_corpus.load(args.corpus)
    emb = Embedder(args.model, device="cpu", precision="fp32")
    tok = emb.tokenize(texts)
    lengths = tok.lengths.astype(np.int64)
    shape = ModelShape.from_config(emb.model.transformer.config)
    tokens, tokens_sq = int(lengths.sum()), int((lengths * lengths).sum())
    ch.send(
        ok=True,
        texts=len(texts),
        tokens=tokens,
        tokens_sq=tokens_sq,
        truncated=int(tok.truncated.sum()),
        max_seq_length=emb.max_seq_length,
        model=emb.model.name,
        model_path=str(emb.model.path),
        shape=shape.to_dict(),
        dense_flops_per_token=shape.dense_flops_per_token,
        corpus_flops=corpus_flops_from_sums(shape, tokens, tokens_sq),
        peak_flops=peaks(args.peak_dtypes, args.peak_reps),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        bf16_native=cpu_supports_bf16(),
        int8_native=cpu_supports_int8(),
        mkldnn=bool(torch.backends.mkldnn.is_available()),
        omp_wait_policy=OMP_POLICY["at_torch_load"],
        backend_plan=emb.backend_note,  # which runtime auto gives which batches, fp32 (Embedder's default)
        backend_plan_bf16=Embedder(args.model, device="cpu", precision="bf16").backend_note,
        unpadded=emb.unpadded,
    )


def _load_encoder(model_spec: str, kind: str, precision: str) -> Any:
    """A callable ``texts -> np.ndarray`` for the config."""
    if kind == "baseline":
        # torch (and its OpenMP) load here first, in the environment the parent gave this process
        from sentence_transformers import SentenceTransformer

        from embedkit.models import resolve_model

        model = SentenceTransformer(str(resolve_model(model_spec)), device="cpu")

        def encode(texts: list[str]) -> np.ndarray:
            return model.encode(texts, batch_size=32, show_progress_bar=False)

        return encode
    from embedkit import Embedder

    return Embedder(model_spec, device="cpu", precision=precision).encode


def encode_loop(args: argparse.Namespace, ch: Channel, stdin: TextIO) -> None:
    texts = bench_corpus.load(args.corpus)
    t0 = time.perf_counter()
    encode = _load_encoder(args.model, args.kind, args.precision)
    load_s = time.perf_counter() - t0
    encode(texts[:WARMUP_TEXTS])
    ch.send(
        ok=True, event="ready", load_s=load_s, rss=memory_mib(), omp_wait_policy=OMP_POLICY["at_torch_load"]
    )
    saved = False
    for line in stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "peak":
            ch.send(ok=True, event="peak", peak_flops=peaks(args.peak_dtypes, args.peak_reps))
            continue
        if cmd != "run":
            ch.send(ok=False, error=f"unknown command {cmd!r}")
            continue
        t0 = time.perf_counter()
        vecs = encode(texts)
        seconds = time.perf_counter() - t0
        if not saved and args.vectors_out:
            np.save(args.vectors_out, np.asarray(vecs, dtype=np.float32))
            saved = True
        ch.send(ok=True, event="result", seconds=seconds, rss=memory_mib())


def stream(args: argparse.Namespace, ch: Channel) -> None:
    from embedkit import Embedder

    emb = Embedder(args.model, device="cpu", precision=args.precision)
    pool = bench_corpus.load(args.corpus)
    lengths = emb.tokenize(pool).lengths.astype(np.int64)
    full, rem = divmod(args.n, len(pool))
    tokens_sq = int(full * (lengths * lengths).sum() + (lengths[:rem] * lengths[:rem]).sum())
    peak_flops = peaks(args.peak_dtypes, args.peak_reps) if args.peak_reps else {}
    emb.encode(pool[:WARMUP_TEXTS])
    before = memory_mib()
    tokens0 = emb.stats.tokens
    rows = 0
    checksum = 0.0
    t0 = time.perf_counter()
    for chunk in emb.encode_iter(bench_corpus.cycled_short(args.n, pool), chunk_size=args.chunk_size):
        rows += len(chunk)
        checksum += float(chunk[:, 0].sum())
    seconds = time.perf_counter() - t0
    ch.send(
        ok=True,
        n=args.n,
        rows=rows,
        seconds=seconds,
        tokens=int(emb.stats.tokens - tokens0),
        tokens_sq=tokens_sq,
        peak_flops=peak_flops,
        chunk_size=args.chunk_size,
        rss_before=before,
        rss=memory_mib(),
        checksum=checksum,
    )


def door(args: argparse.Namespace, ch: Channel) -> None:
    import importlib

    module = args.module or f"bench.bench_{args.section}"
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        ch.send(ok=False, skipped=f"{module} could not be imported: {exc}")
        return
    texts = bench_corpus.load(args.corpus)
    if args.section in ("job", "ray"):
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        out = mod.run(texts, args.precision, args.workdir)
    else:
        out = mod.run(texts, args.precision)
    out = dict(out or {})
    vecs = out.pop("vectors", None)
    if vecs is not None and args.vectors_out:
        np.save(args.vectors_out, np.asarray(vecs, dtype=np.float32))
    ch.send(ok=True, result=_jsonable(out), has_vectors=vecs is not None, rss=memory_mib())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    p.add_argument("mode", choices=["calibrate", "encode", "iter", "door"])
    p.add_argument("--corpus", required=True, help="JSON list of texts written by bench.run")
    p.add_argument("--model", default="default", help="model spec (the benchmark uses the default model)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--kind", choices=["baseline", "embedkit"], default="embedkit")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--vectors-out", default="")
    p.add_argument("--peak-dtypes", default="fp32,bf16,int8")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--section", choices=["job", "serve", "ray"], default="job")
    p.add_argument("--module", default="", help="door module (default bench.bench_<section>)")
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)
    stdin = sys.stdin
    ch = Channel()
    if args.mode != "calibrate" and args.kind != "baseline":
        import embedkit  # noqa: F401 - before torch: embedkit's process settings (OpenMP) apply
    OMP_POLICY["at_torch_load"] = os.environ.get("OMP_WAIT_POLICY")
    _set_threads(args.threads)
    try:
        if args.mode == "calibrate":
            calibrate(args, ch)
        elif args.mode == "encode":
            encode_loop(args, ch, stdin)
        elif args.mode == "iter":
            stream(args, ch)
        else:
            door(args, ch)
    except Exception as exc:
        ch.send(ok=False, error=f"{type(exc).__name__}: {exc}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

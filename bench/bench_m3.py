"""The ``m3`` section of ``make bench``: BGE-M3's three outputs against dense alone and FlagEmbedding.

The model is random, with BGE-M3's geometry shrunk as the issue asks: XLM-RoBERTa with BGE-M3's
vocabulary size (250,002 embedding rows), 6 layers, hidden size 384 (6 heads of 64), 8192
positions, and the sparse and ColBERT heads (:func:`embedkit.testing.build_tiny_bge_m3`; its
tokenizer is trained on Python's docs, so token counts are real-text-like). The texts are 2,000
documents of the bench corpus (docstring summaries and language-reference passages), in fp32:

* ``dense``: ``Embedder(model).encode(texts)`` (default settings: token budget, backend auto);
* ``all three``: ``encode(texts, return_sparse=True, return_colbert_vecs=True)``, same engine;
* ``FlagEmbedding``: ``BGEM3FlagModel(use_fp16=False).encode(..., return_dense/sparse/colbert)``
  in ``.venv-flagembedding`` (``make reference``), its own batching at ``batch_size=32`` (its
  default, 256, pads each batch to its longest text: 53x embedkit's time on 300 of these
  documents); skipped when that venv is absent.

Each round runs embedkit's two cases, then FlagEmbedding's (kept loaded in its own process); the
ratios are the medians of the rounds' own ratios. Targets: all three <= 1.2x dense alone;
FlagEmbedding / embedkit all three >= 1.5x.

``--memory`` adds the peak RSS of one 8192-token input with all three outputs per precision
(fp32, bf16, int8; each in a fresh process), beside the RSS once the model is loaded.

    python -m bench.bench_m3 --json-out /tmp/m3.json            # ~5 min on 2 cores
    python -m bench.bench_m3 --memory --n 200 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import print_and_save

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = Path(os.environ.get("EMBEDKIT_REFERENCE_PYTHON", ROOT / ".venv-flagembedding/bin/python"))
GEOMETRY = dict(
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=6,
    intermediate_size=1536,
    embedding_rows=250_002,  # BGE-M3's vocabulary; the tokenizer learns what the docs hold (~13k)
    vocab_size=32_000,
)
ALL_OVER_DENSE_BAR = 1.2
VS_FLAG_BAR = 1.5
PRECISIONS = ("fp32", "bf16", "int8")


def build_model(folder: Path) -> Path:
    """The random BGE-M3-geometry model in ``folder`` (built once; reused when present)."""
    from embedkit.testing import build_tiny_bge_m3

    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text())["vocab_size"] != GEOMETRY["embedding_rows"]:
        shutil.rmtree(folder, ignore_errors=True)
        build_tiny_bge_m3(folder, **GEOMETRY)
    return folder


def documents(n: int) -> list[str]:
    """``n`` documents of the bench corpus (summaries and passages, in its seeded order)."""
    from bench.corpus import build_corpus

    texts = build_corpus()
    return [texts[i % len(texts)] for i in range(n)]


def long_text(emb: Any, tokens: int = 8192) -> str:
    """Real text at least ``tokens`` long for this model's tokenizer (the passages run together)."""
    from bench.corpus import build_corpus

    parts, text = build_corpus(0, 0), ""
    for part in parts * 20:
        text += part + "\n\n"
        if len(emb.model.tokenizer(text)["input_ids"]) > tokens:  # the engine truncates to 8192
            return text
    return text


class FlagWorker:
    """FlagEmbedding in ``.venv-flagembedding`` (bench/m3_reference.py), loaded once, timed on request."""

    def __init__(self, model: Path, texts: list[str], work: Path) -> None:
        (work / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
        cmd = [
            str(REFERENCE_PYTHON),
            str(ROOT / "bench/m3_reference.py"),
            str(model),
            str(work / "texts.json"),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._answer() != "ready":
            raise RuntimeError("FlagEmbedding did not start (see its stderr above)")

    def _answer(self) -> str:
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"FlagEmbedding exited ({self.proc.wait()})")
        return line

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self._answer())

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


def time_rounds(model: Path, texts: list[str], reps: int, work: Path) -> dict[str, Any]:
    """``reps`` rounds of embedkit dense, embedkit all three and FlagEmbedding all three, in turn,
    so drift in the machine's speed falls on all three alike."""
    from embedkit import Embedder

    flag = None
    skipped = f"{REFERENCE_PYTHON} is absent: run `make reference`"
    if REFERENCE_PYTHON.exists():
        try:
            flag = FlagWorker(model, texts, work)
        except (OSError, RuntimeError) as exc:
            skipped = f"FlagEmbedding failed: {exc}"
    emb = Embedder(str(model))
    emb.encode(texts[:8], return_sparse=True, return_colbert_vecs=True)
    cases = {
        "dense": lambda: emb.encode(texts),
        "all": lambda: emb.encode(texts, return_sparse=True, return_colbert_vecs=True),
    }
    seconds: dict[str, list[float]] = {"dense": [], "all": [], "flag": []}
    out: dict[str, Any] = {}
    try:
        for _ in range(reps):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                out[name] = fn()
                seconds[name].append(time.perf_counter() - t0)
            if flag is not None:
                seconds["flag"].append(flag.ask("run")["seconds"])
        res: dict[str, Any] = {
            "seconds": seconds,
            "tokens": int(emb.tokenize(texts).lengths.sum()),
            "backend": emb.describe()["backend_plan"],
            "dense_same_in_all": float(np.abs(out["dense"] - out["all"]["dense_vecs"]).max()),
        }
        if flag is not None:
            flag.ask(f"dump {work / 'flag-dense.npy'}")
            res["dense_max_abs_diff_vs_flag"] = float(
                np.abs(np.load(work / "flag-dense.npy") - out["all"]["dense_vecs"]).max()
            )
        else:
            res["flag_skipped"] = skipped
        return res
    finally:
        if flag is not None:
            flag.close()


def memory_probe(model: str, precision: str) -> dict[str, Any]:
    """In this process: RSS after loading at ``precision``, then peak RSS over one 8192-token text."""
    from embedkit import Embedder

    def rss_mib() -> float:
        with open("/proc/self/status", encoding="ascii") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return kb / 1024

    emb = Embedder(model, precision=precision, backend="torch")
    text = long_text(emb)
    emb.encode(["warm up"], return_sparse=True, return_colbert_vecs=True)
    loaded = rss_mib()
    t0 = time.perf_counter()
    got = emb.encode([text], return_sparse=True, return_colbert_vecs=True)
    return {
        "precision": precision,
        "tokens": int(got["colbert_vecs"][0].shape[0] + 1),
        "loaded_rss_mib": round(loaded, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def memory(model: Path) -> list[dict[str, Any]]:
    rows = []
    for precision in PRECISIONS:
        cmd = [sys.executable, "-m", "bench.bench_m3", "--probe", str(model), precision]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-1:]
            rows.append({"precision": precision, "skipped": f"failed: {tail}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def run(workdir: str, n: int = 2000, reps: int = 3, with_memory: bool = False) -> dict[str, Any]:
    work = Path(workdir)
    # A cache of its own: auto measures its crossover afresh, not from an earlier (busier) run.
    os.environ["EMBEDKIT_CACHE_DIR"] = str(work / "cache")
    model = build_model(work / "bge-m3-geometry")
    texts = documents(n)
    timed = time_rounds(model, texts, reps, work)
    runs = timed["seconds"]
    dense_s, all_s = statistics.median(runs["dense"]), statistics.median(runs["all"])
    res: dict[str, Any] = {
        "texts": n,
        "tokens": timed["tokens"],
        "geometry": GEOMETRY,
        "backend": timed["backend"],
        "dense_s": dense_s,
        "all_s": all_s,
        "runs_s": runs,
        "all_over_dense": statistics.median(a / d for a, d in zip(runs["all"], runs["dense"], strict=True)),
        "dense_same_in_all": timed["dense_same_in_all"],
    }
    res["all_over_dense_ok"] = res["all_over_dense"] <= ALL_OVER_DENSE_BAR
    if runs["flag"]:
        vs = statistics.median(f / a for f, a in zip(runs["flag"], runs["all"], strict=True))
        res.update(
            flag_s=statistics.median(runs["flag"]),
            vs_flag=vs,
            vs_flag_ok=vs >= VS_FLAG_BAR,
            dense_max_abs_diff_vs_flag=timed["dense_max_abs_diff_vs_flag"],
        )
    else:
        res["flag"] = {"skipped": timed["flag_skipped"]}
    if with_memory:
        res["memory"] = memory(model)
    return res


def table(res: dict[str, Any]) -> str:
    lines = [
        f"BGE-M3 geometry (random, 6x384, vocab 250k), {res['texts']} docs, {res['tokens']} tokens, fp32",
        f"  dense alone        {res['dense_s']:7.2f} s  ({res['backend']})",
        f"  all three          {res['all_s']:7.2f} s  {res['all_over_dense']:.2f}x dense (target <= 1.2x)",
    ]
    if "flag_s" in res:
        lines.append(
            f"  FlagEmbedding all  {res['flag_s']:7.2f} s  embedkit {res['vs_flag']:.2f}x faster (>= 1.5x)"
        )
    else:
        lines.append(f"  FlagEmbedding: {res['flag']['skipped']}")
    for row in res.get("memory") or []:
        if "skipped" in row:
            lines.append(f"  memory {row['precision']}: {row['skipped']}")
        else:
            lines.append(
                f"  memory {row['precision']:>5}: {row['loaded_rss_mib']:.0f} MiB loaded, "
                f"{row['peak_rss_mib']:.0f} MiB peak on {row['tokens']} tokens ({row['seconds']} s)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the model is built (a temp dir)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="also the peak RSS per precision on 8192 tokens")
    p.add_argument("--probe", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(*args.probe)))
        return 0
    with tempfile.TemporaryDirectory(prefix="embedkit-m3-") as tmp:
        res = run(args.workdir or tmp, n=args.n, reps=args.reps, with_memory=args.memory)
    return print_and_save(table(res), res, args.json_out)


if __name__ == "__main__":
    sys.exit(main())

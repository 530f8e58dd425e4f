"""embedkit on one CUDA GPU against naive sentence-transformers on the same GPU.

Not part of ``make bench`` (the team's machines have no GPU); run it on a GPU machine:

    python -m bench.bench_gpu --out gpu.json

Two encoder shapes with random weights, so that nothing is downloaded: the default model's
(all-MiniLM-L6-v2: 6 layers, width 384) and BGE-M3's (XLM-R large: 24 layers, width 1024, 16 heads,
CLS pooling). Both use the default model's tokenizer (``--tokenizer-dir``, default: the bundled
model), so token counts are those of real English text. Throughput does not depend on the weights.

For each shape and precision (fp32, fp16, bf16) it reports texts/s, tokens/s and TFLOP/s on the
bench corpus for embedkit (``Embedder(device="cuda")``, its automatic token budget) and for
``SentenceTransformer.encode(batch_size=32)`` cast to the same dtype, their ratio, the p50 latency of
one short text, and the largest difference between the two libraries' vectors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.corpus import build_corpus
from bench.flops import ModelShape, corpus_flops

SHAPES: dict[str, dict[str, Any]] = {
    "minilm-l6": {"config": {}, "pooling": "mean", "repeat": 8},
    "bge-m3-shape": {
        "config": {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "max_position_embeddings": 514,
        },
        "pooling": "cls",
        "max_seq_length": 512,
        "repeat": 1,
    },
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_tokenizer_dir() -> Path:
    from embedkit.models import resolve_model

    return Path(resolve_model("default"))


def build_model(
    tokenizer_dir: Path, out: Path, config: dict[str, Any], pooling: str, max_seq_length: int | None = None
) -> Path:
    """The default model's files (tokenizer, sentence-transformers layout) with a random encoder of
    the given sizes in place of its weights."""
    from transformers import BertConfig, BertModel

    shutil.copytree(tokenizer_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx"))
    cfg = BertConfig.from_pretrained(str(tokenizer_dir))
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(out))
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    pool["word_embedding_dimension"] = cfg.hidden_size
    pool["pooling_mode_mean_tokens"] = pooling == "mean"
    pool["pooling_mode_cls_token"] = pooling == "cls"
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    if max_seq_length:
        st_config = json.loads((out / "sentence_bert_config.json").read_text())
        st_config["max_seq_length"] = max_seq_length
        (out / "sentence_bert_config.json").write_text(json.dumps(st_config))
    return out


def timed(fn, reps: int) -> tuple[float, Any]:
    """Median seconds of ``reps`` calls after one warm-up call; the last call's result."""
    out = fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def p50_latency(fn, text: str, n: int = 100) -> float:
    fn([text])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn([text])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    torch.mm(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def run_shape(
    name: str, spec: dict[str, Any], tokenizer_dir: Path, corpus: list[str], reps: int
) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    from embedkit import Embedder

    texts = corpus * spec["repeat"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(
            tokenizer_dir, Path(tmp) / name, spec["config"], spec["pooling"], spec.get("max_seq_length")
        )
        cfg = json.loads((path / "config.json").read_text())
        shape = ModelShape(
            cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
        )
        st = SentenceTransformer(str(path), device="cuda")
        max_len = st.max_seq_length
        lengths = [
            min(len(ids), max_len) for ids in st.tokenizer(texts, add_special_tokens=True)["input_ids"]
        ]
        flops = corpus_flops(shape, lengths)
        reference = None
        for precision, dtype in DTYPES.items():
            emb = Embedder(str(path), device="cuda", precision=precision)
            st = SentenceTransformer(str(path), device="cuda").to(dtype)
            ours_s, ours = timed(lambda emb=emb: emb.encode(texts, normalize=True), reps)
            tokenize_s, _ = timed(lambda emb=emb: emb.tokenize(texts), 1)
            base_s, base = timed(
                lambda st=st: st.encode(
                    texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True
                ),
                reps,
            )
            base = np.asarray(base, dtype=np.float32)
            if reference is None:
                reference = base
            short = corpus[0] if len(corpus[0]) < 200 else "how do I read a parquet file"
            row = {
                "shape": name,
                "precision": precision,
                "texts": len(texts),
                "tokens": int(sum(lengths)),
                "embedkit_texts_per_s": len(texts) / ours_s,
                "st_texts_per_s": len(texts) / base_s,
                "speedup_vs_st": base_s / ours_s,
                "embedkit_tflops": flops / ours_s / 1e12,
                "st_tflops": flops / base_s / 1e12,
                "embedkit_p50_ms": 1e3 * p50_latency(emb.encode, short),
                "st_p50_ms": 1e3 * p50_latency(lambda b, st=st: st.encode(b, batch_size=32), short),
                "max_abs_diff_vs_st_same_dtype": float(np.abs(ours - base).max()),
                "min_cos_vs_st_fp32": float((ours * reference).sum(axis=1).min()),
                "embedkit_batches": int(emb.stats.batches),
                "embedkit_tokenize_share": tokenize_s / ours_s,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            del emb, st
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tokenizer-dir", default=None, help="a model directory with the default model's tokenizer"
    )
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU")
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    corpus = build_corpus()
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_tflops": {k: matmul_peak(v) / 1e12 for k, v in DTYPES.items()},
        "rows": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    for name in args.shapes.split(","):
        result["rows"].extend(run_shape(name, SHAPES[name], tokenizer_dir, corpus, args.reps))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""BGE-M3's three outputs as BAAI's FlagEmbedding computes them: the reference of the M3 parity tests.

Run with the interpreter of ``.venv-flagembedding`` (``make reference``), never imported by pytest
(it imports FlagEmbedding, not embedkit)::

    python tests/reference/flag_m3.py REQUEST.json OUT_DIR

REQUEST.json: ``{"model": path, "texts": [str], "max_length": int, "batch_size": int,
"pairs": [[query_index, passage_index]], "weights": [dense, sparse, colbert]}`` (pairs and weights
optional). Writes to OUT_DIR:

- ``arrays.npz``: ``dense_vecs`` (n, dim) float32, ``colbert_<i>`` (tokens - 1, dim) float32 and
  ``input_ids_<i>`` (the tokenizer's ids, truncated to max_length) for each text i;
- ``result.json``: ``lexical_weights`` ([{token id as str: float}]), ``pair_scores`` (for each pair,
  from the encoded outputs: ``dense`` q·p, ``sparse`` = compute_lexical_matching_score, ``colbert`` =
  colbert_score), ``compute_score`` (BGEM3FlagModel.compute_score on the pairs' texts with
  ``weights``: dense, sparse, colbert, sparse+dense, colbert+sparse+dense), ``versions``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(request_path: str, out_dir: str) -> None:
    import FlagEmbedding
    import numpy as np
    import torch
    import transformers
    from FlagEmbedding import BGEM3FlagModel

    req = json.loads(Path(request_path).read_text(encoding="utf-8"))
    texts: list[str] = req["texts"]
    max_length = int(req["max_length"])  # FlagEmbedding's passage_max_length is 512 unless given
    model = BGEM3FlagModel(
        req["model"],
        use_fp16=False,
        devices="cpu",
        passage_max_length=max_length,
        query_max_length=max_length,
    )
    out = model.encode(
        texts,
        batch_size=int(req.get("batch_size", 4)),
        max_length=max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    ids = model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    arrays = {"dense_vecs": np.asarray(out["dense_vecs"], dtype=np.float32)}
    for i, (vecs, text_ids) in enumerate(zip(out["colbert_vecs"], ids, strict=True)):
        arrays[f"colbert_{i}"] = np.asarray(vecs, dtype=np.float32)
        arrays[f"input_ids_{i}"] = np.asarray(text_ids, dtype=np.int64)
    lexical = [{str(k): float(v) for k, v in weights.items()} for weights in out["lexical_weights"]]

    pairs = [(int(q), int(p)) for q, p in req.get("pairs", [])]
    pair_scores = [
        {
            "query": q,
            "passage": p,
            "dense": float(out["dense_vecs"][q] @ out["dense_vecs"][p]),
            "sparse": float(
                model.compute_lexical_matching_score(out["lexical_weights"][q], out["lexical_weights"][p])
            ),
            "colbert": float(model.colbert_score(out["colbert_vecs"][q], out["colbert_vecs"][p])),
        }
        for q, p in pairs
    ]
    compute_score = None
    if pairs:
        scores = model.compute_score(
            [(texts[q], texts[p]) for q, p in pairs],
            batch_size=int(req.get("batch_size", 4)),
            max_query_length=max_length,
            max_passage_length=max_length,
            weights_for_different_modes=req.get("weights", [1.0, 1.0, 1.0]),
        )
        compute_score = {k: [float(x) for x in v] for k, v in scores.items()}

    dest = Path(out_dir)
    dest.mkdir(parents=True, exist_ok=True)
    np.savez(dest / "arrays.npz", **arrays)
    result = {
        "lexical_weights": lexical,
        "pair_scores": pair_scores,
        "compute_score": compute_score,
        "versions": {
            "FlagEmbedding": getattr(FlagEmbedding, "__version__", _dist_version("FlagEmbedding")),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    (dest / "result.json").write_text(json.dumps(result), encoding="utf-8")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

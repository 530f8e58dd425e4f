"""FlagEmbedding's ``BGEM3FlagModel.encode`` timed with all three outputs: the ``m3`` section's
reference, run with ``.venv-flagembedding``'s interpreter (it imports FlagEmbedding, not embedkit).

    python bench/m3_reference.py MODEL TEXTS.json OUT.json [--reps 2]

Loads the model in fp32 on the CPU (``use_fp16=False``), encodes 8 texts untimed, then times
``encode(texts, max_length=8192, return_dense=True, return_sparse=True, return_colbert_vecs=True)``
``reps`` times with FlagEmbedding's own batching at ``batch_size=32`` (its default, 256, pads each
batch to the longest of 256 texts). Writes the times and the dense vectors of the last run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from FlagEmbedding import BGEM3FlagModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("texts")
    p.add_argument("out")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    with open(args.texts, encoding="utf-8") as fh:
        texts = json.load(fh)
    model = BGEM3FlagModel(args.model, use_fp16=False, devices="cpu", passage_max_length=8192)
    opts = dict(
        batch_size=32, max_length=8192, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    model.encode(texts[:8], **opts)
    seconds = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = model.encode(texts, **opts)
        seconds.append(time.perf_counter() - t0)
    np.save(args.out + ".dense.npy", np.asarray(out["dense_vecs"], np.float32))
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"seconds": seconds, "texts": len(texts)}, fh)


if __name__ == "__main__":
    main()

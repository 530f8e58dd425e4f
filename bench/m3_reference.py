"""FlagEmbedding's ``BGEM3FlagModel.encode`` with all three outputs, timed on request: the ``m3``
section's reference, run with ``.venv-flagembedding``'s interpreter (it imports FlagEmbedding, not
embedkit), so that its rounds interleave with embedkit's.

    python bench/m3_reference.py MODEL TEXTS.json

Loads the model in fp32 on the CPU (``use_fp16=False``), encodes 8 texts untimed and prints
``ready``; then for each line ``run`` on stdin times ``encode(texts, batch_size=32, max_length=8192,
return_dense=True, return_sparse=True, return_colbert_vecs=True)`` with FlagEmbedding's own batching
(its default batch size, 256, pads each batch to the longest of 256 texts) and prints
``{"seconds": ...}``; ``dump PATH`` saves the last dense vectors as ``PATH`` (.npy). Exits at EOF.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from FlagEmbedding import BGEM3FlagModel


def main(model_path: str, texts_path: str) -> None:
    with open(texts_path, encoding="utf-8") as fh:
        texts = json.load(fh)
    model = BGEM3FlagModel(model_path, use_fp16=False, devices="cpu", passage_max_length=8192)
    opts = dict(
        batch_size=32, max_length=8192, return_dense=True, return_sparse=True, return_colbert_vecs=True
    )
    out = model.encode(texts[:8], **opts)
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "run":
            t0 = time.perf_counter()
            out = model.encode(texts, **opts)
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        elif command == "dump":
            np.save(arg, np.asarray(out["dense_vecs"], np.float32))
            print(json.dumps({"saved": arg}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])

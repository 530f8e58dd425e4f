"""BGE-M3 golden parity: the fixed texts and the FlagEmbedding reference run on them.

The reference is ``tests/reference/flag_m3.py`` run by the interpreter of ``.venv-flagembedding``
(``make reference``; EMBEDKIT_REFERENCE_PYTHON names another). Without it the tests that need it skip,
or fail where EMBEDKIT_REQUIRE_REFERENCE=1 (``make test`` sets it, so CI never skips them silently).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embedkit.corpus import doc_passages, doc_sentences, docstring_summaries

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "reference" / "flag_m3.py"
M3_MAX_LENGTH = 8192  # BGE-M3's; FlagEmbedding's own default for passages is 512
M3_BATCH_SIZE = 1  # no padding: the plainest computation, and an 8192-token batch of one stays small


def _long_texts() -> list[str]:
    """Runs of consecutive ~380-word passages of the language reference, joined: with the tiny
    model's tokenizer about 3,100, 5,600 and 7,300 tokens, and one of ~10,500 that is truncated to
    8,192 (test_m3_texts_are_as_long_as_claimed checks the counts)."""
    passages = doc_passages()
    return [" ".join(passages[a:b]) for a, b in ((0, 6), (20, 30), (40, 53), (60, 80))]


def _m3_texts() -> list[str]:
    short = [
        "hello world",
        "x",  # one token
        "I",
        ".",
        " ",  # no token between <s> and </s>
        "😀",  # <unk> only: no lexical weights at all
        "日本語",
        "Привет, как дела?",
        "Ünïcödé façade naïve café",  # some characters <unk>, some pieces
        "The quick brown fox jumps over the lazy dog.",
        # <mask>, a special token FlagEmbedding keeps in the lexical weights (weighted above zero here)
        "Fill in the <mask>: the <mask> sat on the <mask>.",
        "word " * 400,  # one token repeated: its lexical weight is the largest of its occurrences
        "  spaces   between\twords\nand lines  ",
    ]
    return (
        short + doc_sentences(limit=4) + docstring_summaries(limit=3) + doc_passages(limit=2) + _long_texts()
    )


M3_TEXTS: list[str] = _m3_texts()
M3_LONG = [i for i, t in enumerate(M3_TEXTS) if len(t.split()) > 1500]  # the indices of the long texts
_SENTENCE = M3_TEXTS.index(doc_sentences(limit=1)[0])
_PASSAGE = M3_TEXTS.index(doc_passages(limit=1)[0])
# (query, passage) indices into M3_TEXTS for the scores: a sentence against a passage, against a
# long text and against itself; a short query against a passage.
M3_PAIRS: list[tuple[int, int]] = [
    (_SENTENCE, _PASSAGE),
    (_SENTENCE, M3_LONG[0]),
    (_SENTENCE, _SENTENCE),
    (0, _PASSAGE),
]
M3_WEIGHTS = [0.4, 0.2, 0.4]  # dense, sparse, colbert: BGE-M3's model card's hybrid example


def reference_python() -> Path:
    """The reference venv's interpreter; skips the test (fails under EMBEDKIT_REQUIRE_REFERENCE=1)
    when it is missing."""
    path = Path(
        os.environ.get("EMBEDKIT_REFERENCE_PYTHON") or ROOT / ".venv-flagembedding" / "bin" / "python"
    )
    if not path.exists():
        if os.environ.get("EMBEDKIT_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"{path} is missing; `make reference` builds it")
        pytest.skip(f"{path} is missing; run `make reference` to build the FlagEmbedding venv")
    return path


def run_m3_reference(model: Path, work: Path) -> dict:
    """FlagEmbedding's BGEM3FlagModel on ``model`` over M3_TEXTS (fp32, CPU, max_length 8192).

    Returns ``dense_vecs`` ((n, dim) float32), ``lexical_weights`` ([{token id as str: float}]),
    ``colbert_vecs`` ([(tokens - 1, dim) float32]), ``input_ids`` ([int64 array], the reference
    tokenizer's ids), ``pair_scores`` and ``compute_score`` (for M3_PAIRS, weights M3_WEIGHTS; see
    the script), ``versions``, and the ``texts``, ``pairs`` and ``weights`` it ran on."""
    python = reference_python()
    request = {
        "model": str(model),
        "texts": M3_TEXTS,
        "max_length": M3_MAX_LENGTH,
        "batch_size": M3_BATCH_SIZE,
        "pairs": M3_PAIRS,
        "weights": M3_WEIGHTS,
    }
    (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)  # the reference imports FlagEmbedding only, never this checkout
    proc = subprocess.run(
        [str(python), str(SCRIPT), str(work / "request.json"), str(work / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    result = json.loads((work / "out" / "result.json").read_text(encoding="utf-8"))
    with np.load(work / "out" / "arrays.npz") as arrays:
        n = len(M3_TEXTS)
        result["dense_vecs"] = arrays["dense_vecs"]
        result["colbert_vecs"] = [arrays[f"colbert_{i}"] for i in range(n)]
        result["input_ids"] = [arrays[f"input_ids_{i}"] for i in range(n)]
    result.update(texts=M3_TEXTS, pairs=M3_PAIRS, weights=M3_WEIGHTS, python=str(python))
    return result

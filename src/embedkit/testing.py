"""Tiny random models for fast tests (yours and ours): no download, built in well under a second.

>>> import tempfile
>>> from embedkit.testing import build_tiny_bert
>>> path = build_tiny_bert(tempfile.mkdtemp())
>>> from embedkit import Embedder
>>> Embedder(str(path)).encode(["hello world"]).shape
(1, 32)
"""

from __future__ import annotations

import json
from pathlib import Path

_WORDS = (
    "the a an and or of to in on at for with is are was be it this that cat dog sat mat park hello "
    "world embed vector text model search query document fast slow red blue green big small run runs "
    "running house car tree water fire sun moon star book read write python data file job server "
    "client cloud"
).split()


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-:;()")
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return specials + chars + pieces + _WORDS


def build_tiny_bert(
    out_dir: str | Path,
    *,
    layout: str = "sentence-transformers",
    hidden_size: int = 32,
    max_seq_length: int = 32,
    pooling: str = "mean",
    normalize: bool = True,
    seed: int = 0,
    prompts: dict[str, str] | None = None,
) -> Path:
    """Write a random BERT (2 layers) with a real WordPiece tokenizer to ``out_dir``.

    ``layout`` is ``sentence-transformers`` (modules.json, pooling config) or ``hf`` (plain
    transformers directory). Returns the directory.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=max(64, max_seq_length),
    )
    BertModel(config).eval().save_pretrained(str(out))
    if layout == "sentence-transformers":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
        )
        (out / "1_Pooling").mkdir(exist_ok=True)
        flags = {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": pooling == "mean_sqrt_len",
        }
        (out / "1_Pooling" / "config.json").write_text(json.dumps(flags, indent=2))
        (out / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts or {}, "default_prompt_name": None})
        )
    elif layout != "hf":
        raise ValueError(f"layout must be 'sentence-transformers' or 'hf', got {layout!r}")
    return out

"""Describe a model: dimension, max length, pooling, normalisation, size, and a content hash.

The content hash tags every output embedkit writes, so vectors from different weights never mix.
It covers every file of the model directory except docs (README, .gitattributes) and is cached by the
files' sizes and modification times, so large models are hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from embedkit.io.fs import replace_text
from embedkit.models.resolve import cache_dir, sha256_file

_SKIP_NAMES = {"README.md", ".gitattributes"}


@dataclass(frozen=True)
class ModelInfo:
    """What a user needs to know about a model before trusting its vectors."""

    name: str
    path: str
    model_type: str
    dimension: int
    max_seq_length: int
    pooling: str
    normalize: bool
    num_parameters: int
    content_hash: str
    prompts: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _model_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name in _SKIP_NAMES or name.startswith("."):
                continue
            files.append(Path(dirpath) / name)
    return files


def content_hash(root: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` over the model directory's files (relative names and bytes)."""
    root = Path(root)
    files = _model_files(root)
    signature = json.dumps(
        [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    )
    sig_key = hashlib.sha256((str(root.resolve()) + signature).encode()).hexdigest()
    memo = cache_dir() / "hashes" / sig_key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    total = hashlib.sha256()
    for f in files:
        total.update(f"{f.relative_to(root)}\0{sha256_file(f)}\n".encode())
    digest = "sha256:" + total.hexdigest()
    try:
        replace_text(memo, digest)
    except OSError:  # read-only home: hashing again next time is fine
        pass
    return digest

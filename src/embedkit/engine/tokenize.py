"""Stage 1 of the engine: validate texts and tokenise them once, without padding.

Uses the Rust ``tokenizers`` backend directly when the model has a fast tokenizer (it is what the
Hugging Face tokenizer call runs underneath, minus the Python overhead); the result is identical to
``tokenizer(texts, truncation=True, max_length=...)``. Truncation is counted, never silent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedkit.errors import InputError, InputTooLongError


@dataclass
class Tokenized:
    """Token ids of a list of texts, one int32 array per text (special tokens included)."""

    ids: list[np.ndarray]
    lengths: np.ndarray  # tokens per text after truncation
    original_lengths: np.ndarray  # tokens per text before truncation
    truncated: np.ndarray  # bool per text

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())

    def select(self, indices: Sequence[int] | np.ndarray) -> Tokenized:
        idx = np.asarray(indices, dtype=np.int64)
        return Tokenized(
            ids=[self.ids[i] for i in idx],
            lengths=self.lengths[idx],
            original_lengths=self.original_lengths[idx],
            truncated=self.truncated[idx],
        )

    @staticmethod
    def concat(parts: Sequence[Tokenized]) -> Tokenized:
        if not parts:
            return Tokenized([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
        return Tokenized(
            ids=[a for p in parts for a in p.ids],
            lengths=np.concatenate([p.lengths for p in parts]),
            original_lengths=np.concatenate([p.original_lengths for p in parts]),
            truncated=np.concatenate([p.truncated for p in parts]),
        )


def validate_texts(texts: Sequence[Any], *, field: str = "inputs", offset: int = 0) -> list[str]:
    """Check every item is a non-empty string; raise :class:`InputError` naming the first bad index."""
    if isinstance(texts, (str, bytes)):
        raise InputError(
            f"{field} must be a list of strings, got a single {type(texts).__name__}", field=field
        )
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            kind = "null" if t is None else type(t).__name__
            raise InputError(
                f"{field}[{i + offset}] must be a string, got {kind}", field=field, index=i + offset
            )
        if t == "":
            raise InputError(
                f"{field}[{i + offset}] is an empty string; remove it or give it text",
                field=field,
                index=i + offset,
            )
    return out


class TextTokenizer:
    """Tokenise with truncation accounting for one model (thread-safe for reads)."""

    def __init__(self, hf_tokenizer: Any, max_seq_length: int, *, do_lower_case: bool = False) -> None:
        self.hf = hf_tokenizer
        self.max_seq_length = int(max_seq_length)
        self.do_lower_case = do_lower_case
        self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0)
        self._fast = None
        self._fast_full = None
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(hf_tokenizer, "truncation_side", "right") == "right":
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_padding()
            self._fast.enable_truncation(max_length=self.max_seq_length)
            self._fast_full = Tokenizer.from_str(backend.to_str())
            self._fast_full.no_padding()
            self._fast_full.no_truncation()
            post = self._fast.post_processor
            self._specials = post.num_special_tokens_to_add(False) if post is not None else 0
            self._overflow_counts = self._overflow_counts_exact()

    def _overflow_counts_exact(self) -> bool:
        """Whether a truncated text's full length is its kept tokens plus its overflowing pieces
        (each with the special tokens the template adds), checked once on a long probe. Then the
        length of a cut text costs nothing; otherwise cut texts are tokenised again uncut."""
        probe = "the quick brown fox jumps over the lazy dog, 1234 times. " * (self.max_seq_length // 4 + 8)
        (enc,) = self._fast.encode_batch([probe], add_special_tokens=True)
        full = len(self._fast_full.encode(probe, add_special_tokens=True).ids)
        return bool(enc.overflowing) and self._full_length(enc) == full

    def _full_length(self, enc: Any) -> int:
        return len(enc.ids) + sum(len(o.ids) - self._specials for o in enc.overflowing)

    def _prep(self, texts: list[str]) -> list[str]:
        return [t.lower() for t in texts] if self.do_lower_case else texts

    def __call__(
        self, texts: Sequence[str], *, truncate: bool = True, field: str = "inputs", offset: int = 0
    ) -> Tokenized:
        """Tokenise already-validated ``texts``. With ``truncate=False`` an over-long text raises
        :class:`InputTooLongError` naming its index and token count."""
        texts = self._prep(list(texts))
        n = len(texts)
        if n == 0:
            return Tokenized.concat([])
        if self._fast is not None:  # the untruncating tokenizer never overflows
            fast = self._fast if truncate else self._fast_full
            if n == 1:  # a query: encode_batch would hand it to the Rust thread pool and wait
                encs = [fast.encode(texts[0], add_special_tokens=True)]
            else:
                encs = fast.encode_batch(texts, add_special_tokens=True)
            ids = [np.asarray(e.ids, dtype=np.int32) for e in encs]
            truncated = np.fromiter((bool(e.overflowing) for e in encs), dtype=bool, count=n)
            lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=n)
            original = lengths.copy()
            cut = np.flatnonzero(truncated)
            if self._overflow_counts:
                for i in cut:
                    original[i] = self._full_length(encs[i])
            elif cut.size:
                full = self._fast_full.encode_batch([texts[i] for i in cut], add_special_tokens=True)
                original[cut] = [len(e.ids) for e in full]
        else:
            full = self.hf(texts, add_special_tokens=True, truncation=False)["input_ids"]
            original = np.fromiter((len(x) for x in full), dtype=np.int64, count=n)
            if truncate and (original > self.max_seq_length).any():
                cut = self.hf(texts, add_special_tokens=True, truncation=True, max_length=self.max_seq_length)
                ids = [np.asarray(x, dtype=np.int32) for x in cut["input_ids"]]
            else:
                ids = [np.asarray(x, dtype=np.int32) for x in full]
            lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=n)
            truncated = original > lengths
        if not truncate:
            too_long = np.flatnonzero(lengths > self.max_seq_length)
            if too_long.size:
                i = int(too_long[0])
                raise InputTooLongError(
                    f"{field}[{i + offset}] has {int(lengths[i])} tokens, more than the model's maximum of "
                    f"{self.max_seq_length}; shorten it or allow truncation (truncate=true)",
                    field=field,
                    index=i + offset,
                    tokens=int(lengths[i]),
                )
        return Tokenized(ids=ids, lengths=lengths, original_lengths=original, truncated=truncated)

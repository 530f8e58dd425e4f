"""Stage 1 of a unit: read its rows, sort out the ones that cannot be embedded, tokenise the rest.

Every row ends in exactly one of the valid rows or ``Prepared.rejects`` with a reason (listed in
docs/batch-jobs.md, "Rejects"): the engine raises on the first bad item, a batch job goes on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from embedkit.batch.plan import Plan, Unit
from embedkit.engine.tokenize import Tokenized
from embedkit.io.readers import RowBlock, StreamCache, read_rows

RejectRow = tuple[str, "int | None", "str | None", str]


@dataclass
class Prepared:
    """A unit read and checked: the rows to embed (tokenised texts, or image records) and the rows
    rejected."""

    unit: Unit
    rows_in: int
    ids: list[str] = field(default_factory=list)  # one per valid row
    tok: Tokenized | None = None
    extra: dict[str, pa.Array] = field(default_factory=dict)  # pass-through columns, valid rows only
    rejects: list[RejectRow] = field(default_factory=list)
    rows_rejected: int = 0  # rows, which for a whole unreadable file can exceed len(rejects)
    truncated: int = 0
    read_seconds: float = 0.0
    failed: bool = False  # the whole unit could not be read
    records: list[Any] = field(default_factory=list)  # image units: the valid rows' image records

    def drop(self, rejected: list[RejectRow], keep: Sequence[int]) -> None:
        """Reject valid rows after the fact (too long, undecodable): add their ``rejected`` records
        (the rejects stay in row order) and keep only the valid rows at positions ``keep``."""
        if rejected:
            self.rejects.extend(rejected)
            self.rejects.sort(key=lambda r: r[1] if r[1] is not None else -1)
        self.ids = [self.ids[i] for i in keep]
        if self.tok is not None:
            self.tok = self.tok.select(keep)
        if self.records:
            self.records = [self.records[i] for i in keep]
        self.rows_rejected = len(self.rejects)

    @property
    def num_valid(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return self.tok.num_tokens if self.tok is not None else 0


def reason_kind(reason: str) -> str:
    """``"null text"`` -> ``null text``; ``"unreadable: ..."`` -> ``unreadable``."""
    return reason.split(":", 1)[0]


def _id_column(plan: Plan, unit: Unit) -> str | None:
    return plan.id_column if plan.id_column in unit.file.columns else None


def read_unit(plan: Plan, unit: Unit, streams: StreamCache | None = None) -> RowBlock:
    """Read ``unit``'s text and id columns (and pass-through ones); raises on an unreadable file."""
    id_col = _id_column(plan, unit)
    columns = [plan.text_column, *([id_col] if id_col and id_col != plan.text_column else [])]
    return read_rows(
        plan.fs, unit.file, columns, unit.start, unit.stop, arrow_columns=plan.keep_columns, streams=streams
    )


def prepare_unit(plan: Plan, unit: Unit, block: RowBlock, embedder: Any, *, truncate: bool) -> Prepared:
    """Reject ``unit``'s rows (read into ``block``) that cannot be embedded, tokenise the rest with
    ``embedder``."""
    id_col = _id_column(plan, unit)
    texts = block.columns[plan.text_column]
    raw_ids = block.columns[id_col] if id_col else None
    src, start = unit.source, unit.start
    out = Prepared(unit=unit, rows_in=block.num_rows)
    keep_idx: list[int] = []
    valid_texts: list[str] = []
    for i, text in enumerate(texts):
        row = start + i
        rid = raw_ids[i] if raw_ids is not None else f"{src}:{row}"
        sid = None if rid is None else str(rid)
        if i in block.errors:
            reason = block.errors[i]
        elif text is None:
            reason = "null text"
        elif not isinstance(text, str):
            reason = f"not a string: {type(text).__name__}"
        elif not text.strip():
            reason = "empty text"
        elif sid is None:
            reason = f"null id: column {id_col!r} is null"
        else:
            keep_idx.append(i)
            valid_texts.append(text)
            out.ids.append(sid)
            continue
        out.rejects.append((src, row, sid, reason))
    if valid_texts:
        out.tok = tok = embedder.tokenize(valid_texts, truncate=True, field=f"{src} rows")
        if not truncate and tok.truncated.any():
            limit = embedder.max_seq_length
            too_long = [
                (
                    src,
                    start + keep_idx[j],
                    out.ids[j],
                    f"too long: {int(tok.original_lengths[j])} tokens, over the model's maximum of "
                    f"{limit} (allow truncation or shorten it)",
                )
                for j in np.flatnonzero(tok.truncated)
            ]
            keep = np.flatnonzero(~tok.truncated)
            keep_idx = [keep_idx[j] for j in keep]
            out.drop(too_long, keep)
        out.truncated = out.tok.num_truncated
    out.rows_rejected = len(out.rejects)
    if plan.keep_columns:
        take = pa.array(keep_idx, pa.int64())
        out.extra = {c: block.arrow[c].take(take) for c in plan.keep_columns}
    return out


def failed_unit(unit: Unit, reason: str, t0: float) -> Prepared:
    """A unit that cannot be read. A known row range is rejected row by row; a whole file (CSV /
    JSON Lines of unknown length, or a file missing a column) is one reject record with
    ``row=None``, counting the file's rows when they are known."""
    if unit.stop is not None:
        rejects = [(unit.source, r, None, reason) for r in range(unit.start, unit.stop)]
        rows_in = unit.stop - unit.start
    else:
        rejects = [(unit.source, None, None, reason)]
        rows_in = unit.file.num_rows or 0
    return Prepared(
        unit=unit,
        rows_in=rows_in,
        rejects=rejects,
        rows_rejected=rows_in,
        read_seconds=time.perf_counter() - t0,
        failed=True,
    )

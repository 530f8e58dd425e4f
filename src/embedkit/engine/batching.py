"""Token-budget batching: group length-sorted inputs so each padded batch (``n`` texts of length
``L`` cost ``n * L`` tokens) stays within a budget, short texts in large batches, long ones in small.

>>> import numpy as np
>>> [b.tolist() for b in plan_batches(np.array([3, 10, 4, 9]), max_batch_tokens=20)]
[[1, 3], [2, 0]]
"""

from __future__ import annotations

import numpy as np


def plan_batches(
    lengths: np.ndarray,
    max_batch_tokens: int,
    max_batch_size: int | None = None,
    *,
    min_fill: float = 0.75,
    min_batch_tokens: int | None = None,
    max_attention_cells: int | None = None,
) -> list[np.ndarray]:
    """Indices into ``lengths`` grouped into batches, longest first.

    Each batch satisfies ``len(batch) * max(lengths[batch]) <= max_batch_tokens`` unless a single
    input alone is longer than the budget (it then forms a batch of one). A batch is also closed
    early when the next input is shorter than ``min_fill`` of the batch's longest and the batch
    already holds ``min_batch_tokens`` (default: an eighth of the budget), so padding stays small
    without starving the model of work. ``max_attention_cells`` bounds ``len(batch) * L * L`` too:
    attention scores grow with the square of the length, so long inputs travel in smaller batches
    (again, one input alone always runs).
    """
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    floor = max_batch_tokens // 8 if min_batch_tokens is None else min_batch_tokens
    cap = max_batch_size or len(order)
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(int(sorted_len[start]), 1)
        limit = max(1, min(cap, max_batch_tokens // longest, n - start))
        if max_attention_cells:
            limit = max(1, min(limit, max_attention_cells // (longest * longest)))
        end = start + 1
        while end < start + limit:
            if sorted_len[end] < min_fill * longest and (end - start) * longest >= floor:
                break
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def pad_batch(ids: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ``ids`` into (input_ids int64, attention_mask int64) arrays."""
    width = max(len(a) for a in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, a in enumerate(ids):
        input_ids[row, : len(a)] = a
        mask[row, : len(a)] = 1
    return input_ids, mask

"""The batch job: embed a dataset (Parquet, JSON Lines, CSV; local or ``s3://``) into Parquet,
resumable, exactly once, spot-safe. The CLI door is ``embedkit embed``.

>>> from embedkit.batch import embed_dataset
>>> summary = embed_dataset("s3://bucket/texts/", "s3://bucket/embeddings/")   # doctest: +SKIP
>>> print(summary.table())                                                     # doctest: +SKIP
"""

from embedkit.batch.job import embed_dataset
from embedkit.batch.report import JobSummary
from embedkit.batch.settings import JobSettings

__all__ = ["JobSettings", "JobSummary", "embed_dataset"]

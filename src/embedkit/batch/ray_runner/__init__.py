"""Run the batch job on Ray actors: ``embedkit embed IN OUT --engine ray`` (docs/batch-jobs.md).

The driver plans the job and checks its state as the local engine does; a fixed pool of plain Ray
actors then takes the units still to do by number, each running the local engine's own code per
unit (prepare, embed, write, record), so outputs and state are the local engine's. Only the job,
unit numbers and small result records travel through Ray.

>>> from embedkit.batch import embed_dataset
>>> embed_dataset("s3://b/texts/", "s3://b/emb/", engine="ray", gpus_per_worker=1)  # doctest: +SKIP
"""

from embedkit.batch.ray_runner.driver import RayRunner
from embedkit.batch.ray_runner.sizing import Sizing, size_workers
from embedkit.batch.ray_runner.worker import UnitWorker, driver_embedder, require_ray

__all__ = ["RayRunner", "Sizing", "UnitWorker", "driver_embedder", "require_ray", "size_workers"]

"""Run the batch job on Ray actors: ``embedkit embed IN OUT --engine ray``.

The driver plans the job and checks its state exactly as the local engine does
(:func:`embedkit.batch.embed_dataset`); then a fixed pool of Ray actors (plain ``ray.remote`` actors,
no Ray Data pipeline) takes the units still to do by number, two in flight per actor. Each actor
loads the model once and runs, per unit, the local engine's own code: prepare (read, check,
tokenise; the next unit is read ahead while this one is embedded), embed, write the part and
rejects files, record the unit's marker. So the part files, rejects, markers and metadata are the
local engine's, a unit is recorded only after its files are durable, and a rerun with either engine
skips what either one recorded.

Only the job (once), unit numbers and small result records travel through Ray's object store:
actors read their own input and write their own output (on a multi-node cluster, use ``s3://`` or a
filesystem every node mounts at the same path). An actor runs the driver's backend with ``auto``
resolved from the driver's kept measurement (see :func:`~embedkit.batch.ray_runner.worker.worker_backend`)
and as many engine threads as the CPUs it reserves round to.

>>> from embedkit.batch import embed_dataset
>>> embed_dataset("s3://b/texts/", "s3://b/emb/", engine="ray", gpus_per_worker=1)  # doctest: +SKIP
"""

from embedkit.batch.ray_runner.driver import RayRunner
from embedkit.batch.ray_runner.sizing import Sizing, size_workers
from embedkit.batch.ray_runner.worker import UnitWorker, driver_embedder, require_ray

__all__ = ["RayRunner", "Sizing", "UnitWorker", "driver_embedder", "require_ray", "size_workers"]

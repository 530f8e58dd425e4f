"""Settings of the batch job: engine fields plus the job's own, from flags, env and a YAML file.

Precedence, as everywhere: flag (or keyword argument) > environment (``EMBEDKIT_<FIELD>``) >
``--config`` YAML file > default. The option names of the command lines embedkit replaces
(``--input-path``, ``--input_dir``, ``model_directory``, ``no_checkpoint``...) are declared as
aliases of their fields, so the YAML file takes them as the command line does.

>>> s = JobSettings.build({"input_dir": "data/", "output_dir": "out/", "batch_size": 32}, environ={})
>>> (s.input, s.output, s.batch_size, s.resume)
('data/', 'out/', 32, True)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embedkit.engine.multi import DENSE_ONLY, parse_outputs
from embedkit.errors import ConfigError
from embedkit.settings import EngineSettings, parse_config, setting

RESOURCE_CONFIG = "/opt/ml/config/resourceconfig.json"
DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")


@dataclass
class JobSettings(EngineSettings):
    """Everything ``embedkit embed`` / :func:`embedkit.batch.embed_dataset` accepts."""

    input: str | None = setting(
        None,
        "input: a file, a folder, an s3:// prefix, or a glob (same as INPUT)",
        aliases=("input_path", "input_dir"),
    )
    output: str | None = setting(
        None, "output folder, local or s3:// (same as OUTPUT)", aliases=("output_path", "output_dir")
    )
    text_column: str | None = setting(
        None, "text column; default the first of text, texto, caption, sentence, content"
    )
    id_column: str | None = setting(None, "id column; default key if present, else <file>:<row>")
    keep_columns: tuple[str, ...] | None = setting(
        None, "input columns copied into the output, comma-separated"
    )
    max_samples: int | None = setting(None, "embed only the first N rows of the dataset (testing)")
    dtype: str = setting("float32", "embedding dtype in the output: float32 or float16", choices=DTYPES)
    outputs: tuple[str, ...] = setting(
        DENSE_ONLY,
        "outputs written, comma-separated: dense (the embedding column), sparse (lexical weights: "
        "sparse_indices, sparse_values), colbert (token vectors); sparse and colbert need a BGE-M3 "
        "model with its sparse_linear.pt / colbert_linear.pt heads",
        metavar="dense,sparse,colbert",
    )
    resume: bool = setting(
        True, "skip units recorded by a previous run of the same job", negations=("no_checkpoint",)
    )
    overwrite: bool = setting(False, "replace a job made with other settings instead of refusing")
    num_shards: int | None = setting(
        None, "hosts splitting the units; default from resourceconfig.json, else 1"
    )
    shard_index: int | None = setting(None, "this host's index in 0..num_shards-1")
    single_file: bool = setting(False, "when complete, merge the parts into embeddings.parquet")
    fail_fast: bool = setting(False, "stop at the first rejected row or unreadable file")
    unit_rows: int = setting(50_000, "rows per unit of work (files larger than this are split)")
    num_workers: int | None = setting(
        None, "ray engine: actors in the pool (default one per GPU, else one per node); local: logged only"
    )
    engine: str = setting(
        "local", "local (one engine in this process) or ray (a pool of Ray actors)", choices=ENGINES
    )
    ray_address: str | None = setting(
        None,
        "ray engine: the cluster to join (ray://host:10001, host:6379); unset: start a local Ray",
        env=("RAY_ADDRESS",),
    )
    cpus_per_worker: float | None = setting(
        None, "ray engine: CPUs each actor reserves (default: its share, leaving some free)"
    )
    gpus_per_worker: float = setting(0.0, "ray engine: GPUs each actor reserves (0: run on CPUs)")
    aws_region: str | None = setting(None, "S3 region")
    progress: str = setting(
        "auto",
        "auto (a bar on a terminal, log lines elsewhere), bar, log, none",
        choices=("auto", "bar", "log", "none"),
    )
    log_every: float = setting(30.0, "seconds between progress log lines when not on a terminal")
    modality: str = setting(
        "auto",
        "auto (from the data), text, or image (img2dataset shards, URL lists; a CLIP model)",
        choices=("auto", "text", "image"),
    )
    embed_captions: bool = setting(False, "image jobs: also embed captions (caption_embedding column)")
    fetch_workers: int = setting(16, "image URL lists: URLs fetched at once")
    fetch_timeout: float = setting(10.0, "image URL lists: seconds per fetch try")
    fetch_retries: int = setting(2, "image URL lists: retries of a fetch that timed out or got 429/5xx")
    max_image_bytes: int = setting(20 * 2**20, "image jobs: images over this many bytes are rejected")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep_columns, str):
            self.keep_columns = tuple(c.strip() for c in self.keep_columns.split(",") if c.strip())
        elif self.keep_columns is not None:
            self.keep_columns = tuple(str(c) for c in self.keep_columns)
        self.outputs = parse_outputs(self.outputs)
        if self.outputs != DENSE_ONLY and self.modality == "image":
            raise ConfigError(
                f"--outputs {','.join(self.outputs)} applies to text jobs; image jobs write dense vectors only"
            )
        if self.unit_rows < 1:
            raise ConfigError(f"unit_rows must be >= 1, got {self.unit_rows}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.modality == "text" and self.embed_captions:
            raise ConfigError(
                "--embed-captions applies to image datasets; with --modality text the captions are the text"
            )
        if self.fetch_workers < 1 or self.fetch_timeout <= 0 or self.fetch_retries < 0:
            raise ConfigError("fetch_workers must be >= 1, fetch_timeout > 0 and fetch_retries >= 0")
        if self.max_image_bytes < 1:
            raise ConfigError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        for name in ("id", *output_columns(self.outputs)):
            if self.keep_columns and name in self.keep_columns:
                raise ConfigError(
                    f"keep_columns cannot hold {name!r}: the output has its own {name!r} column"
                )

    @classmethod
    def config_values(cls, config: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """A ``--config`` file's fields; the file may be local or ``s3://`` (read through storage)."""
        if isinstance(config, str) and config:
            return cls.normalize_keys(load_config(config), origin=config)
        return super().config_values(config)

    @classmethod
    def build(
        cls,
        options: Mapping[str, Any] | None = None,
        *,
        config: str | Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> JobSettings:
        """Settings from ``options`` (flags, keyword arguments) > environment > ``config`` (a YAML
        file, or its mapping) > default; see :meth:`~embedkit.settings.Settings.resolve`."""
        return cls.resolve(options, environ=environ, config=config)


def output_columns(outputs: tuple[str, ...]) -> tuple[str, ...]:
    """The part files' columns that hold ``outputs`` (besides ``id``).

    >>> output_columns(("dense", "sparse", "colbert"))
    ('embedding', 'sparse_indices', 'sparse_values', 'colbert')
    """
    return tuple(c for o in outputs for c in OUTPUT_COLUMNS[o])


# The output columns of each output (see embedkit.batch.output.embeddings_table).
OUTPUT_COLUMNS = {
    "dense": ("embedding",),
    "sparse": ("sparse_indices", "sparse_values"),
    "colbert": ("colbert",),
}


def load_config(path: str) -> dict[str, Any]:
    """A flat YAML (or JSON) mapping of job options; local path or s3://."""
    from embedkit.io.fs import get_fs

    fs, p = get_fs(path)
    try:
        with fs.open(p, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return parse_config(raw, path)


@dataclass(frozen=True)
class HostPlan:
    """Which share of the units this host takes, and the name its metadata is written under."""

    num_shards: int
    shard_index: int
    host: str
    hosts: tuple[str, ...]

    @property
    def multi(self) -> bool:
        """Several hosts write into one output: each writes ``metadata-<host>.json``."""
        return self.num_shards > 1 or len(self.hosts) > 1

    @property
    def sees_everything(self) -> bool:
        """This host plans the whole dataset (False with SageMaker's ``ShardedByS3Key``: several
        hosts, ``--num-shards 1``, each seeing only its own files)."""
        return self.num_shards > 1 or len(self.hosts) <= 1


def detect_hosts(num_shards: int | None, shard_index: int | None, environ=None) -> HostPlan:
    """Flags first; else SageMaker's ``resourceconfig.json`` (``current_host``'s index in ``hosts``);
    else one host. The file's path can be moved with ``EMBEDKIT_RESOURCE_CONFIG`` (tests)."""
    environ = os.environ if environ is None else environ
    path = environ.get("EMBEDKIT_RESOURCE_CONFIG", RESOURCE_CONFIG)
    current, hosts = None, ()
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                rc = json.load(fh)
            current, hosts = str(rc["current_host"]), tuple(str(h) for h in rc["hosts"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path} must be JSON with current_host and hosts (as SageMaker writes it): {exc}"
            ) from None
        if current not in hosts:
            raise ConfigError(f"{path}: current_host {current!r} is not in hosts {list(hosts)}")
    if num_shards is not None or shard_index is not None:
        n = 1 if num_shards is None else int(num_shards)
        i = 0 if shard_index is None else int(shard_index)
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"shard_index must be in 0..num_shards-1, got shard {i} of {n}")
        host = current or (f"shard-{i}" if n > 1 else socket.gethostname())
        return HostPlan(n, i, host, hosts)
    if hosts:
        return HostPlan(len(hosts), hosts.index(current), current, hosts)
    name = socket.gethostname()
    return HostPlan(1, 0, name, (name,))

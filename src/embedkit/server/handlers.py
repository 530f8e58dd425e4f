"""Custom ``inference.py`` handlers with the sagemaker-inference-toolkit hooks (``model_fn``,
``input_fn``, ``predict_fn``, ``output_fn`` or ``transform_fn``, each with an optional trailing
``context``), from ``SAGEMAKER_PROGRAM`` in ``SAGEMAKER_SUBMIT_DIRECTORY`` or
``<model dir>/code/inference.py``. Omitted hooks are embedkit's defaults; user hooks run on the
inference worker, one at a time (docs/server.md, "Custom handlers").

>>> handler = load_handler(None, None)  # no program, no model dir: nothing to load
>>> handler is None
True
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedkit.errors import ConfigError

log = logging.getLogger("embedkit.server")


class HandlerLoadError(ConfigError):
    """The user's ``inference.py`` failed to load: importing it or its ``model_fn`` raised."""


HOOKS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")


@dataclass
class Context:
    """The ``context`` argument hooks may take (as the inference toolkit passes it)."""

    model_dir: str
    system_properties: dict[str, Any] = field(default_factory=dict)
    request_processor: list = field(default_factory=list)


class _Hook:
    """A user hook, called with the ``context`` argument only when it declares one."""

    def __init__(self, fn: Callable[..., Any], arity: int, context: Context) -> None:
        self.fn = fn
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
        self.with_context = varargs or len(params) > arity
        self.context = context

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args, self.context) if self.with_context else self.fn(*args)


_ARITY = {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2, "transform_fn": 4}


class CustomHandler:
    """The hooks a user module defines (``None`` for each omitted one)."""

    def __init__(self, module: Any, path: Path, model_dir: Path) -> None:
        self.path = path
        self.model_dir = model_dir
        self.context = Context(str(model_dir), {"model_dir": str(model_dir), "gpu_id": None})
        for name in HOOKS:
            fn = getattr(module, name, None)
            if fn is not None and not callable(fn):
                raise ConfigError(f"{path}: {name} must be a function, got {type(fn).__name__}")
            setattr(self, name, _Hook(fn, _ARITY[name], self.context) if fn is not None else None)
        if self.transform_fn is not None and (self.input_fn or self.predict_fn or self.output_fn):
            raise ConfigError(
                f"{path}: define either transform_fn or input_fn/predict_fn/output_fn, not both "
                "(the toolkit refuses that too)"
            )

    model_fn: _Hook | None
    input_fn: _Hook | None
    predict_fn: _Hook | None
    output_fn: _Hook | None
    transform_fn: _Hook | None

    @property
    def defined(self) -> list[str]:
        return [name for name in HOOKS if getattr(self, name) is not None]


def handler_path(program: str | None, submit_directory: str | None, model_dir: Path | None) -> Path | None:
    """Where the custom module is, or ``None`` when there is none."""
    if submit_directory and "://" in submit_directory:
        raise ConfigError(
            f"SAGEMAKER_SUBMIT_DIRECTORY {submit_directory!r} is remote; embedkit loads handlers from a "
            "local directory: put the code in <model dir>/code (inside model.tar.gz)"
        )
    code_dir = Path(submit_directory) if submit_directory else (model_dir / "code" if model_dir else None)
    if program:
        if code_dir is None:
            raise ConfigError(
                f"SAGEMAKER_PROGRAM={program!r} is set but there is no code directory: set "
                "SAGEMAKER_SUBMIT_DIRECTORY or put the file in <model dir>/code"
            )
        path = code_dir / program
        if not path.is_file():
            raise ConfigError(f"custom handler {path} does not exist (SAGEMAKER_PROGRAM={program!r})")
        return path
    if code_dir is not None and (code_dir / "inference.py").is_file():
        return code_dir / "inference.py"
    return None


def load_handler(
    program: str | None, submit_directory: str | None, model_dir: Path | None = None
) -> CustomHandler | None:
    """Import the custom handler module, if any (its directory goes on ``sys.path`` for its imports)."""
    path = handler_path(program, submit_directory, model_dir)
    if path is None:
        return None
    reqs = path.parent / "requirements.txt"
    if reqs.is_file():
        log.warning(
            "%s found: embedkit installs nothing at run time; bake those packages into the image", reqs
        )
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"embedkit_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import custom handler {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise HandlerLoadError(
            f"custom handler {path} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    handler = CustomHandler(module, path, model_dir or path.parent)
    log.info(
        "custom handler %s defines %s; the rest are embedkit defaults", path, handler.defined or "no hooks"
    )
    return handler

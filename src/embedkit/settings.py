"""Configuration as typed objects read from the environment and command-line flags.

Every field has one environment name (``EMBEDKIT_<FIELD>``, plus the SageMaker/Hugging Face names
where those exist) and one flag. Precedence: flag > environment > default. Doors (batch job, server,
client) subclass :class:`Settings` with their own fields; the engine fields live in
:class:`EngineSettings` and are shared by all of them.

>>> s = EngineSettings.from_env({"EMBEDKIT_PRECISION": "bf16"})
>>> s.precision
'bf16'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

from embedkit.errors import ConfigError

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def parse_bool(value: str | bool, name: str = "value") -> bool:
    """Truthy/falsy strings as processing_main scripts accept them (yes/no, true/false, 1/0, on/off)."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name} must be a boolean (yes/no, true/false, 1/0), got {value!r}")


def setting(
    default: Any, help: str, *, env: tuple[str, ...] = (), secret: bool = False, flag: str | None = None
):
    """A settings field: default, help text, extra environment names, and whether to mask it."""
    return field(default=default, metadata={"help": help, "env": env, "secret": secret, "flag": flag})


@dataclass
class Settings:
    """Base for typed settings; see :class:`EngineSettings` for an example."""

    env_prefix: ClassVar[str] = "EMBEDKIT_"

    @classmethod
    def _coerce(cls, name: str, raw: Any) -> Any:
        hint = get_type_hints(cls)[name]
        text = getattr(hint, "__name__", None) or str(hint)  # "int", not "<class 'int'>"
        if raw is None:
            return None
        if "bool" in text and not isinstance(raw, bool):
            return parse_bool(raw, name)
        if text.startswith("int") and not isinstance(raw, int):
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if text.startswith("float") and not isinstance(raw, float):
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if "int | None" in text and isinstance(raw, str):
            if raw.strip() == "":
                return None
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        return raw

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any):
        """Build from ``environ`` (default ``os.environ``), then apply non-None ``overrides``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            names = (cls.env_prefix + f.name.upper(), *f.metadata.get("env", ()))
            for env_name in names:
                if env_name in environ and environ[env_name] != "":
                    values[f.name] = cls._coerce(f.name, environ[env_name])
                    break
        for k, v in overrides.items():
            if v is not None:
                values[k] = cls._coerce(k, v)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
        """Add one ``--flag`` per field (default None, so the environment still applies)."""
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            env_names = ", ".join((cls.env_prefix + f.name.upper(), *f.metadata.get("env", ())))
            help_text = f"{f.metadata.get('help', '')} (env {env_names}; default {f.default!r})"
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_env(environ, **{k: v for k, v in vars(args).items() if k in names})

    def to_dict(self, *, mask_secrets: bool = True) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if mask_secrets and f.metadata.get("secret") and v:
                v = "***"
            out[f.name] = v
        return out

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), default=str)


@dataclass
class EngineSettings(Settings):
    """How the engine runs: which model, where, at which precision, in which batches."""

    model: str = setting(
        "default", "model: default, a local dir, a model.tar.gz, s3://...", env=("HF_MODEL_ID",)
    )
    device: str = setting("auto", "device: auto, cpu, cuda, cuda:N")
    precision: str = setting("fp32", "fp32 (exact), bf16, fp16 (GPU), int8 (CPU)")
    backend: str | None = setting(
        None, "auto (default: ONNX Runtime for the small batches where it measures faster), torch, onnx"
    )
    max_batch_tokens: int = setting(0, "padded tokens per batch; 0 = automatic from device memory")
    batch_size: int = setting(0, "cap on texts per batch; 0 = no cap (the token budget decides)")
    normalize: bool | None = setting(None, "L2-normalise vectors; unset = the model's own config")
    dimensions: int | None = setting(None, "Matryoshka: keep the first N components")
    truncate: bool = setting(True, "truncate inputs over the model's max length (else reject them)")
    pooling: str | None = setting(None, "override pooling: mean, cls, max, lasttoken, ...")
    prompt_name: str | None = setting(None, "prompt from the model's config to prepend to every text")

    def build_embedder(self, *, defer_graph: bool = False):
        """The :class:`~embedkit.Embedder` these settings describe (an
        :class:`~embedkit.engine.image.ImageEmbedder` for a CLIP-family model); ``defer_graph`` as
        :class:`~embedkit.Embedder` takes it."""
        from embedkit.engine import Embedder
        from embedkit.models.clip import is_clip_spec

        if is_clip_spec(self.model):
            from embedkit.engine.image import ImageEmbedder

            Embedder = ImageEmbedder  # same arguments; embeds images as well as texts
        return Embedder(
            self.model,
            device=self.device,
            precision=self.precision,
            max_batch_tokens=self.max_batch_tokens or "auto",
            max_batch_size=self.batch_size or None,
            normalize=self.normalize,
            dimensions=self.dimensions,
            truncate=self.truncate,
            prompt_name=self.prompt_name,
            pooling=self.pooling,
            backend=self.backend,
            defer_graph=defer_graph,
        )

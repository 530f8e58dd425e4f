"""Settings: each field declared once (:func:`setting`), read from flags, the environment and a
config file, one precedence everywhere: flag > environment > config file > default. The model and
the classes of each door: docs/configuration.md.

>>> s = EngineSettings.resolve({"max_batch_tokens": "0"}, environ={"EMBEDKIT_MAX_BATCH_TOKENS": "512"})
>>> (s.max_batch_tokens, s.source("max_batch_tokens"))
(0, 'flag')
>>> EngineSettings.resolve(environ={"EMBEDKIT_PRECISION": "bf16"}).precision
'bf16'

The base layer: it imports only the standard library, ``errors`` and (for config files) ``yaml``.
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
    default: Any,
    help: str,
    *,
    env: tuple[str, ...] = (),
    secret: bool = False,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    negations: tuple[str, ...] = (),
    short: str | None = None,
    choices: tuple[str, ...] | None = None,
    repeat: bool = False,
    metavar: str | None = None,
):
    """Declare a settings field (the one place a setting is described).

    ``env``: environment names read after ``<env_prefix><FIELD>``. ``aliases``: other names of the
    field, accepted as config-file keys and as flags (``input_dir`` -> ``--input_dir`` and
    ``--input-dir``). ``negations``: for booleans, names that mean False (``no_checkpoint``), besides
    ``no_<field>``. ``flag``: the flag instead of ``--<field-name>``. ``short``: a one-letter flag
    (``-m``). ``choices``: the accepted values (checked whatever the source). ``repeat``: the flag may
    be given several times (a tuple field). ``secret``: masked when printed."""
    return field(
        default=default,
        metadata={
            "help": help,
            "env": env,
            "secret": secret,
            "flag": flag,
            "aliases": aliases,
            "negations": negations,
            "short": short,
            "choices": choices,
            "repeat": repeat,
            "metavar": metavar,
        },
    )


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Settings:
    """Base of the settings classes: resolution, flags, config files and JSON, from the fields."""

    env_prefix: ClassVar[str] = "EMBEDKIT_"
    # Prefix of the generated flags and of their argparse dests (``sagemaker-`` -> ``--sagemaker-role``).
    flag_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")

    # ----------------------------------------------------------- declaration
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def env_names(cls, name: str) -> tuple[str, ...]:
        """The environment variables of field ``name``, first wins."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        return (cls.env_prefix + name.upper(), *f.metadata.get("env", ()))

    @classmethod
    def _type_text(cls, name: str) -> str:
        hint = get_type_hints(cls)[name]
        return getattr(hint, "__name__", None) or str(hint)  # "int", not "<class 'int'>"

    @classmethod
    def _is_bool(cls, name: str) -> bool:
        return "bool" in cls._type_text(name)

    @classmethod
    def _coerce(cls, name: str, raw: Any) -> Any:
        text = cls._type_text(name)
        if raw is None:
            return None
        if "None" in text and isinstance(raw, str) and raw.strip() == "":
            return None
        if "bool" in text:
            return raw if isinstance(raw, bool) else parse_bool(raw, name)
        if text.startswith(("int", "float")):
            kind, word = (int, "an integer") if text.startswith("int") else (float, "a number")
            if isinstance(raw, kind) and not isinstance(raw, bool):
                return raw
            try:
                return kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be {word}, got {raw!r}") from None
        if text.startswith("tuple") and isinstance(raw, list):
            return tuple(raw)
        return raw

    # ------------------------------------------------------------ the sources
    @classmethod
    def env_values(cls, environ: Mapping[str, str] | None = None) -> dict[str, tuple[Any, str]]:
        """``{field: (raw value, variable name)}`` for the fields the environment sets."""
        environ = os.environ if environ is None else environ
        out: dict[str, tuple[Any, str]] = {}
        for name in cls.field_names():
            for env_name in cls.env_names(name):
                if environ.get(env_name, "") != "":
                    out[name] = (environ[env_name], env_name)
                    break
        return out

    @classmethod
    def normalize_keys(cls, values: Mapping[str, Any], origin: str = "options") -> dict[str, Any]:
        """Map declared aliases (``input_dir``), negations (``no_checkpoint``) and dashes onto field
        names; an unknown key is a :class:`ConfigError` naming the valid ones."""
        names: dict[str, str] = {}
        negated: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            names[f.name] = f.name
            for alias in f.metadata.get("aliases", ()):
                names[alias] = f.name
            if cls._is_bool(f.name):
                for neg in (f"no_{f.name}", *f.metadata.get("negations", ())):
                    negated[neg] = f.name
        out: dict[str, Any] = {}
        for key, value in values.items():
            k = str(key).replace("-", "_")
            if k in negated:
                if value is not None:
                    out[negated[k]] = not parse_bool(value, k)
                continue
            if k not in names:
                raise ConfigError(
                    f"{origin}: unknown option {key!r}; valid options: {', '.join(sorted(cls.field_names()))}"
                )
            out[names[k]] = value
        return out

    @classmethod
    def config_values(cls, config: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """The fields a config file (a path, or its mapping already read) sets."""
        if not config:
            return {}
        if isinstance(config, str):
            return cls.normalize_keys(load_config(config), origin=config)
        return cls.normalize_keys(config, origin="config")

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        config: str | Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ):
        """The settings from ``flags`` > ``environ`` (default ``os.environ``) > ``config`` (a YAML/JSON
        file or its mapping) > ``defaults`` (a program's own) > the declared defaults; ``None`` is
        unset. Each field's winning source is kept (:meth:`source`)."""
        layers: list[tuple[str, dict[str, tuple[Any, str]]]] = [
            ("default", {k: (v, "default") for k, v in cls.normalize_keys(defaults or {}).items()}),
            ("config", {k: (v, "config") for k, v in cls.config_values(config).items()}),
            ("env", {k: (v, f"env {n}") for k, (v, n) in cls.env_values(environ).items()}),
            ("flag", {k: (v, "flag") for k, v in cls.normalize_keys(flags or {}).items()}),
        ]
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for _layer, found in layers:
            for name, (value, where) in found.items():
                if value is None or (isinstance(value, tuple | list) and not value and _layer == "flag"):
                    continue
                values[name] = value
                sources[name] = where
        obj = cls(**{k: cls._coerce(k, v) for k, v in values.items()})
        obj._sources = sources
        return obj

    def source(self, name: str) -> str:
        """Where field ``name`` came from: ``flag``, ``env <NAME>``, ``config`` or ``default``."""
        return getattr(self, "_sources", {}).get(name, "default")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any):
        """:meth:`resolve` with ``overrides`` as the flags (keyword arguments in code)."""
        return cls.resolve(overrides, environ=environ)

    # ------------------------------------------------------------------ flags
    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser | Any,
        *,
        skip: tuple[str, ...] = (),
        switches: bool = False,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """One flag per field, defaulting to None so the environment and config file still apply
        beneath it (:meth:`flag_values`). Booleans are ``--name`` / ``--no-name`` with ``switches``,
        else ``--name VALUE``; aliases are hidden from ``--help``; ``defaults`` only changes the
        default the help shows."""
        defaults = defaults or {}
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            meta = f.metadata
            dest = cls.flag_prefix.replace("-", "_") + f.name
            flag = meta.get("flag") or "--" + cls.flag_prefix + f.name.replace("_", "-")
            declared = ["--" + cls.flag_prefix + a.replace("_", "-") for a in meta.get("aliases", ())]
            aliases = [*declared, *("--" + cls.flag_prefix + a for a in meta.get("aliases", ()))]
            if "_" in f.name and not cls.flag_prefix:  # the img2dataset job's --batch_size spellings
                aliases.append("--" + f.name)
            aliases = [a for a in dict.fromkeys(aliases) if a != flag]
            default = defaults.get(f.name, f.default)
            shown = ", ".join(cls.env_names(f.name))
            also = f"; also {', '.join(declared)}" if declared else ""
            help_text = f"{meta.get('help', '')} (env {shown}; default {default!r}{also})"
            names = [flag, *([meta["short"]] if meta.get("short") else [])]
            if switches and cls._is_bool(f.name):
                parser.add_argument(
                    *names, dest=dest, action="store_const", const=True, default=None, help=help_text
                )
                if aliases:
                    parser.add_argument(
                        *aliases, dest=dest, action="store_const", const=True, help=argparse.SUPPRESS
                    )
                negs = [_dashed(f"no_{f.name}")] + [_dashed(n) for n in meta.get("negations", ())]
                parser.add_argument(
                    *dict.fromkeys(negs),
                    dest=dest,
                    action="store_const",
                    const=False,
                    help=f"turn {flag} off",
                )
                continue
            kwargs: dict[str, Any] = {"dest": dest, "default": None}
            if meta.get("repeat"):
                kwargs["action"] = "append"
            if meta.get("choices") and not cls._is_bool(f.name):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            parser.add_argument(*names, help=help_text, **kwargs)
            if aliases:
                parser.add_argument(*aliases, **kwargs, help=argparse.SUPPRESS)

    @classmethod
    def flag_values(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The fields the parsed ``args`` set (flags not given are None and left out)."""
        prefix = cls.flag_prefix.replace("-", "_")
        out: dict[str, Any] = {}
        for name in cls.field_names():
            value = getattr(args, prefix + name, None)
            if value is not None:
                out[name] = tuple(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        environ: Mapping[str, str] | None = None,
        *,
        config: str | Mapping[str, Any] | None = None,
    ):
        """:meth:`resolve` with the parsed ``args`` as the flags."""
        return cls.resolve(cls.flag_values(args), environ=environ, config=config)

    # ------------------------------------------------------------ serialising
    def to_dict(self, *, mask_secrets: bool = True) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if mask_secrets and f.metadata.get("secret") and v:
                v = "***"
            out[f.name] = v
        return out

    def to_json(self) -> str:
        """Every field, resolved (secrets included): what :meth:`from_json` reads back whole."""
        return json.dumps(self.to_dict(mask_secrets=False), indent=2, sort_keys=True, default=list) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes):
        """Settings written by :meth:`to_json`, taken as they are: no environment, no config file."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"resolved settings are not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("resolved settings must be a JSON object of field: value")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"resolved settings: unknown fields {unknown} (another embedkit version?)")
        return cls(**{k: cls._coerce(k, v) for k, v in data.items()})

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def parse_config(raw: bytes | str, origin: str) -> dict[str, Any]:
    """A config file's content: a flat YAML (or JSON) mapping of option: value."""
    import yaml

    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {origin} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {origin} must hold a mapping of option: value, got {type(data).__name__}"
        )
    return data


def load_config(path: str) -> dict[str, Any]:
    """A local config file (see :func:`parse_config`); doors that read ``s3://`` files read those
    through the storage layer and hand the mapping over."""
    try:
        with open(os.path.expanduser(path), "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return parse_config(raw, path)


@dataclass
class EngineSettings(Settings):
    """How the engine runs: which model, where, at which precision, in which batches."""

    model: str = setting(
        "default",
        "model: default, a local dir, a model.tar.gz, s3://...",
        env=("HF_MODEL_ID",),
        aliases=("model_directory", "model_dir"),
        short="-m",
    )
    device: str = setting("auto", "device: auto, cpu, cuda, cuda:N")
    precision: str = setting("fp32", "fp32 (exact), bf16, fp16 (GPU), int8 (CPU)")
    backend: str | None = setting(
        None,
        "auto (default: the ONNX graph for the batches where it measures faster), torch, onnx "
        "(every batch on ONNX Runtime), openvino (every batch on OpenVINO; the openvino extra)",
    )
    max_batch_tokens: int = setting(0, "padded tokens per batch; 0 = automatic from device memory")
    batch_size: int = setting(0, "cap on texts per batch; 0 = no cap (the token budget decides)")
    normalize: bool | None = setting(None, "L2-normalise vectors; unset = the model's own config")
    dimensions: int | None = setting(None, "Matryoshka: keep the first N components")
    truncate: bool = setting(True, "truncate inputs over the model's max length (else reject them)")
    pooling: str | None = setting(None, "override pooling: mean, cls, max, lasttoken, ...")
    prompt_name: str | None = setting(None, "prompt from the model's config to prepend to every text")
    cpu_fusion: bool = setting(True, "fused oneDNN kernels for linear layers on CPU (fp32/bf16)")
    unpad: bool = setting(True, "BERT-family models on CPU: dense layers on real tokens only, no padding")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_tokens < 0:
            raise ConfigError(f"max_batch_tokens must be >= 0 (0 = automatic), got {self.max_batch_tokens}")

    def engine_options(self) -> dict[str, Any]:
        """The :class:`~embedkit.Embedder` keyword arguments these settings describe."""
        return {
            "device": self.device,
            "precision": self.precision,
            "max_batch_tokens": self.max_batch_tokens or "auto",
            "max_batch_size": self.batch_size or None,
            "normalize": self.normalize,
            "dimensions": self.dimensions,
            "truncate": self.truncate,
            "prompt_name": self.prompt_name,
            "pooling": self.pooling,
            "backend": self.backend,
            "cpu_fusion": self.cpu_fusion,
            "unpad": self.unpad,
        }

"""Load a text embedding model from a local directory into plain PyTorch parts.

A sentence-transformers directory is read through its own ``modules.json`` (Transformer, Pooling,
Dense, Normalize); a plain Hugging Face directory gets CLS pooling for the BGE family and mean pooling
otherwise (override with ``pooling=``). The result is what the engine runs: tokenizer, transformer,
pooling mode, optional dense layers and the normalisation flag.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedkit.errors import ModelLoadError
from embedkit.models.pooling import POOLING_MODES, pooling_from_st_config

log = logging.getLogger(__name__)

_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": torch.nn.Identity,
    "torch.nn.modules.activation.Tanh": torch.nn.Tanh,
    "torch.nn.modules.activation.ReLU": torch.nn.ReLU,
    "torch.nn.modules.activation.GELU": torch.nn.GELU,
    "torch.nn.modules.activation.Sigmoid": torch.nn.Sigmoid,
}


@dataclass
class TextModel:
    """A loaded text embedding model, framework parts only (no batching, no I/O)."""

    path: Path
    tokenizer: Any
    transformer: torch.nn.Module
    pooling: str
    normalize: bool
    max_seq_length: int
    dense: list[torch.nn.Module] = field(default_factory=list)
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    model_type: str = ""
    name: str = ""
    # BGE-M3's extra heads over the token states, by output name ("sparse", "colbert"); see HEADS.
    heads: dict[str, torch.nn.Linear] = field(default_factory=dict)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this model gives: ``dense`` always, ``sparse``/``colbert`` with their head."""
        return ("dense", *(name for name in HEADS if name in self.heads))

    @property
    def dimension(self) -> int:
        for layer in reversed(self.dense):
            lin = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
            if isinstance(lin, torch.nn.Linear):
                return lin.out_features
        return int(self.transformer.config.hidden_size)

    @property
    def num_parameters(self) -> int:
        n = sum(p.numel() for p in self.transformer.parameters())
        return n + sum(p.numel() for layer in [*self.dense, *self.heads.values()] for p in layer.parameters())


def read_config_json(path: Path) -> dict:
    """A model folder's JSON config file as a dict (``{}`` when it is absent)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def _is_bge(path: Path, config: dict) -> bool:
    names = [path.name, str(config.get("_name_or_path", "")), str(config.get("name_or_path", ""))]
    return any("bge" in n.lower() for n in names)


def display_name(path: Path, config: dict) -> str:
    """The name a model is reported under: the default model's hub id, else its folder's name."""
    from embedkit.models.resolve import DEFAULT_MODEL_ID, default_model_path

    try:
        if path.resolve() == default_model_path().resolve():
            return DEFAULT_MODEL_ID
    except Exception:  # pragma: no cover - default package missing
        pass
    return path.name if path.name not in ("", "model") else str(config.get("_name_or_path") or path)


def _max_seq_length(tokenizer: Any, config: Any, declared: int | None) -> int:
    if declared:
        return int(declared)
    limits = []
    tml = getattr(tokenizer, "model_max_length", None)
    if tml and tml < 1_000_000:
        limits.append(int(tml))
    mpe = getattr(config, "max_position_embeddings", None)
    if mpe and mpe > 0:
        offset = 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(int(mpe) - offset)
    return min(limits) if limits else 512


def _load_dense(module_dir: Path) -> torch.nn.Module:
    cfg = read_config_json(module_dir / "config.json")
    linear = torch.nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
    state: dict[str, torch.Tensor]
    if (module_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(module_dir / "model.safetensors"))
    elif (module_dir / "pytorch_model.bin").is_file():
        state = torch.load(module_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelLoadError(f"Dense module {module_dir} has no model.safetensors or pytorch_model.bin")
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    act_name = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    act_cls = _ACTIVATIONS.get(act_name)
    if act_cls is None:
        raise ModelLoadError(f"Dense module {module_dir}: unsupported activation {act_name}")
    return torch.nn.Sequential(linear, act_cls())


# BGE-M3's heads, as FlagEmbedding saves them beside the model: the state dict of one linear layer
# each over the last hidden states (sparse: hidden -> 1 weight per token; ColBERT: hidden -> dim).
HEADS = {"sparse": "sparse_linear.pt", "colbert": "colbert_linear.pt"}


def _load_heads(folders: list[Path], hidden_size: int) -> dict[str, torch.nn.Linear]:
    """The :data:`HEADS` found in ``folders`` (the model's folder, then its transformer's)."""
    heads: dict[str, torch.nn.Linear] = {}
    for name, filename in HEADS.items():
        found = next((d / filename for d in folders if (d / filename).is_file()), None)
        if found is None:
            continue
        try:
            state = torch.load(found, map_location="cpu", weights_only=True)
            out_features, in_features = state["weight"].shape
            head = torch.nn.Linear(in_features, out_features, bias="bias" in state)
            head.load_state_dict(state)
        except Exception as exc:
            raise ModelLoadError(
                f"{found}: not the state dict of one linear layer ({type(exc).__name__}: {exc}); "
                f"remove the file or replace it with the model's own {filename}"
            ) from exc
        if in_features != hidden_size:
            raise ModelLoadError(
                f"{found}: the head takes {in_features} features but the model's hidden size is "
                f"{hidden_size}; the file belongs to another model"
            )
        heads[name] = head.eval()
    return heads


def quiet_transformers() -> None:
    """Silence transformers' warnings and progress bars (loading and saving models)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - best effort
        pass


def load_text_model(path: Path, *, pooling: str | None = None, normalize: bool | None = None) -> TextModel:
    """Load the model in ``path`` (already resolved to a local directory) on the CPU in float32."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    modules = read_config_json(path / "modules.json") if (path / "modules.json").is_file() else None
    transformer_dir = path
    pool_mode = None
    use_normalize = False
    dense: list[torch.nn.Module] = []
    declared_len = None
    do_lower = False
    if modules is not None:
        for mod in sorted(modules, key=lambda m: m.get("idx", 0)):
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
            mod_dir = path / mod.get("path", "")
            if kind == "Transformer":
                transformer_dir = mod_dir
                st_cfg = read_config_json(mod_dir / "sentence_bert_config.json")
                declared_len = st_cfg.get("max_seq_length")
                do_lower = bool(st_cfg.get("do_lower_case", False))
            elif kind == "Pooling":
                pool_cfg = read_config_json(mod_dir / "config.json")
                pool_mode = pooling_from_st_config(pool_cfg)
                if pool_cfg.get("include_prompt") is False:
                    raise ModelLoadError(
                        f"{path}: Pooling with include_prompt=false is not supported by embedkit yet"
                    )
            elif kind == "Dense":
                dense.append(_load_dense(mod_dir))
            elif kind == "Normalize":
                use_normalize = True
            else:
                raise ModelLoadError(
                    f"{path}/modules.json: module type {mod.get('type')!r} is not supported "
                    f"(embedkit runs Transformer, Pooling, Dense and Normalize modules)"
                )
    try:
        hf_config = AutoConfig.from_pretrained(str(transformer_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformer = AutoModel.from_pretrained(
                str(transformer_dir), config=hf_config, local_files_only=True, torch_dtype=torch.float32
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load the transformer in {transformer_dir}: {exc}") from exc
    transformer.eval()
    raw_cfg = read_config_json(transformer_dir / "config.json")
    if modules is None:
        pool_mode = "cls" if _is_bge(path, raw_cfg) else "mean"
        use_normalize = _is_bge(path, raw_cfg)
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise ModelLoadError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        pool_mode = pooling
    if normalize is not None:
        use_normalize = bool(normalize)
    st_model_cfg = read_config_json(path / "config_sentence_transformers.json")
    return TextModel(
        path=path,
        tokenizer=tokenizer,
        transformer=transformer,
        pooling=pool_mode or "mean",
        normalize=use_normalize,
        max_seq_length=_max_seq_length(tokenizer, hf_config, declared_len),
        dense=dense,
        do_lower_case=do_lower,
        prompts=dict(st_model_cfg.get("prompts") or {}),
        default_prompt_name=st_model_cfg.get("default_prompt_name"),
        model_type=str(getattr(hf_config, "model_type", "")),
        name=display_name(path, raw_cfg),
        heads=_load_heads([path, transformer_dir], int(getattr(hf_config, "hidden_size", 0))),
    )

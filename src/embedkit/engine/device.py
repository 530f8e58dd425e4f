"""Device and precision: pick them, check the machine can do them, and size the automatic budget."""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator

import torch

from embedkit.engine.cpu_fusion import fuse_for_cpu
from embedkit.engine.int8 import INT8_CPU_BATCH_TOKENS, quantize_int8
from embedkit.engine.unpad import unpad_encoder
from embedkit.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# Spellings of each precision, lower case.
PRECISION_ALIASES = {
    "float32": "fp32",
    "fp32": "fp32",
    "exact": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp16": "fp16",
    "int8": "int8",
    "qint8": "int8",
}
# Padded tokens per batch on CPU (measured with `make bench`): matmuls near peak, activations in cache.
CPU_DEFAULT_BATCH_TOKENS = 4096
CPU_BF16_BATCH_TOKENS = 8192


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, then Apple MPS, else CPU; explicit devices are checked."""
    spec = (device or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {device!r} is not a valid torch device (try auto, cpu, cuda, cuda:1)"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def resolve_devices(device: str | None = "auto") -> list[torch.device]:
    """One or more devices: ``cuda:0,cuda:1`` (a model replica on each, batches spread over them),
    ``cuda:all`` (every visible GPU), or a single device as :func:`resolve_device` takes."""
    spec = (device or "auto").strip().lower()
    if spec == "cuda:all":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda:all' asked for, but CUDA is not available on this machine")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) > 1:
        devices = [resolve_device(p) for p in parts]
        if len({d.type for d in devices}) > 1:
            raise ConfigError(f"device list {device!r} mixes device types; use one type (cuda:0,cuda:1)")
        return devices
    return [resolve_device(spec)]


def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and feature flags, from one read of ``/proc/cpuinfo`` (the name falls
    back to :func:`platform.processor`, the flags to none, off Linux)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not name and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:  # pragma: no cover - non-Linux
        pass
    return name or platform.processor() or platform.machine(), flags


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 (AVX512-BF16 or AMX), where bf16 is a speed-up."""
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def cpu_supports_int8() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8);
    without them torch's int8 matmul runs a slow reference loop."""
    return bool(cpu_info()[1] & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """Normalise a precision name and check ``device`` can run it."""
    name = PRECISION_ALIASES.get((precision or "fp32").strip().lower())
    if name is None:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type == "cpu":
        raise DeviceError(
            "precision fp16 needs a GPU; on CPU use bf16 (fast where the CPU supports it) or fp32"
        )
    if name == "int8" and device.type != "cpu":
        raise DeviceError("precision int8 runs on CPU only; on GPU use fp16 or bf16")
    if name == "int8" and not cpu_supports_int8():
        log.warning(
            "this CPU has no int8 dot-product instructions (VNNI/AMX): int8 will run far slower than fp32"
        )
    if name == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        log.warning("this CPU has no native bf16 (avx512_bf16/amx): bf16 will be emulated and may be slow")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU does not support bf16; use fp16")
    return name


def torch_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the transformer's weights are kept in for ``precision``."""
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.float32


def prepare_module(
    module: torch.nn.Module,
    device: torch.device,
    precision: str,
    *,
    cpu_fusion: bool = True,
    unpad: bool = False,
) -> tuple[torch.nn.Module, int]:
    """``module`` on ``device`` in ``precision``, ready for inference: cast (fp32/bf16/fp16) or
    quantised (int8, from fp32), and on CPU with its linear layers fused (fp32/bf16) unless
    ``cpu_fusion`` is False; with ``unpad`` on CPU, a BERT-family text encoder runs its dense layers on
    real tokens only (:mod:`embedkit.engine.unpad`; other modules are returned as they are).

    Returns the module (in eval mode) and the number of modules :func:`fuse_for_cpu` replaced."""
    if precision == "int8":
        module = module.to(device=device, dtype=torch.float32)
        quantize_int8(module)
        fused = 0
    else:
        module = module.to(device=device, dtype=torch_dtype(precision, device))
        fused = fuse_for_cpu(module) if device.type == "cpu" and cpu_fusion else 0
    if unpad and device.type == "cpu":  # measured on CPUs only (no GPU measurement yet)
        module = unpad_encoder(module)
    return module.eval(), fused


@contextlib.contextmanager
def inference_context(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast where the weights stay in a wider type."""
    with torch.inference_mode():
        if precision in ("bf16", "fp16") and device.type in ("cuda", "cpu"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dtype):
                yield
        else:
            yield


def auto_batch_tokens(
    device: torch.device, hidden_size: int, num_layers: int, num_heads: int, precision: str = "fp32"
) -> int:
    """Budget of padded tokens per batch: on GPU a quarter of free memory over the activation bytes
    one token needs in the worst layer; on CPU the measured sweet spot."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        bytes_per_token = 4 * (hidden_size * 8 + num_heads * 512)
        budget = int(free * 0.25 / max(bytes_per_token, 1))
        return max(1024, min(budget, 1 << 20))
    if precision == "int8":
        return INT8_CPU_BATCH_TOKENS
    return CPU_BF16_BATCH_TOKENS if precision == "bf16" else CPU_DEFAULT_BATCH_TOKENS


def attention_cells_budget(device: torch.device, num_heads: int, free_host_bytes: int | None) -> int:
    """Query-key cells (rows x length x length) one batch may hold: a quarter of the free memory
    (the GPU's, else the host's ``free_host_bytes``, 8 GiB when unknown) over the bytes each cell
    takes in the worst layer (fp32 scores and their softmax, for every head). With 22 GiB free a 12-head
    model gets ~60M cells (200 texts of 512 tokens could run together); a 16-head one runs
    8192-token inputs one at a time."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        free = free_host_bytes or (8 << 30)
    return max(1, int(free * 0.25 / (8 * max(num_heads, 1))))


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate memory")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory, host MemoryError and allocator failures (torch's and ONNX Runtime's)."""
    if isinstance(exc, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)

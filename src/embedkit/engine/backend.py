"""Which runtime runs which batch: torch, ONNX Runtime, OpenVINO, or ``auto`` (split by a measurement).

``auto`` times the runtimes on this machine and sends a batch to the graph runtime while its padded
tokens are at most the largest probed shape where the graph was faster (docs/backends.md). In fp32
with OpenVINO installed the graph has two runtimes: ONNX Runtime for the smallest batches and
OpenVINO from the first probed shape where it beat ONNX Runtime. ``onnx`` and ``openvino`` run every
batch on the graph: ``onnx`` on ONNX Runtime in fp32 (OpenVINO in bf16), ``openvino`` on OpenVINO in
the engine's precision.

>>> resolve_backend("ONNXRuntime")
'onnx'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embedkit.engine.device import cpu_info
from embedkit.errors import ConfigError
from embedkit.io.fs import replace_text

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino")
# Shapes (texts, tokens each) timed by ``auto``, smallest first, up to a bulk batch of short texts
# at the default token budget (4096 tokens: where fused torch won by 10-15% on the AMX Xeon while
# 32 x 64 was a tie, so a ladder that stopped there handed bulk jobs the slower runtime).
PROBE_SHAPES = ((1, 16), (2, 32), (8, 32), (8, 64), (32, 64), (128, 32))
PROBE_BUDGET_S = 5.0  # a shape is probed only while its predicted cost fits in this budget
# A runtime's timed passes on one shape last at least this long (up to MAX_PROBE_REPS passes): the
# best of two passes of a few milliseconds still carried start-up noise (on the AVX2 EPYC, two
# passes of one 16-token text put OpenVINO ahead of ONNX Runtime, 4.4 against 5.3 ms, where 30
# alternating passes gave ONNX Runtime 4.0 against 4.7 ms).
PROBE_SHAPE_S = 0.03
MAX_PROBE_REPS = 8
# A runtime wins a shape by this factor; ties (noise on shared machines) go to ONNX Runtime.
PROBE_MARGIN = 1.05
# A measurement taken while other processes used more than this share of the CPUs is used for this
# process only, not kept: a busy start must not decide every later start's routing.
KEEP_MAX_OTHERS_SHARE = 0.25
# What ``Embedder(backend=None)`` runs (the engine reads no environment); a test suite may pin this.
DEFAULT_BACKEND = "auto"


def resolve_backend(name: str | None) -> str:
    """Normalise a backend name (``auto``, ``torch``, ``onnx``/``onnxruntime``/``ort``,
    ``openvino``/``ov``); ``None`` is :data:`DEFAULT_BACKEND` (``auto``)."""
    if name is None:
        name = DEFAULT_BACKEND
    value = name.strip().lower()
    value = {"onnxruntime": "onnx", "ort": "onnx", "pytorch": "torch", "ov": "openvino"}.get(value, value)
    if value not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return value


def available_memory_bytes() -> int | None:
    """Memory this process may still take: the smaller of the machine's available memory and the
    cgroup's remaining limit (a container's). ``None`` when neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as fh:
                raw = fh.read().strip()
            with open(usage_file, encoding="ascii") as fh:
                used = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            found.append(max(0, int(raw) - used))
        break
    return min(found) if found else None


def second_copy_fits(weight_bytes: int, available: int | None = None) -> bool:
    """Whether one more copy of the weights (ONNX Runtime's; then OpenVINO's, checked once ONNX
    Runtime's is loaded) fits beside those already loaded: it must leave at least the weights' size
    again, and 512 MiB, free for activations and everything else."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return True
    return available >= 2 * weight_bytes + (512 << 20)


# Upper bound of a measured forward cost: replaying the server's bf16 batches on the AMX Xeon, a
# price of 1000 padded tokens per pass still paid (a fixed 256 cut bf16's measured cost short).
MAX_FORWARD_COST_TOKENS = 1024.0
# A probe's graph runtimes' timings.
GRAPH_MS = ("onnx_ms", "openvino_ms")
# ``max_onnx_tokens`` when ONNX Runtime won up to the largest (bulk) probe shape.
EVERY_BATCH = 1 << 62


@dataclass
class Crossover:
    """What ``auto`` measured: per probed shape, milliseconds on torch, on ONNX Runtime and (fp32
    with OpenVINO) on OpenVINO. The graph takes batches of at most ``max_onnx_tokens`` padded
    tokens; with ``max_ort_tokens`` set, ONNX Runtime takes those up to it and OpenVINO the rest."""

    max_onnx_tokens: int
    probes: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # share of the CPUs other processes used while it measured (None where it cannot be read)
    others_cpu_share: float | None = None
    # Where OpenVINO took part: the largest graph batch ONNX Runtime keeps; None: OpenVINO never
    # won a graph shape (or did not take part), so ONNX Runtime takes every graph batch.
    max_ort_tokens: int | None = None
    # From measure_forward_cost with one_thread: torch runs batches of at most this many padded
    # tokens on one thread, where that was faster than all of them (0: none).
    one_thread_tokens: int = 0

    @property
    def keep(self) -> bool:
        """Whether the machine was quiet enough for this measurement to decide later starts too."""
        return self.others_cpu_share is None or self.others_cpu_share <= KEEP_MAX_OTHERS_SHARE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Crossover:
        return cls(
            max_onnx_tokens=int(data["max_onnx_tokens"]),
            probes=list(data.get("probes", [])),
            seconds=float(data.get("seconds", 0.0)),
            others_cpu_share=data.get("others_cpu_share"),
            max_ort_tokens=None if data.get("max_ort_tokens") is None else int(data["max_ort_tokens"]),
            one_thread_tokens=int(data.get("one_thread_tokens", 0)),
        )

    def forward_cost_tokens(self, runtime: str) -> float | None:
        """One more forward pass on ``runtime`` ("torch", "onnx", "openvino", or "graph": per probe,
        the graph runtime the plan gives that size) in padded tokens' worth of compute: intercept
        over slope of a line through the probes of at most 512 tokens (larger ones' noise would
        swamp the intercept); ``None`` with fewer than two or a flat line."""
        points = []
        for p in self.probes:
            tokens = p["rows"] * p["tokens"]
            name = runtime
            if runtime == "graph":
                split = self.max_ort_tokens
                name = "onnx" if split is None or tokens <= split else "openvino"
            if f"{name}_ms" in p and tokens <= 512:
                points.append((tokens, p[f"{name}_ms"]))
        if len(points) < 2:
            return None
        x = np.array([t for t, _ in points], dtype=np.float64)
        y = np.array([ms for _, ms in points], dtype=np.float64)
        slope, intercept = np.polyfit(x, y, 1)
        if slope <= 0:
            return None
        return float(min(MAX_FORWARD_COST_TOKENS, max(4.0, intercept / slope)))

    def describe(self) -> str:
        if self.max_onnx_tokens <= 0:
            return "torch for every batch (the graph runtime was not faster at any probed shape)"
        every = self.max_onnx_tokens >= EVERY_BATCH
        if every:
            largest = max(self.probes, key=lambda p: p["rows"] * p["tokens"]) if self.probes else None
            upto = f", up to {largest['rows']}x{largest['tokens']} tokens" if largest else ""
            if largest and (largest["rows"], largest["tokens"]) != PROBE_SHAPES[-1]:
                upto += "; larger ones did not fit the probe budget"
            why = f"faster at the largest probed shape{upto}"
            if all(p["torch_ms"] > min(v for k, v in p.items() if k in GRAPH_MS) for p in self.probes):
                why = f"faster at every probed shape{upto}"
        split = self.max_ort_tokens
        if split is None:
            if every:
                return f"onnx for every batch ({why})"
            return f"onnx for batches up to {self.max_onnx_tokens} padded tokens, torch above"
        if split <= 0:
            if every:
                return f"onnx for every batch, on OpenVINO (fp32) ({why})"
            return f"onnx for batches up to {self.max_onnx_tokens} padded tokens, on OpenVINO (fp32), torch above"
        if every:
            return f"onnx for every batch: ONNX Runtime up to {split} padded tokens, OpenVINO (fp32) above ({why})"
        return (
            f"onnx for batches up to {self.max_onnx_tokens} padded tokens: ONNX Runtime up to {split}, "
            "OpenVINO (fp32) above; torch above that"
        )


def _best_of(fn: Callable[[], object], reps: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def _warm_then_best(fn: Callable[[], object], reps: int, clock: Callable[[], float]) -> float:
    """One warm-up pass (timed only to size the rest), then the best of at least ``reps`` passes: more
    (up to :data:`MAX_PROBE_REPS`) while they would last under :data:`PROBE_SHAPE_S` together."""
    t0 = clock()
    fn()
    warm = clock() - t0
    more = int(PROBE_SHAPE_S / warm) if warm > 0 else MAX_PROBE_REPS
    return _best_of(fn, max(reps, min(MAX_PROBE_REPS, more)), clock)


def measure_crossover(
    run_torch: Callable[[int, int], object],
    run_onnx: Callable[[int, int], object],
    *,
    run_openvino: Callable[[int, int], object] | None = None,
    shapes: tuple[tuple[int, int], ...] = PROBE_SHAPES,
    budget_s: float | None = None,
    margin: float = PROBE_MARGIN,
    reps: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> Crossover:
    """Time ``run_torch(rows, tokens)`` against ``run_onnx(rows, tokens)`` on ``shapes`` (warm-up,
    then the best of ``reps`` or more: :func:`_warm_then_best`) until torch wins twice in a row or
    ``budget_s`` (default :data:`PROBE_BUDGET_S`, half as much again with OpenVINO) would overrun.
    A runtime wins a shape when it is faster by ``margin``; the graph keeps the shapes it won
    and the ties. ``max_onnx_tokens`` is the largest shape it kept; :data:`EVERY_BATCH` when it
    kept the last (bulk) shape, or when the budget ended the ladder on a shape the graph won
    outright (by ``margin``, not a tie): on a slow CPU the larger shapes do not fit the budget,
    and the last measured verdict is the best guide to them (on the AVX2 EPYC OpenVINO beat torch
    by 1.37x at 32 x 64 and 1.26x at the unprobed 128 x 32; routing the larger batches to torch
    made a mixed corpus 1.2x slower than the graph alone).

    With ``run_openvino`` (fp32 OpenVINO on the same graph) the graph has two runtimes, split at
    one size so that each batch size has one route: OpenVINO takes the graph's shapes from the
    first one where it beat ONNX Runtime by ``margin`` (ONNX Runtime keeps those before it,
    ``max_ort_tokens``), and torch is weighed against the runtime that would run the shape. On
    the AMX Xeon ONNX Runtime was faster on one or two texts of ~16 tokens (1.8 against 2.1 ms
    back to back) and OpenVINO on batches of 8 texts and more (6-21% less time).

    Ties go to ONNX Runtime because the probes time each runtime alone: in a server, torch's eager
    passes also pay for waking OpenMP threads between ~40 small kernels while the event loop
    shares the cores, and ONNX Runtime's pass does not (on the AMX Xeon at concurrency 32, routing
    from 256 padded tokens to torch on a tie gave 205 requests/s, from 512 tokens 245-250)."""
    if budget_s is None:
        budget_s = PROBE_BUDGET_S * (1.5 if run_openvino is not None else 1.0)
    t_start = clock()
    sample = cpu_sample()
    result = Crossover(max_onnx_tokens=0)
    torch_wins = 0
    openvino_from: int | None = None  # the first shape (padded tokens) OpenVINO won
    ort_kept = 0  # the largest graph shape ONNX Runtime kept before that
    costs: list[tuple[float, float]] = []  # (padded tokens, seconds spent on the shape)
    cut_short = False  # the budget ended the ladder
    graph_won_last = False  # the graph beat torch by the margin at the last probed shape
    for rows, tokens in shapes:
        if clock() - t_start + _predict(costs, rows * tokens) > budget_s:
            cut_short = True
            break
        t_shape = clock()
        t_torch = _warm_then_best(lambda r=rows, t=tokens: run_torch(r, t), reps, clock)
        t_onnx = _warm_then_best(lambda r=rows, t=tokens: run_onnx(r, t), reps, clock)
        probe = {"rows": rows, "tokens": tokens, "torch_ms": t_torch * 1e3, "onnx_ms": t_onnx * 1e3}
        t_graph = t_onnx
        if run_openvino is not None:
            t_openvino = _warm_then_best(lambda r=rows, t=tokens: run_openvino(r, t), reps, clock)
            probe["openvino_ms"] = t_openvino * 1e3
            if openvino_from is None and t_openvino * margin < t_onnx:
                openvino_from = rows * tokens
            if openvino_from is not None:
                t_graph = t_openvino
        costs.append((float(rows * tokens), clock() - t_shape))
        result.probes.append(probe)
        graph_won_last = t_graph * margin < t_torch
        if not t_torch * margin < t_graph:  # the graph won, or a tie
            result.max_onnx_tokens = max(result.max_onnx_tokens, rows * tokens)
            if openvino_from is None:
                ort_kept = result.max_onnx_tokens
            torch_wins = 0
        else:
            torch_wins += 1
            if torch_wins >= 2:
                break
    last = shapes[-1] if shapes else None
    won_bulk = result.probes and last is not None and result.max_onnx_tokens == last[0] * last[1]
    if won_bulk or (cut_short and graph_won_last):
        result.max_onnx_tokens = EVERY_BATCH
    if openvino_from is not None and openvino_from <= result.max_onnx_tokens:
        result.max_ort_tokens = ort_kept  # 0: OpenVINO takes every graph batch
    result.seconds = clock() - t_start
    result.others_cpu_share = others_cpu_share(sample, cpu_sample())
    return result


# Shapes timed by :func:`measure_forward_cost` (texts, tokens each): a line through them gives one
# more forward pass's cost in padded tokens.
COST_SHAPES = ((1, 16), (4, 32), (8, 64))


def measure_forward_cost(
    run: Callable[[int, int], object],
    *,
    runtime: str = "torch",
    shapes: tuple[tuple[int, int], ...] = COST_SHAPES,
    reps: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    one_thread: Callable[[], AbstractContextManager] | None = None,
) -> Crossover:
    """Time ``run(rows, tokens)``, the one runtime ("torch" or "onnx") an engine runs every batch
    on, alone on ``shapes`` (warm-up, then the best of ``reps``): a :class:`Crossover` with that
    runtime's probes only (``forward_cost_tokens(runtime)`` reads the cost).

    With ``one_thread`` (a context in which torch runs on one thread), each shape, smallest first,
    is timed inside it too while one thread keeps winning by :data:`PROBE_MARGIN`:
    ``one_thread_tokens`` is the largest such shape's padded tokens, and a shape one thread won
    records that time as the runtime's (what a pass of its size then costs) beside
    ``all_threads_ms``. Under ``OMP_WAIT_POLICY=PASSIVE`` every parallel region of an eager pass
    wakes the sleeping OpenMP threads, and for a small batch those wake-ups can cost more than the
    second thread saves (docs/backends.md)."""
    t_start = clock()
    result = Crossover(max_onnx_tokens=EVERY_BATCH if runtime == "onnx" else 0)
    alone_wins = one_thread is not None
    for rows, tokens in shapes:
        run(rows, tokens)
        seconds = _best_of(lambda r=rows, t=tokens: run(r, t), reps, clock)
        probe = {"rows": rows, "tokens": tokens, f"{runtime}_ms": seconds * 1e3}
        if alone_wins:
            assert one_thread is not None
            with one_thread():
                run(rows, tokens)
                alone = _best_of(lambda r=rows, t=tokens: run(r, t), reps, clock)
            probe["one_thread_ms"] = alone * 1e3
            alone_wins = alone * PROBE_MARGIN <= seconds
            if alone_wins:
                result.one_thread_tokens = rows * tokens
                probe["all_threads_ms"], probe[f"{runtime}_ms"] = seconds * 1e3, alone * 1e3
        result.probes.append(probe)
    result.seconds = clock() - t_start
    return result


def cpu_sample() -> tuple[float, float, float] | None:
    """``(monotonic seconds, busy seconds of all the machine's CPUs, this process's CPU seconds)``
    from ``/proc/stat`` (busy: user, nice, system, irq, softirq and steal); ``None`` off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return time.monotonic(), busy, own.user + own.system


def others_cpu_share(
    start: tuple[float, float, float] | None, end: tuple[float, float, float] | None
) -> float | None:
    """The share (0-1) of the machine's CPUs that other processes (or the hypervisor) used between
    two :func:`cpu_sample` readings; ``None`` when either is missing or no time passed."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return min(1.0, max(0.0, others / ((end[0] - start[0]) * (os.cpu_count() or 1))))


def _predict(costs: list[tuple[float, float]], tokens: float) -> float:
    """Seconds a shape of ``tokens`` padded tokens should take to probe: on the line through the
    last two measured shapes (proportional to the only one at first)."""
    if not costs:
        return 0.0
    if len(costs) == 1:
        t0, c0 = costs[0]
        return c0 * tokens / t0
    (t1, c1), (t2, c2) = costs[-2], costs[-1]
    slope = max(0.0, (c2 - c1) / (t2 - t1)) if t2 != t1 else 0.0
    return max(c2, c2 + slope * (tokens - t2))


def crossover_path(root: Path, graph_digest: str, threads: int, versions: str) -> Path:
    """Where ``auto``'s measurement is kept, keyed by the graph, the CPU's name and flags, the thread
    count and both runtimes' versions."""
    name, flags = cpu_info()
    rule = [
        PROBE_SHAPES,
        PROBE_MARGIN,
        "ties to onnx",
        "openvino-f32 from its first win",
        "a budget cut extends an outright graph win",
        (PROBE_SHAPE_S, MAX_PROBE_REPS),
    ]  # a new rule measures afresh
    blob = json.dumps([graph_digest, name, sorted(flags), int(threads), versions, rule]).encode()
    return Path(root) / f"{graph_digest}-{hashlib.sha256(blob).hexdigest()[:16]}.json"


def load_crossover(path: Path) -> Crossover | None:
    """A kept measurement, or ``None`` when there is none (or it cannot be read)."""
    try:
        return Crossover.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_crossover(path: Path, crossover: Crossover) -> None:
    """Keep a measurement (atomically; best effort: a read-only cache only costs a new measurement)."""
    try:
        replace_text(path, json.dumps(crossover.to_dict(), indent=2))
    except OSError as exc:
        log.debug("could not keep the backend measurement at %s: %s", path, exc)

"""The CUDA paths, run where a GPU is: placement, fp32/fp16/bf16 against the CPU, the out-of-memory
split on a real CUDA out-of-memory error, BGE-M3's heads, CLIP, the batch job and the server.

Skipped (with the reason) on machines without CUDA, which is where CI runs; docs/architecture.md says
how these were last run on a GPU. Texts are short and models tiny, so the whole module takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

TEXTS = [
    "the cat sat on the mat",
    "a",
    "python reads data from a file and writes it to the cloud " * 3,
    "water fire sun moon star",
    "the server sends the job to the client",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def cpu_fp32(tiny_model):
    from embedkit import Embedder

    return Embedder(str(tiny_model), device="cpu", backend="torch").encode(TEXTS)


def test_auto_device_is_cuda_and_fp32_matches_the_cpu_within_1e_5(tiny_model, cpu_fp32):
    from embedkit import Embedder

    emb = Embedder(str(tiny_model), device="auto")
    assert emb.device.type == "cuda"
    got = emb.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == cpu_fp32.shape
    assert np.abs(got - cpu_fp32).max() <= 1e-5
    # the ONNX graph runs on CPU only: on a GPU every batch runs torch, and the engine says why
    assert "runs torch" in emb.backend_note or emb.backend == "torch"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_run_on_cuda_close_to_fp32(tiny_model, cpu_fp32, precision):
    from embedkit import Embedder

    emb = Embedder(str(tiny_model), device="cuda", precision=precision)
    got = emb.encode(TEXTS)
    assert got.dtype == np.float32  # vectors come back in float32 whatever ran
    assert cosines(got, cpu_fp32).min() >= 0.999
    again = emb.encode(list(reversed(TEXTS)))[::-1]
    assert np.array_equal(got, again)  # same batch, other order: the same vectors


def test_a_text_gets_the_same_vector_alone_and_padded_in_a_batch(tiny_model):
    from embedkit import Embedder

    emb = Embedder(str(tiny_model), device="cuda")
    batch = emb.encode(TEXTS)
    alone = np.stack([emb.encode([t])[0] for t in TEXTS])
    assert np.abs(batch - alone).max() <= 1e-5


def test_int8_is_refused_on_cuda_and_fp16_on_cpu(tiny_model):
    from embedkit import Embedder
    from embedkit.errors import DeviceError

    with pytest.raises(DeviceError, match="int8 runs on CPU only"):
        Embedder(str(tiny_model), device="cuda", precision="int8")
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        Embedder(str(tiny_model), device="cpu", precision="fp16")


def test_cuda_all_places_one_replica_per_gpu(tiny_model, cpu_fp32):
    from embedkit import Embedder

    emb = Embedder(str(tiny_model), device="cuda:all")
    assert len(emb.runner.replicas) == torch.cuda.device_count()
    assert np.abs(emb.encode(TEXTS * 20)[: len(TEXTS)] - cpu_fp32).max() <= 1e-5


def test_the_automatic_budget_comes_from_free_gpu_memory(tiny_model):
    from embedkit.engine.device import auto_batch_tokens

    budget = auto_batch_tokens(torch.device("cuda"), hidden_size=1024, num_layers=24, num_heads=16)
    free, _ = torch.cuda.mem_get_info()
    assert 1024 <= budget <= 1 << 20
    assert budget * 4 * (1024 * 8 + 16 * 512) <= free * 0.25 + 1


def test_a_real_cuda_out_of_memory_splits_the_batch_and_loses_nothing(tmp_path_factory):
    """Cap this process's share of the GPU so the one big batch cannot fit; the runner catches
    torch's OutOfMemoryError, halves the batch until it fits, and the vectors match small batches."""
    from embedkit import Embedder
    from embedkit.testing import build_tiny_bert

    model = build_tiny_bert(tmp_path_factory.mktemp("oom-bert"), hidden_size=256, max_seq_length=512)
    texts = [
        ("python data file job server client cloud " * 400)[: 3200 + i] for i in range(64)
    ]  # cut at 512 tokens
    small = Embedder(str(model), device="cuda", max_batch_size=4).encode(texts)
    emb = Embedder(str(model), device="cuda", max_batch_tokens=1 << 20, max_batch_size=64)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # room for the weights and a few rows' activations (~300 MB for 64 rows of 512 tokens)
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (128 << 20)) / total)
    try:
        got = emb.encode(texts)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert emb.stats.oom_splits >= 1 and emb.stats.padded_tokens >= 64 * 500
    assert np.abs(got - small).max() <= 1e-5


def test_bge_m3_heads_on_cuda_match_the_cpu(small_m3):
    from embedkit import Embedder

    cpu = Embedder(str(small_m3), device="cpu", backend="torch").embed_multi(TEXTS)
    for precision, tol in (("fp32", 1e-5), ("fp16", 5e-3)):
        gpu = Embedder(str(small_m3), device="cuda", precision=precision).embed_multi(TEXTS)
        assert np.abs(gpu.dense - cpu.dense).max() <= tol
        for got, want in zip(gpu.lexical_weights(), cpu.lexical_weights(), strict=True):
            # fp16 may push a weight that is ~0 on one side of the ReLU: compare the shared tokens
            shared = set(got) & set(want)
            assert len(shared) >= 0.9 * max(len(got), len(want))
            assert max(abs(got[k] - want[k]) for k in shared) <= 10 * tol
        for got, want in zip(gpu.colbert, cpu.colbert, strict=True):
            assert got.shape == want.shape and np.abs(got - want).max() <= 10 * tol


def test_clip_images_and_texts_on_cuda_match_the_cpu(tiny_clip):
    from embedkit.engine.image import ImageEmbedder
    from tests.integration.image_data import jpeg

    images = [jpeg(seed) for seed in range(6)]
    cpu = ImageEmbedder(str(tiny_clip), device="cpu")
    gpu = ImageEmbedder(str(tiny_clip), device="cuda")
    assert np.abs(gpu.encode_images(images) - cpu.encode_images(images)).max() <= 1e-5
    assert np.abs(gpu.encode(["a photo of a cat"]) - cpu.encode(["a photo of a cat"])).max() <= 1e-5
    half = ImageEmbedder(str(tiny_clip), device="cuda", precision="fp16").encode_images(images)
    assert cosines(half, cpu.encode_images(images)).min() >= 0.999


def test_the_batch_job_on_cuda_writes_the_cpu_vectors(tmp_path, tiny_model):
    from embedkit.cli import main as cli
    from tests.integration.batch_data import read_parts, read_rejects, write_parquet_dataset

    texts = write_parquet_dataset(str(tmp_path / "in"), files=2, rows=150)
    for device in ("cpu", "cuda"):
        args = ["embed", str(tmp_path / "in"), str(tmp_path / device), "--model", str(tiny_model)]
        assert cli([*args, "--device", device, "--backend", "torch", "--progress", "none"]) == 0
    cpu_ids, cpu_vecs, _ = read_parts(str(tmp_path / "cpu"))
    ids, vecs, _ = read_parts(str(tmp_path / "cuda"))
    assert ids == cpu_ids and len(ids) == len(texts) and not read_rejects(str(tmp_path / "cuda"))
    assert np.abs(vecs - cpu_vecs).max() <= 1e-5


def test_the_server_on_cuda_answers_with_the_engine_vectors(tiny_model, tmp_path):
    import httpx

    from embedkit import Embedder
    from tests.contract.serving import ServerProcess

    expected = Embedder(str(tiny_model), device="cuda", precision="fp16").encode(TEXTS)
    args = ["--model", str(tiny_model), "--device", "cuda", "--precision", "fp16"]
    with ServerProcess(args, log_dir=tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/ping").status_code == 200
        info = http.get("/info").json()
        assert info["ready"] is True
        got = np.asarray(http.post("/invocations", json={"inputs": TEXTS}).json()["embeddings"], np.float32)
        one = np.asarray(
            http.post("/invocations", json={"search_term": TEXTS[0]}).json()["embedding"], np.float32
        )
    assert np.abs(got - expected).max() <= 1e-6
    assert cosines(one.reshape(1, -1), expected[:1]).min() >= 0.9999

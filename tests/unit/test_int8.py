"""int8 W8A8 (per-token activations, per-channel weights): arithmetic, sharing, and the engines."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from embedkit import Embedder
from embedkit.engine.int8 import Int8Linear, int8_supported, quantize_int8, quantize_rows

pytestmark = pytest.mark.skipif(not int8_supported(), reason="this torch build has no CPU int8 matmul")


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias).eval()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_quantize_rows_stays_in_int8_and_reconstructs_each_row():
    torch.manual_seed(1)
    x = torch.randn(64, 96) * torch.logspace(-3, 3, 64)[:, None]  # rows six decades apart
    x[3] = 0.0  # an all-zero row
    x[5] = x[5].abs()  # an all-positive row
    q, s, u = quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (64, 1) and u.shape == (64, 2)
    zc = -u[:, :1] / s
    back = s * (q.float() - zc)
    # Every row is reconstructed to half a step of its own range, whatever its magnitude.
    step = s.squeeze(1)
    assert bool(((back - x).abs().amax(1) <= 0.5 * step + 1e-6 * x.abs().amax(1)).all())
    assert float(back[3].abs().max()) <= 1e-12


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_float_linear(bias):
    lin = _linear(96, 48, bias=bias)
    q = Int8Linear(lin)
    torch.manual_seed(2)
    x = torch.randn(3, 7, 96)
    with torch.inference_mode():
        want, got = lin(x), q(x)
    assert got.shape == want.shape == (3, 7, 48) and got.dtype == torch.float32
    assert _rel_err(got, want) < 0.02


def test_per_token_ranges_survive_an_outlier_token():
    # One token 1000x larger than the rest: a per-tensor scale would zero the others; per-token does not.
    lin = _linear(64, 32)
    torch.manual_seed(3)
    x = torch.randn(10, 64)
    x[0] *= 1000.0
    with torch.inference_mode():
        want, got = lin(x), Int8Linear(lin)(x)
    for row in range(1, 10):
        assert _rel_err(got[row], want[row]) < 0.03, row


def test_single_row_input():
    lin = _linear(32, 16)
    with torch.inference_mode():
        x = torch.randn(1, 32)
        assert _rel_err(Int8Linear(lin)(x), lin(x)) < 0.03


def test_quantize_int8_replaces_linears_and_siblings_share_one_quantisation(monkeypatch):
    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (
                _linear(32, 32, seed=1),
                _linear(32, 32, seed=2),
                _linear(32, 32, seed=3),
            )
            self.out = _linear(32, 16, seed=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.query(x) + self.key(x) * self.value(x))

    ref = Attn().eval()
    model = copy.deepcopy(ref)
    assert quantize_int8(model) == 4
    assert all(isinstance(m, Int8Linear) for m in (model.query, model.key, model.value, model.out))
    assert model.query.shared is model.key.shared is model.value.shared is model.out.shared

    calls = []
    real = quantize_rows

    def counting(x2):
        calls.append(x2.shape)
        return real(x2)

    monkeypatch.setattr("embedkit.engine.int8.quantize_rows", counting)
    torch.manual_seed(5)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        got, want = model(x), ref(x)
    # query/key/value quantise x once; out quantises its own (different) input.
    assert len(calls) == 2
    assert _rel_err(got, want) < 0.05
    # A copy (a device replica) starts with its own empty cache, and gives the same numbers.
    twin = copy.deepcopy(model)
    assert twin.query.shared is not model.query.shared
    with torch.inference_mode():
        assert torch.equal(twin(x), got)


def test_shared_quantisation_is_per_thread():
    model = torch.nn.Module()
    model.a, model.b = _linear(16, 8, seed=1), _linear(16, 8, seed=2)
    quantize_int8(model)
    xs = [torch.randn(4, 16) for _ in range(4)]
    with torch.inference_mode():
        want = [(model.a(x), model.b(x)) for x in xs]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        out = []
        with torch.inference_mode():
            for _ in range(50):
                out.append((model.a(xs[i]), model.b(xs[i])))
        results[i] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for a, b in results[i]:
            assert torch.equal(a, want[i][0]) and torch.equal(b, want[i][1])


def test_int8_embedder_is_close_to_fp32_and_uses_the_int8_budget(tiny_model, tiny_embedder):
    texts = [("hello world " * (i % 13 + 1)).strip() for i in range(40)] + ["a", "é ü 😀"]
    e = Embedder(str(tiny_model), device="cpu", precision="int8")
    assert e.describe()["precision"] == "int8"
    assert e.max_batch_tokens == 2048
    assert any(isinstance(m, Int8Linear) for m in e._transformer.modules())
    got, want = e.encode(texts), tiny_embedder.encode(texts)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert float(cos.min()) >= 0.99


def test_int8_image_embedder_is_close_to_fp32(tiny_clip, clip_embedder):
    from embedkit.engine.image import ImageEmbedder

    rng = np.random.default_rng(0)
    images = [(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(6)]
    q = ImageEmbedder(str(tiny_clip), device="cpu", precision="int8")
    assert any(isinstance(m, Int8Linear) for m in q._clip.modules())
    got, want = q.encode_images(images), clip_embedder.encode_images(images)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert float(cos.min()) >= 0.99

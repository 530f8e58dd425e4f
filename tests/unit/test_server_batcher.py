"""The dynamic batcher on a real tiny model: merged requests, bounded queue, dead worker."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import numpy as np
import pytest

from embedkit.errors import InputError, NotReadyError, OverloadedError, PayloadTooLargeError
from embedkit.server.batcher import Batcher, _Item


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(tiny_embedder):
    texts = [f"text number {i} " + "word " * (i % 9) for i in range(40)]  # lengths vary
    texts[5] = "a long one " * 40  # truncated to the model's 32 tokens
    seen: list[int] = []

    async def main():
        b = Batcher(
            tiny_embedder, max_wait_s=0.05, max_queue_tokens=100_000, on_batch=lambda n, t: seen.append(n)
        )
        b.start(asyncio.get_running_loop())
        futs = [b.submit(tiny_embedder.tokenize([t])) for t in texts]
        out = await asyncio.gather(*futs)
        b.stop()
        return out, b

    out, b = asyncio.run(main())
    expected = tiny_embedder.encode(texts)
    got = np.concatenate(out)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert max(seen) > 1, "requests queued together must share a batch"
    assert b.queued_tokens == 0


def _items(embedder, loop, texts):
    """One queued one-text request per text, with default options."""
    return [_Item(embedder.tokenize([t]), (None, None), loop.create_future()) for t in texts]


def test_the_worker_waits_for_company_only_after_a_merged_batch(tiny_embedder):
    """A lone request is not held back (even with a 30 s wait configured); after a batch that
    merged several requests, the next batch waits for the requests still coming back."""
    b = Batcher(tiny_embedder, max_wait_s=30.0, max_queue_tokens=100_000)
    loop = asyncio.new_event_loop()
    try:
        items = _items(tiny_embedder, loop, ["one", "two"])
        batch, carry = b._gather(items[0])  # idle server, empty queue: no wait
        assert batch == [items[0]] and carry is None and b._expect == 0
        b.max_batch_tokens = 10 * (items[0].tokens + items[1].tokens)  # room for more than two
        b._expect = 2  # the previous batch merged two requests
        threading.Thread(target=b._q.put, args=(items[1],)).start()  # arrives while the worker waits
        t0 = time.monotonic()
        batch, carry = b._gather(items[0])
        # both are in: the worker stops waiting (not 30 s for a third that may never come)
        assert batch == items and carry is None and b._expect == 2
        assert time.monotonic() - t0 < 10.0
    finally:
        loop.close()


def test_after_a_merged_batch_the_worker_waits_until_as_many_are_back(tiny_embedder):
    """Clients answered together send their next requests together: the next batch waits (up to
    max_wait_s) until as many requests as the previous batch held are queued, then starts."""
    b = Batcher(tiny_embedder, max_wait_s=30.0, max_queue_tokens=100_000)
    loop = asyncio.new_event_loop()
    try:
        items = _items(tiny_embedder, loop, [f"query {i}" for i in range(4)])
        b._expect = 3

        def arrive() -> None:
            for it in items[1:]:
                time.sleep(0.05)
                b._q.put(it)

        threading.Thread(target=arrive).start()
        batch, carry = b._gather(items[0])
        assert batch == items[:3] and carry is None  # the fourth came after the batch was whole
        assert b._q.get(timeout=5) is items[3]
        assert b._expect == 3
    finally:
        loop.close()


def test_requests_queued_while_the_worker_waited_past_its_deadline_join_the_batch(tiny_embedder):
    """The worker's timed wait may return late (the event loop holds the GIL while it reads a burst
    of requests): whatever was queued by then joins the batch, not the next one."""

    class LateQueue(queue.SimpleQueue):
        """A timed get that times out while the burst arrives (as a late wake-up does)."""

        def __init__(self, burst):
            self.burst = burst

        def get(self, block=True, timeout=None):
            if timeout is not None and self.burst:
                for it in self.burst:
                    self.put(it)
                self.burst = []
                raise queue.Empty
            return super().get(block, timeout)

    b = Batcher(tiny_embedder, max_wait_s=0.002, max_queue_tokens=100_000)
    loop = asyncio.new_event_loop()
    try:
        items = _items(tiny_embedder, loop, [f"query {i}" for i in range(5)])
        b._q = LateQueue(items[1:])
        b._expect = 5  # after a merged batch of five the worker waits for company
        batch, carry = b._gather(items[0])
        assert batch == items and carry is None
    finally:
        loop.close()


def test_a_request_alone_gets_exactly_the_engine_vectors(tiny_embedder):
    texts = ["short", "a bit longer text here", "the cat sat on the mat and the dog ran in the park"]

    async def main():
        b = Batcher(tiny_embedder, max_wait_s=0.0)
        b.start(asyncio.get_running_loop())
        vecs = await b.submit(tiny_embedder.tokenize(texts), normalize=False, dimensions=8)
        b.stop()
        return vecs

    vecs = asyncio.run(main())
    assert np.array_equal(vecs, tiny_embedder.encode(texts, normalize=False, dimensions=8))


def test_full_queue_answers_429_at_once_and_oversized_requests_413(tiny_embedder):
    async def main():
        b = Batcher(tiny_embedder, max_queue_tokens=10)  # each of the two texts is 6 tokens
        loop = asyncio.get_running_loop()
        first = b.submit(tiny_embedder.tokenize(["hello world the cat"]))  # queued, worker not started
        with pytest.raises(OverloadedError) as busy:
            b.submit(tiny_embedder.tokenize(["the dog sat on"]))
        assert busy.value.retry_after > 0
        with pytest.raises(PayloadTooLargeError, match="max_queue_tokens"):
            b.submit(tiny_embedder.tokenize(["the cat " * 10]))
        b.start(loop)  # the queued request is still served once the worker runs
        vec = await first
        b.stop()
        return vec

    assert asyncio.run(main()).shape == (1, 32)


def test_errors_in_one_group_fail_only_those_requests(tiny_embedder):
    async def main():
        b = Batcher(tiny_embedder, max_wait_s=0.05)
        b.start(asyncio.get_running_loop())
        tok = tiny_embedder.tokenize(["fine text"])
        bad = b.submit(tok, dimensions=999)  # the engine refuses it in the worker
        good = b.submit(tok)
        results = await asyncio.gather(bad, good, return_exceptions=True)
        alive = b.alive
        b.stop()
        return results, alive

    (bad, good), alive = asyncio.run(main())
    assert isinstance(bad, InputError) and good.shape == (1, 32) and alive


def test_a_dead_worker_refuses_work_with_503(tiny_embedder):
    def die():
        raise SystemExit("a hook called sys.exit()")

    async def main():
        b = Batcher(tiny_embedder)
        b.start(asyncio.get_running_loop())
        job = b.call(die)
        for _ in range(200):
            if not b.alive:
                break
            await asyncio.sleep(0.01)
        alive = b.alive
        with pytest.raises(NotReadyError, match="worker has stopped"):
            b.submit(tiny_embedder.tokenize(["x"]))
        err = await asyncio.gather(job, return_exceptions=True)
        return alive, err

    alive, err = asyncio.run(main())
    assert alive is False
    assert isinstance(err[0], NotReadyError)


def test_stop_drains_queued_work_then_refuses_new_work(tiny_embedder):
    async def main():
        b = Batcher(tiny_embedder)
        loop = asyncio.get_running_loop()
        futs = [b.submit(tiny_embedder.tokenize([f"text {i}"])) for i in range(10)]
        b.start(loop)
        await loop.run_in_executor(None, b.stop)
        with pytest.raises(NotReadyError, match="shutting down"):
            b.submit(tiny_embedder.tokenize(["late"]))
        return await asyncio.gather(*futs)

    assert len(asyncio.run(main())) == 10


def test_merged_requests_are_split_by_the_engine_s_measured_forward_cost(tiny_embedder, monkeypatch):
    """With a measured (cheap) forward pass, a merged batch of short and long texts is embedded as
    length groups; with the default (dear) one, as one padded batch."""
    import embedkit.server.batcher as batcher_mod

    texts = ["tiny"] * 6 + ["a much longer text that runs on for a good number of tokens here"] * 2
    tok = tiny_embedder.tokenize(texts)
    groups: list[int] = []
    real = batcher_mod.length_groups

    def spy(lengths, max_tokens, forward_cost):
        out = real(lengths, max_tokens, forward_cost)
        groups.append((forward_cost, len(out)))
        return out

    monkeypatch.setattr(batcher_mod, "length_groups", spy)
    b = Batcher(tiny_embedder, max_queue_tokens=100_000)
    monkeypatch.setattr(tiny_embedder, "forward_cost_tokens", None)
    b._embed(tok, alone=False, normalize=None, dimensions=None)  # nothing measured: the default
    monkeypatch.setattr(tiny_embedder, "forward_cost_tokens", 1000.0)
    dear = b._embed(tok, alone=False, normalize=None, dimensions=None)
    monkeypatch.setattr(tiny_embedder, "forward_cost_tokens", 4.0)
    cheap = b._embed(tok, alone=False, normalize=None, dimensions=None)
    assert groups[0][0] == batcher_mod.FORWARD_COST_TOKENS
    assert groups[1:] == [(1000, 1), (4, 2)]
    np.testing.assert_allclose(cheap, dear, atol=1e-5)


def test_a_lone_text_runs_inline_only_while_the_worker_is_idle(tiny_embedder, monkeypatch):
    """A one-text request that would run alone on ONNX Runtime is answered on the event loop when
    nothing is queued or running; behind other work it queues for the worker as before."""
    threads: list[str] = []
    real = tiny_embedder.embed_tokenized

    def spy(tok, **kw):
        threads.append(threading.current_thread().name)
        return real(tok, **kw)

    import embedkit.server.batcher as batcher_mod

    monkeypatch.setattr(tiny_embedder, "runs_alone_on_graph", lambda tok: len(tok) == 1)
    monkeypatch.setattr(tiny_embedder, "embed_tokenized", spy)
    seen: list[tuple[int, int]] = []

    async def main():
        b = Batcher(tiny_embedder, max_wait_s=0.0, on_batch=lambda n, t: seen.append((n, t)))
        b.start(asyncio.get_running_loop())
        await asyncio.sleep(0)  # the loop counts its standing tasks once the worker starts
        idle = b.submit(tiny_embedder.tokenize(["hello there"]))
        done_at_once = idle.done()
        bad = b.submit(tiny_embedder.tokenize(["hello there"]), dimensions=999)  # fails, alone
        gate = threading.Event()
        job = b.call(gate.wait, 10)  # the worker is busy with this job
        queued = b.submit(tiny_embedder.tokenize(["queued behind it"]))
        queued_at_once = queued.done()
        gate.set()
        await job
        await queued  # the worker is idle again
        assert b._in_flight == 0
        # Other requests' tasks on the loop (they arrived while the loop was busy): not inline, so a
        # burst is batched instead of answered one at a time on the loop
        release = asyncio.Event()
        others = [asyncio.create_task(release.wait()) for _ in range(3)]
        crowded = b.submit(tiny_embedder.tokenize(["others are waiting"]))
        crowded_at_once = crowded.done()
        release.set()
        await asyncio.gather(crowded, *others)
        # a text over INLINE_MAX_TOKENS goes to the worker: the loop runs short queries only
        long_text = tiny_embedder.tokenize(["a text longer than the cap"])
        monkeypatch.setattr(batcher_mod, "INLINE_MAX_TOKENS", long_text.num_tokens - 1)
        long_at_once = b.submit(long_text).done()
        crowded_at_once = crowded_at_once or long_at_once
        out = await idle, await queued, await asyncio.gather(bad, return_exceptions=True)
        off = Batcher(tiny_embedder, max_wait_s=0.0, inline_idle=False)
        off.start(asyncio.get_running_loop())
        await off.submit(tiny_embedder.tokenize(["not inline"]))
        b.stop()
        off.stop()
        return done_at_once, queued_at_once or crowded_at_once, out, b

    done_at_once, queued_at_once, (idle, queued, (bad,)), b = asyncio.run(main())
    assert done_at_once and not queued_at_once
    assert threads == ["MainThread", "MainThread"] + ["embedkit-infer"] * 4
    assert np.array_equal(idle, tiny_embedder.encode(["hello there"]))
    assert np.array_equal(queued, tiny_embedder.encode(["queued behind it"]))
    assert isinstance(bad, InputError) and b.error is None
    assert seen[0] == (1, tiny_embedder.tokenize(["hello there"]).num_tokens)
    assert b._in_flight == 0 and b.queued_tokens == 0


def test_a_worker_that_dies_mid_batch_fails_that_batch_instead_of_leaving_it_waiting(
    tiny_embedder, monkeypatch
):
    """An error outside the engine call (here merging the requests' tokens) kills the worker before
    it answers the batch: every request of that batch, and what is queued, gets 503 at once."""
    import embedkit.server.batcher as batcher_mod

    def broken(parts):
        raise MemoryError("no memory to merge the requests")

    monkeypatch.setattr(batcher_mod.Tokenized, "concat", staticmethod(broken))

    async def main():
        b = Batcher(tiny_embedder, max_wait_s=0.0)
        futs = [b.submit(tiny_embedder.tokenize([f"text {i}"])) for i in range(3)]  # merged: concat
        b.start(asyncio.get_running_loop())
        return await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30), b

    results, b = asyncio.run(main())
    assert all(isinstance(r, NotReadyError) for r in results), results
    assert isinstance(b.error, MemoryError) and not b.alive


def test_a_worker_stopped_mid_batch_answers_each_request_once_and_keeps_its_counts(
    tiny_embedder, monkeypatch
):
    """A fatal error in the second forward pass of a batch: the first group keeps its vectors, the
    rest fail, and every request is counted off once (nothing left in flight, no tokens below 0)."""
    b = Batcher(tiny_embedder, max_wait_s=0.0)
    real = b._embed
    calls = []

    def embed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit("a hook called sys.exit()")
        return real(*args, **kwargs)

    monkeypatch.setattr(b, "_embed", embed)

    async def main():
        # Three Matryoshka widths: three groups, so three forward passes in one batch.
        futs = [
            b.submit(tiny_embedder.tokenize([f"text {i}"]), dimensions=d) for i, d in enumerate((8, 16, 24))
        ]
        b.start(asyncio.get_running_loop())
        out = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        for _ in range(3):  # let every delivery scheduled by the dying worker run
            await asyncio.sleep(0.01)
        return out

    first, second, third = asyncio.run(main())
    assert first.shape == (1, 8)
    assert isinstance(second, RuntimeError) and "worker stopped" in str(second)
    assert isinstance(third, NotReadyError)
    assert b._in_flight == 0 and b.queued_tokens == 0
    assert isinstance(b.error, SystemExit) and not b.alive

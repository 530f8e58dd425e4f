"""DrainUnreadBody: an answer given before the body is read waits until the client's body has been
read to the end (bounded), so the connection is not reset under the client; plain ASGI, no server."""

from __future__ import annotations

import asyncio

from embedkit.server.app import DrainUnreadBody


async def answer_at_once(scope, receive, send):
    """An app that refuses before reading the body, as a 413 / 401 / 503 does."""
    await send({"type": "http.response.start", "status": 413, "headers": []})
    await send({"type": "http.response.body", "body": b"too large"})


def run(headers: dict[bytes, bytes], chunks: list[bytes], max_bytes: int = 1000):
    """Drive the middleware; returns (chunks read before the answer started, everything sent)."""
    pending = list(chunks)
    read_before_answer: list[int] = []
    sent: list[dict] = []

    async def receive():
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message):
        if message["type"] == "http.response.start":
            read_before_answer.append(len(chunks) - len(pending))
        sent.append(message)

    scope = {"type": "http", "headers": list(headers.items())}
    asyncio.run(DrainUnreadBody(answer_at_once, max_bytes=max_bytes)(scope, receive, send))
    return read_before_answer[0], sent


def test_the_rest_of_the_body_is_read_before_the_answer_starts():
    chunks = [b"x" * 100] * 5
    read, sent = run({b"content-length": b"500"}, chunks)
    assert read == 5 and [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    read, _ = run({b"transfer-encoding": b"chunked"}, chunks)  # no length announced: read it too
    assert read == 5


def test_draining_is_bounded_by_bytes_and_skips_what_cannot_be_read():
    read, _ = run({b"content-length": b"5000"}, [b"x" * 1000] * 5, max_bytes=1000)
    assert read == 0  # announced more than the bound: answer at once
    read, _ = run({b"transfer-encoding": b"chunked"}, [b"x" * 600] * 5, max_bytes=1000)
    assert read == 2  # stops once past the bound
    read, _ = run({b"content-length": b"500", b"expect": b"100-continue"}, [b"x" * 100] * 5)
    assert read == 0  # the client waits for this answer before sending its body: do not ask for it
    read, _ = run({}, [b""])  # no body at all (a GET)
    assert read == 0

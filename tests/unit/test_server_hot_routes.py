"""HotRoutes: which POSTs it answers itself (body read whole, two ASGI messages) and which it
leaves to the full stack (drain and Starlette); plain ASGI, no server."""

from __future__ import annotations

import asyncio

import pytest
from starlette.responses import Response

from embedkit.server.app import HotRoutes


def drive(
    headers: dict[bytes, bytes], chunks: list[bytes], *, path: str = "/invocations", method: str = "POST"
):
    """Run HotRoutes over one request; returns (who answered, the body the endpoint got, messages sent)."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    pending.append({"type": "http.disconnect"})
    seen: dict = {}
    sent: list[dict] = []

    async def receive():
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    async def endpoint(request, body):
        seen["who"], seen["body"] = "endpoint", body
        assert request.headers.get("content-type") == "application/json"
        return Response(b'{"ok":1}', media_type="application/json")

    async def full_stack(scope, receive, send):
        seen["who"] = "stack"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers.items()],
        "query_string": b"",
    }
    asyncio.run(HotRoutes(full_stack, {"/invocations": endpoint}, max_body_bytes=100)(scope, receive, send))
    return seen.get("who"), seen.get("body"), sent


def test_a_query_of_declared_length_is_read_whole_and_answered_by_its_endpoint():
    who, body, sent = drive({b"content-length": b"12"}, [b'{"inputs":', b'"a"}'])
    assert who == "endpoint" and body == b'{"inputs":"a"}'
    start, last = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-length", b"8") in start["headers"]
    assert last == {"type": "http.response.body", "body": b'{"ok":1}'}


@pytest.mark.parametrize(
    "headers",
    [
        {b"content-length": b"101"},  # over max_body_bytes: the stack answers 413 and drains
        {b"transfer-encoding": b"chunked"},  # no declared length
        {b"content-length": b"5", b"expect": b"100-continue"},  # waits for an answer before its body
        {},  # no length at all
        {b"content-length": b"x"},  # not a number
    ],
)
def test_other_bodies_take_the_full_stack(headers):
    who, body, _ = drive(headers, [b"{}"])
    assert who == "stack" and body is None


def test_other_routes_and_methods_take_the_full_stack():
    assert drive({b"content-length": b"2"}, [b"{}"], path="/info")[0] == "stack"
    assert drive({b"content-length": b"2"}, [b"{}"], method="GET")[0] == "stack"


def test_a_client_that_disconnects_mid_body_gets_no_answer_and_no_endpoint_call():
    async def main():
        messages = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
        sent: list = []
        called: list = []

        async def endpoint(request, body):
            called.append(body)
            return Response(b"")

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-length", b"9")],
        }
        await HotRoutes(None, {"/invocations": endpoint}, max_body_bytes=100)(scope, receive, send)
        return sent, called

    sent, called = asyncio.run(main())
    assert sent == [] and called == []


def test_a_request_the_admit_check_refuses_takes_the_full_stack():
    """With an API key, a request without it is refused by the full stack before its body is read
    (and the body drained), not read whole first."""

    async def main(admit):
        seen = []

        async def endpoint(request, body):
            seen.append("endpoint")
            return Response(b"")

        async def stack(scope, receive, send):
            seen.append("stack")

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-length", b"2")],
        }

        async def send(message):
            pass

        await HotRoutes(stack, {"/invocations": endpoint}, max_body_bytes=100, admit=admit)(
            scope, receive, send
        )
        return seen

    assert asyncio.run(main(lambda headers: False)) == ["stack"]
    assert asyncio.run(main(lambda headers: True)) == ["endpoint"]

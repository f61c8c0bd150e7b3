from __future__ import annotations

import orjson
import pytest

from app.errors import (
    ContextLengthExceeded,
    GatewayError,
    GatewayOverloaded,
    ModelNotFound,
    NoWorkerAvailable,
    RateLimited,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    duration,
    render,
    sse_event,
    status_of,
)


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (ContextLengthExceeded("x", param="messages"), 400, "invalid_request_error", "context_length_exceeded"),
        (ModelNotFound("x", param="model"), 404, "invalid_request_error", "model_not_found"),
        (UpstreamError("x"), 502, "server_error", "worker_unreachable"),
        (UpstreamTimeout("x"), 504, "server_error", "worker_timeout"),
        (NoWorkerAvailable("x", retry_after=3), 503, "server_error", "no_worker_available"),
        (GatewayOverloaded("x", retry_after=1), 503, "server_error", "gateway_overloaded"),
        (GatewayError("x"), 500, "server_error", "internal_error"),
    ],
)
def test_every_error_renders_openai_shaped(exc: GatewayError, status: int, type_: str, code: str) -> None:
    got_status, headers, body = render(exc)
    doc = orjson.loads(body)
    assert got_status == status
    assert doc == {"error": {"message": "x", "type": type_, "param": exc.param, "code": code}}
    assert (b"content-type", b"application/json") in headers


def test_retry_after_header() -> None:
    _, headers, _ = render(RateLimited("slow down", retry_after=2.4))
    assert (b"retry-after", b"2") in headers


def test_a_429_no_wait_can_cure_tells_clients_not_to_retry() -> None:
    rate = [(b"x-ratelimit-limit-tokens", b"100"), (b"x-ratelimit-remaining-tokens", b"40")]
    _, headers, _ = render(RateLimited("too big", code="request_too_large", rate_headers=rate, retry=False))
    got = dict(headers)
    assert got[b"x-should-retry"] == b"false" and b"retry-after" not in got
    assert (got[b"x-ratelimit-limit-tokens"], got[b"x-ratelimit-remaining-tokens"]) == (b"100", b"40")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, b"0s"), (0.0201, b"21ms"), (0.9995, b"1000ms"), (1.0, b"1s"), (1.2, b"2s"), (59.5, b"1m0s"),
     (60.0, b"1m0s"), (90.0, b"1m30s"), (3600.0, b"60m0s")],
)
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: bytes) -> None:
    assert duration(seconds) == text


def test_worker_errors_pass_through_with_their_status() -> None:
    body = orjson.dumps({"error": {"message": "bad", "type": "BadRequestError", "param": "max_tokens",
                                   "code": 400}})
    status, _, out = render(UpstreamStatus(400, body))
    assert status == 400
    assert orjson.loads(out)["error"] == {"message": "bad", "type": "BadRequestError", "param": "max_tokens",
                                          "code": 400}  # vLLM's number, as it sent it


def test_a_workers_error_without_a_code_has_none_and_its_retry_after_passes() -> None:
    status, headers, out = render(UpstreamStatus(404, b'{"detail": "Not Found"}', b"7"))
    assert status == 404 and orjson.loads(out)["error"] == {
        "message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}
    assert not [h for h in headers if h[0] == b"retry-after"]  # only a 429 or 503 carries it
    _, headers, _ = render(UpstreamStatus(503, b'{"error": {"message": "busy", "code": "overloaded"}}', b"7"))
    assert (b"retry-after", b"7") in headers
    for odd in (b"soon", b"-1", b"9" * 12):
        _, headers, _ = render(UpstreamStatus(429, b"", odd))
        assert not [h for h in headers if h[0] == b"retry-after"]


def test_non_json_worker_errors_still_become_openai_shaped() -> None:
    status, _, out = render(UpstreamStatus(500, b"<html>oops</html>"))
    assert status == 500
    assert set(orjson.loads(out)["error"]) == {"message", "type", "param", "code"}


def test_sse_event_form() -> None:
    event = sse_event(UpstreamError("gone"))
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:])["error"]["code"] == "worker_unreachable"


def test_a_worker_error_of_any_depth_or_status_is_read_without_raising() -> None:
    # 1 000 nested lists: orjson reads them; Python's repr of them would hit the recursion limit
    body = b'{"error": {"message": "m", "code": ' + b"[" * 1000 + b"0" + b"]" * 1000 + b"}}"
    exc = UpstreamStatus(400, body)
    assert (status_of(exc), exc.message) == (400, "m")
    assert "[[" not in str(exc.error_code)  # a code that is not a string or number is left out
    assert orjson.loads(exc.body())["error"]["message"] == "m"
    for status in (999, 600, 301, 204, 101, 0):
        assert status_of(UpstreamStatus(status, b"")) == 502
        assert UpstreamStatus(status, b"").message == f"worker answered HTTP {status}"

"""The gateway in front of a real CPU vLLM engine, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from app.settings import Settings

from .conftest import Engine
from .utils import (
    GatewayProcess,
    RunningGateway,
    gateway_process,
    metric_sum,
    open_request,
    run_gateway,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Hello world, say ok!"}]


def gateway_settings(engine: Engine, **overrides: Any) -> Settings:
    return Settings(upstream=[engine.url], upstream_api_key=engine.api_key, **overrides)


@pytest.fixture(scope="module")
def gw(engine: Engine) -> Iterator[RunningGateway]:
    with run_gateway(gateway_settings(engine, max_tokens_cap=512, default_max_tokens=16)) as gateway:
        yield gateway


_clients: list[openai.OpenAI] = []


def client(gw: RunningGateway) -> openai.OpenAI:
    c = openai.OpenAI(base_url=gw.base, api_key="unused", max_retries=0)
    _clients.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def sse_events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def test_models_lists_engine_model_with_context_cap(gw: RunningGateway, engine: Engine) -> None:
    models = client(gw).models.list()
    ids = [m.id for m in models.data]
    assert ids == [engine.model]
    assert models.data[0].model_extra is not None
    assert models.data[0].model_extra["max_model_len"] == engine.max_model_len


def test_sdk_models_retrieve(gw: RunningGateway, engine: Engine) -> None:
    model = client(gw).models.retrieve("tiny-llama")
    assert model.id == "tiny-llama" and model.model_extra and model.model_extra["max_model_len"] == engine.max_model_len
    with pytest.raises(openai.NotFoundError):
        client(gw).models.retrieve("no-such-model")


def test_sdk_non_stream_chat_has_usage(gw: RunningGateway) -> None:
    r = client(gw).chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=8, stream=False)
    assert r.object == "chat.completion"
    assert r.usage is not None and r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert isinstance(r.choices[0].message.content, str)


def test_sdk_stream_with_usage(gw: RunningGateway) -> None:
    stream = client(gw).chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=6, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_stream_is_the_default_and_usage_is_stripped_when_not_asked(gw: RunningGateway) -> None:
    r = httpx.post(gw.base + "/chat/completions", json={"model": "tiny-llama", "messages": HELLO, "max_tokens": 5},
                   timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    bodies = [orjson.loads(e) for e in events[:-1]]
    assert all("usage" not in b or b["usage"] is None for b in bodies)
    assert all(b["choices"] for b in bodies)  # no empty-choices usage chunk
    # the gateway still counted the tokens the client never saw
    samples = scrape(gw.url + "/metrics")
    assert metric_sum(samples, "tokengate_completion_tokens_total", model="tiny-llama") >= 5


def test_continuous_usage_without_include_usage_adds_no_usage(gw: RunningGateway, engine: Engine) -> None:
    """vLLM counts continuous_usage_stats only with include_usage: the usage the gateway asks for on its own
    behalf must not turn it on for a client that asked for none."""
    body = {"model": "tiny-llama", "messages": HELLO, "max_tokens": 4,
            "stream_options": {"continuous_usage_stats": True}}
    r = httpx.post(gw.base + "/chat/completions", json=body, timeout=30)
    direct = httpx.post(engine.url + "/v1/chat/completions", headers=engine.headers, timeout=30,
                        json={**body, "model": engine.model, "stream": True})
    for text in (r.text, direct.text):
        bodies = [orjson.loads(e) for e in sse_events(text)[:-1]]
        assert bodies and all(b.get("usage") is None for b in bodies)


@pytest.mark.parametrize(("route", "extra", "field"), [
    ("chat/completions", {"messages": HELLO, "prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"prompt": "Hello world", "echo": True, "logprobs": 1}, "prompt_logprobs"),
])
def test_prompt_logprobs_unstreamed_are_the_workers_own(gw: RunningGateway, engine: Engine, route: str,
                                                       extra: dict[str, Any], field: str) -> None:
    body = {"max_tokens": 2, "stream": False, "temperature": 0, **extra}
    r = httpx.post(f"{gw.base}/{route}", json={"model": "tiny-llama", **body}, timeout=60)
    direct = httpx.post(f"{engine.url}/v1/{route}", json={"model": engine.model, **body}, headers=engine.headers,
                        timeout=60)
    assert r.status_code == direct.status_code == 200, r.text
    assert r.json()["choices"][0].get(field) or r.json().get(field)
    mine, theirs = r.json(), direct.json()
    assert mine["choices"][0].get(field) == theirs["choices"][0].get(field)
    assert mine.get(field) == theirs.get(field)


def test_non_stream_returns_one_json_object(gw: RunningGateway) -> None:
    r = httpx.post(gw.base + "/completions",
                   json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3, "stream": False}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["object"] == "text_completion" and doc["usage"]["completion_tokens"] == 3


def test_absent_max_tokens_gets_the_default(gw: RunningGateway) -> None:
    r = client(gw).chat.completions.create(model="tiny-llama", messages=HELLO, stream=False,
                                           extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 16


def test_async_sdk_stream_and_non_stream_completions(gw: RunningGateway) -> None:
    async def main() -> tuple[str, int]:
        ac = openai.AsyncOpenAI(base_url=gw.base, api_key="unused", max_retries=0)
        try:
            stream = await ac.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, stream=True)
            parts = [c.choices[0].text async for c in stream if c.choices]
            full = await ac.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4, stream=False)
            assert full.usage is not None
            return "".join(parts), full.usage.completion_tokens
        finally:
            await ac.close()

    text, n = asyncio.run(main())
    assert text and n == 4


def test_max_tokens_above_cap_is_clamped_with_header(gw: RunningGateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="tiny-llama", messages=HELLO, max_tokens=5000, stream=False, extra_body={"ignore_eos": True}
    )
    assert raw.headers["x-tokengate-max-tokens-clamped"] == "5000"
    assert raw.parse().usage.completion_tokens == 512  # type: ignore[union-attr]


def test_max_completion_tokens_is_capped_too(gw: RunningGateway) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="tiny-llama", messages=HELLO, max_completion_tokens=999, stream=False,
        extra_body={"ignore_eos": True},
    )
    assert raw.headers["x-tokengate-max-tokens-clamped"] == "999"
    assert raw.parse().usage.completion_tokens == 512  # type: ignore[union-attr]


def test_reject_policy_refuses_max_tokens_above_cap(engine: Engine) -> None:
    with run_gateway(gateway_settings(engine, max_tokens_cap=64, cap_policy="reject")) as gw:
        with pytest.raises(openai.BadRequestError) as err:
            client(gw).chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=65)
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == "max_tokens"
        ok = client(gw).chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=64, stream=False)
        assert ok.usage is not None


@pytest.mark.parametrize("value", [0, -1, "12", 1.5, True])
def test_invalid_max_tokens_is_400(gw: RunningGateway, value: object) -> None:
    r = httpx.post(gw.base + "/chat/completions",
                   json={"model": "tiny-llama", "messages": HELLO, "max_tokens": value}, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(gw: RunningGateway) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(gw).chat.completions.create(model="no-such-model", messages=HELLO)
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "model_not_found"


def _chat_with_tokens(engine: Engine, n: int) -> list[dict[str, str]]:
    """A one-message chat whose templated prompt is exactly n tokens, as the worker itself counts it
    (" a" is one token of the tiny model's vocabulary, so each repetition adds exactly one)."""

    def chat(k: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": "a" + " a" * (k - 1)}]

    base = engine.tokenize({"messages": chat(1), "add_generation_prompt": True}) - 1
    msgs = chat(n - base)
    assert engine.tokenize({"messages": msgs, "add_generation_prompt": True}) == n
    return msgs


def test_context_cap_exact_boundary_chat(engine: Engine) -> None:
    cap = 96
    with run_gateway(gateway_settings(engine, context_cap=cap)) as gw:
        exact = _chat_with_tokens(engine, cap)
        over = _chat_with_tokens(engine, cap + 1)
        ok = client(gw).chat.completions.create(model="tiny-llama", messages=exact, max_tokens=5, stream=False)
        assert ok.usage is not None and ok.usage.prompt_tokens == cap
        with pytest.raises(openai.BadRequestError) as err:
            client(gw).chat.completions.create(model="tiny-llama", messages=over, max_tokens=5)
        body = err.value.body
        assert isinstance(body, dict)
        assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_cap_rejections_total", reason="context_length") == 1


# messages vLLM rewrites before its chat template sees them (a developer role the template lacks becomes a system
# message, a null content an empty one, tool calls are re-validated): the gateway must count what vLLM counts
_REWRITTEN = {
    "developer": [{"role": "developer", "content": "Hi"}],
    "null content": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
    "tool calls": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "42"}],
}


@pytest.mark.parametrize("shape", list(_REWRITTEN))
def test_context_cap_exact_boundary_for_messages_vllm_rewrites(engine: Engine, shape: str) -> None:
    cap = 64

    def padded(n: int) -> list[dict[str, Any]]:
        """The shape, then a user message padded so the worker counts exactly n tokens."""
        def msgs(k: int) -> list[dict[str, Any]]:
            return [*_REWRITTEN[shape], {"role": "user", "content": "a" + " a" * (k - 1)}]
        base = engine.tokenize({"messages": msgs(1), "add_generation_prompt": True}) - 1
        out = msgs(n - base)
        assert engine.tokenize({"messages": out, "add_generation_prompt": True}) == n
        return out

    with run_gateway(gateway_settings(engine, context_cap=cap)) as gw:
        ok = httpx.post(gw.base + "/chat/completions", timeout=60, json={
            "model": "tiny-llama", "messages": padded(cap), "max_tokens": 1, "stream": False})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] == cap
        over = httpx.post(gw.base + "/chat/completions", timeout=60, json={
            "model": "tiny-llama", "messages": padded(cap + 1), "max_tokens": 1, "stream": False})
        assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
        assert f"your prompt is {cap + 1} tokens" in over.json()["error"]["message"]


def test_a_chat_the_worker_refuses_while_counting_it_gets_the_chat_routes_error(gw: RunningGateway,
                                                                                engine: Engine) -> None:
    """Counted through the worker's /tokenize (a null content is not counted locally), whose validation error also
    said "body.prompt: Field required" and named body.prompt: the client gets the error its chat route gives."""
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": None}], "max_tokens": 3, "stream": False}
    direct = httpx.post(engine.url + "/v1/chat/completions", json=body, headers=engine.headers, timeout=30)
    through = httpx.post(gw.base + "/chat/completions", json=body, timeout=30)
    assert direct.status_code == through.status_code == 400, through.text
    mine, theirs = through.json()["error"], direct.json()["error"]
    assert "body.prompt" not in mine["message"] and mine["param"] == theirs["param"], (mine, theirs)
    assert mine["message"].split(":")[0] == theirs["message"].split(":")[0]  # "N validation errors"


def test_context_cap_prompt_param_for_completions(engine: Engine) -> None:
    cap = 64
    with run_gateway(gateway_settings(engine, context_cap=cap)) as gw:
        ok = client(gw).completions.create(model="tiny-llama", prompt=[7] * cap, max_tokens=3, stream=False)
        assert ok.usage is not None and ok.usage.prompt_tokens == cap
        with pytest.raises(openai.BadRequestError) as err:
            client(gw).completions.create(model="tiny-llama", prompt=[7] * (cap + 1), max_tokens=3)
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == "prompt"
        assert body["code"] == "context_length_exceeded"


def test_a_prompt_vllm_truncates_is_counted_as_truncated(engine: Engine) -> None:
    """truncate_prompt_tokens: vLLM keeps the prompt's last k tokens, so the caps see k (a longer prompt was refused
    as over the context, and one near it had its max_tokens clamped for room it did not need)."""
    cap = 64
    with run_gateway(gateway_settings(engine, context_cap=cap)) as gw:
        c = client(gw)
        for route in ("chat", "completions"):
            extra = {"truncate_prompt_tokens": 20, "ignore_eos": True}
            if route == "chat":
                raw = c.chat.completions.with_raw_response.create(
                    model="tiny-llama", messages=_chat_with_tokens(engine, cap + 40), max_tokens=30, stream=False,
                    extra_body=extra)
            else:
                raw = c.completions.with_raw_response.create(
                    model="tiny-llama", prompt=[7] * (cap + 40), max_tokens=30, stream=False, extra_body=extra)
            answer = raw.parse()
            assert answer.usage is not None and answer.usage.prompt_tokens == 20, route
            assert answer.usage.completion_tokens == 30 and "x-tokengate-max-tokens-clamped" not in raw.headers
        with pytest.raises(openai.BadRequestError) as err:  # kept longer than the cap: still over it
            c.completions.create(model="tiny-llama", prompt=[7] * (cap + 40), max_tokens=3,
                                 extra_body={"truncate_prompt_tokens": cap + 1})
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "context_length_exceeded"
    with run_gateway(gateway_settings(engine)) as gw:  # -1: what the worker's context holds (vLLM: less one)
        answer = client(gw).completions.create(model="tiny-llama", prompt=[7] * (engine.max_model_len + 10),
                                               max_tokens=5, stream=False, extra_body={"truncate_prompt_tokens": -1})
        assert answer.usage is not None and answer.usage.prompt_tokens == engine.max_model_len - 1
        assert answer.usage.completion_tokens == 1


def test_prompt_plus_max_tokens_over_cap_is_clamped_to_what_is_left(engine: Engine) -> None:
    cap = 128
    with run_gateway(gateway_settings(engine, context_cap=cap)) as gw:
        msgs = _chat_with_tokens(engine, 100)
        raw = client(gw).chat.completions.with_raw_response.create(
            model="tiny-llama", messages=msgs, max_tokens=200, stream=False, extra_body={"ignore_eos": True}
        )
        assert raw.headers["x-tokengate-max-tokens-clamped"] == "200"
        usage = raw.parse().usage
        assert usage is not None and usage.prompt_tokens == 100 and usage.completion_tokens == cap - 100


def _running(engine: Engine) -> float:
    return metric_sum(scrape(engine.url + "/metrics"), "vllm:num_requests_running")


def _generated(engine: Engine) -> float:
    return metric_sum(scrape(engine.url + "/metrics"), "vllm:generation_tokens_total")


def _generated_after(gw: GatewayProcess, engine: Engine, before: float) -> float:
    """Once the client has gone: the gateway drops the worker request (closes its connection and tells the worker
    to abort), the engine shows it — nothing running, its token counter settled. Returns the tokens generated."""
    wait_until(lambda: gw.in_flight() == 0, 10.0, "the gateway to drop the worker request", interval=0.02)
    samples: list[float] = []

    def settled() -> bool:
        samples.append(_generated(engine))
        if _running(engine) != 0 or len(samples) < 2 or samples[-1] != samples[-2]:
            time.sleep(0.5)
            return False
        return True

    wait_until(settled, 30.0, "the engine to settle", interval=0.5)
    return _generated(engine) - before


def _abort_scenario(engine: Engine, body: dict[str, Any], leave: Callable[[socket.socket], None],
                    *gateway_args: str) -> list[float]:
    """Send ``body`` through a gateway process, let ``leave`` decide when the client goes, return what the engine
    generated. Up to three tries: on these 2 cores a generating CPU engine can starve every other process for
    seconds (measured: a socket's FIN left unread for >1 s), and an abort that lands after the last token proves
    nothing either way. The 1-second bound itself is asserted against the fake worker in tests/test_proxy.py."""
    results = []
    with gateway_process("--upstream", engine.url, "--upstream-api-key", engine.api_key,
                         "--log-level", "warning", *gateway_args) as gw:
        for _ in range(3):
            wait_until(lambda: _running(engine) == 0, 30, "engine idle")
            before = _generated(engine)
            sock = open_request(gw.url, "/v1/chat/completions", body)
            leave(sock)
            results.append(_generated_after(gw, engine, before))
            if results[-1] < body["max_tokens"] / 2:
                break
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_client_disconnects_total") >= 1
        assert metric_sum(samples, "tokengate_requests_total", status="499") >= 1
    return results


def _read_events(sock: socket.socket, n: int, timeout: float = 60.0) -> bytes:
    """Read until ``n`` SSE data events have come. A receive buffer as small as this test's can leave the
    gateway's socket waiting on TCP's zero-window probes, which back off (seconds, not milliseconds): slow is
    allowed, an answer that ends or stops short is a failure that says what came."""
    received = b""
    deadline = time.monotonic() + timeout
    while received.count(b"data: {") < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            data = None
        if not data:
            tail = received[-600:].decode(errors="replace")
            pytest.fail(f"{'closed' if data == b'' else 'nothing more'} after {received.count(b'data: {')} "
                        f"events, {len(received)} bytes; the last: {tail!r}")
        received += data
    return received


def test_client_disconnect_mid_stream_aborts_the_engine_request(engine: Engine) -> None:
    def leave(sock: socket.socket) -> None:
        with contextlib.closing(sock):
            assert _read_events(sock, 20).startswith(b"HTTP/1.1 200")

    body = {"model": "tiny-llama", "messages": HELLO, "max_tokens": 4000, "ignore_eos": True}
    generated = _abort_scenario(engine, body, leave)
    assert min(generated) < 2000, f"the engine generated {generated} tokens: never aborted"


@pytest.mark.parametrize("upstream", ["stream", "unary"])
def test_client_disconnect_non_stream_aborts_the_engine_request(engine: Engine, upstream: str) -> None:
    def leave(sock: socket.socket) -> None:
        time.sleep(0.5)  # generating: the whole answer takes ~10 s
        sock.close()

    body = {"model": "tiny-llama", "messages": HELLO, "max_tokens": 4000, "ignore_eos": True, "stream": False}
    generated = _abort_scenario(engine, body, leave, "--non-stream-upstream", upstream)
    assert min(generated) < 2000, f"the engine generated {generated} tokens: never aborted"


def test_non_stream_unary_is_the_workers_own_answer(engine: Engine) -> None:
    """--non-stream-upstream unary: the worker answers "stream": false itself; the SDK gets it as it is, and the
    gateway still counts its tokens."""
    body = {"model": "tiny-llama", "max_tokens": 12, "seed": 1234, "messages": HELLO}
    with run_gateway(gateway_settings(engine, non_stream_upstream="unary")) as gw:
        ours = client(gw).chat.completions.create(model="tiny-llama", messages=HELLO,  # type: ignore[arg-type]
                                                  max_tokens=12, seed=1234, stream=False)
        samples = scrape(gw.url + "/metrics")
    theirs = httpx.post(engine.url + "/v1/chat/completions", json={**body, "stream": False}, headers=engine.headers,
                        timeout=60).json()
    assert ours.choices[0].message.content == theirs["choices"][0]["message"]["content"]
    assert ours.usage is not None and ours.usage.completion_tokens == theirs["usage"]["completion_tokens"] == 12
    assert metric_sum(samples, "tokengate_completion_tokens_total") == 12
    assert metric_sum(samples, "tokengate_prompt_tokens_total") == theirs["usage"]["prompt_tokens"]


def test_tokens_streamed_before_a_disconnect_are_counted(engine: Engine) -> None:
    """Up to three tries, as in _abort_scenario. The client's small receive buffer keeps the gateway from writing
    the whole answer into the kernel's buffers while a starved client has not read yet (then the request would be
    complete, and a later close no disconnect: seen once in CI, all three tries)."""
    with run_gateway(gateway_settings(engine)) as gw:
        for _ in range(3):
            before = scrape(gw.url + "/metrics")
            sock = open_request(gw.url, "/v1/chat/completions",
                                {"model": "tiny-llama", "messages": HELLO, "max_tokens": 4000, "ignore_eos": True},
                                recv_buffer=4096)
            with contextlib.closing(sock):
                _read_events(sock, 30)
            wait_until(lambda: metric_sum(scrape(gw.url + "/metrics"), "tokengate_requests_in_flight") == 0, 30,
                       "the request to end")
            after = scrape(gw.url + "/metrics")
            if metric_sum(after, "tokengate_requests_total", status="499") > metric_sum(
                    before, "tokengate_requests_total", status="499"):
                break
        counted = (metric_sum(after, "tokengate_completion_tokens_total")
                   - metric_sum(before, "tokengate_completion_tokens_total"))
        # the usage never came (the stream was cut): the gateway counted what it relayed (a token that decodes to
        # nothing yet, half a UTF-8 character, streams as an empty delta and is not counted)
        assert 20 <= counted < 4000


def test_metrics_move_with_traffic(gw: RunningGateway) -> None:
    """Tokens/s and inter-token latency need the first and last token to reach the gateway in different reads. A
    short answer from the tiny CPU model can come out of vLLM's front end merged into one or two events when the
    machine is busy, so the answer is long (500 tokens) and those two metrics get up to three tries — every
    other metric is checked on every try."""
    decode_seen = False
    for _ in range(3):
        before = scrape(gw.url + "/metrics")
        r = client(gw).chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=500, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
        usage = [c.usage for c in r if c.usage][0]
        assert usage is not None
        after = scrape(gw.url + "/metrics")

        def delta(name: str, after: Any = after, before: Any = before, **labels: str) -> float:
            return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

        assert delta("tokengate_requests_total", route="chat", status="200", model="tiny-llama") == 1
        assert delta("tokengate_time_to_first_token_seconds_count", route="chat") == 1
        assert delta("tokengate_e2e_latency_seconds_count", route="chat") == 1
        assert delta("tokengate_completion_tokens_total") == usage.completion_tokens == 500
        assert delta("tokengate_prompt_tokens_total") == usage.prompt_tokens
        assert metric_sum(after, "tokengate_requests_in_flight") == 0
        tps, itl = (delta("tokengate_output_tokens_per_second_count", route="chat"),
                    delta("tokengate_inter_token_latency_seconds_count", route="chat"))
        assert tps == itl and tps in (0, 1)  # observed together, once per request at most
        if tps == 1:
            decode_seen = True
            break
    assert decode_seen, "tokens/s was never observed in three streamed requests"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_non_stream_answer_matches_the_workers_own(gw: RunningGateway, engine: Engine, route: str) -> None:
    """The gateway streams from the worker even for "stream": false and builds the object itself: it must say
    what the worker would have said (greedy decoding, so both runs produce the same tokens)."""
    common = {"model": "tiny-llama", "max_tokens": 12, "seed": 1234, "n": 2, "logprobs": True, "stream": False}
    if route == "chat":
        path, body = "/v1/chat/completions", {**common, "messages": HELLO, "top_logprobs": 2}
    else:
        path, body = "/v1/completions", {**common, "prompt": "Hello world", "logprobs": 2}
    ours = httpx.post(gw.url + path, json=body, timeout=60).json()
    theirs = httpx.post(engine.url + path, json=body, headers=engine.headers, timeout=60).json()
    assert ours["object"] == theirs["object"] and ours["model"] == theirs["model"]
    assert ours["usage"] == {k: v for k, v in theirs["usage"].items() if k in ours["usage"]}
    assert len(ours["choices"]) == len(theirs["choices"]) == 2
    for a, b in zip(ours["choices"], theirs["choices"], strict=True):
        assert a["index"] == b["index"] and a["finish_reason"] == b["finish_reason"]
        if route == "chat":
            assert a["message"]["role"] == b["message"]["role"]
            assert a["message"]["content"] == b["message"]["content"]
            assert [t["token"] for t in a["logprobs"]["content"]] == [t["token"] for t in b["logprobs"]["content"]]
            assert [t["logprob"] for t in a["logprobs"]["content"]] == pytest.approx(
                [t["logprob"] for t in b["logprobs"]["content"]], abs=1e-4)
        else:
            assert a["text"] == b["text"]
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
            assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]

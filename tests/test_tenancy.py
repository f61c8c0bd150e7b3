"""Keys, per-key rules and limits, and admission control, through a running gateway in front of fake workers
(limits shared through a real redis-server where replicas are involved)."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import yaml

from app.auth import hash_key
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import free_port, metric_sum, open_request, redis_server, run_gateway, scrape, wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
KEYS = {
    "alice": "tg-alice-secret-key-0123456789",
    "bob": "tg-bob-secret-key-0123456789",
    "fr-only": "tg-fr-only-secret-key-0123",
    "other-model": "tg-other-model-secret-key",
    "small": "tg-small-caps-secret-key-01",
    "slow-rpm": "tg-rpm-limited-secret-key-1",
    "tpm": "tg-tpm-limited-secret-key-1",
    "one-at-a-time": "tg-concurrency-secret-key",
    "gone": "tg-disabled-secret-key-0001",
}


def _entries() -> list[dict[str, Any]]:
    rules: dict[str, dict[str, Any]] = {
        "fr-only": {"regions": ["fr"]},
        "other-model": {"models": ["not-tiny"]},
        "small": {"caps": {"max_tokens_cap": 4, "context_cap": 64}},
        "slow-rpm": {"rpm": 2},
        "tpm": {"tpm": 400},
        "one-at-a-time": {"max_concurrent": 1},
        "gone": {"disabled": True},
    }
    return [{"name": n, "hash": hash_key(k), **rules.get(n, {})} for n, k in KEYS.items()]


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": _entries()}))
    return path


@pytest.fixture
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker(record=True) as w:
        yield w


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def gateway(workers: list[str], keys_file: Path, **overrides: Any) -> Any:
    settings = {"discovery_interval": 60.0, "keys_file": keys_file, **overrides}
    return run_gateway(Settings(upstream=workers, **settings), ready_timeout=20)


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


def post(gw: Any, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(gw.base + "/chat/completions", json=body, headers=headers, timeout=10)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "bearer", "Bearer tg-wrong", "Basic " + KEYS["alice"], KEYS["alice"],
    "Bearer " + KEYS["alice"][:-1], "Bearer " + KEYS["alice"] + "x",
])
def test_anything_but_a_configured_bearer_key_is_401(worker: ThreadedFakeWorker, keys_file: Path,
                                                     header: str | None) -> None:
    headers = {} if header is None else {"authorization": header}
    with gateway([worker.url], keys_file) as gw:
        before = worker.stats.requests
        err = assert_error(post(gw, CHAT, headers), 401)
        assert err["type"] == "invalid_request_error" and err["code"] in ("invalid_api_key", None)
        assert_error(httpx.get(gw.base + "/models", headers=headers), 401)
        assert worker.stats.requests == before  # nothing reached a worker
        assert post(gw, CHAT, auth("alice")).status_code == 200


def test_a_disabled_key_is_401_and_says_so(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        err = assert_error(post(gw, CHAT, auth("gone")), 401, "api_key_disabled")
        assert "disabled" in err["message"]


def test_two_authorization_headers_are_refused(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        sock = open_request(gw.url, "/v1/chat/completions", CHAT,
                            {"authorization": f"Bearer {KEYS['alice']}", "Authorization": "Bearer tg-wrong"})
        head = sock.recv(65536).split(b"\r\n", 1)[0]
        sock.close()
        assert b" 400 " in head


def test_the_client_key_is_never_forwarded_workers_get_the_internal_key(worker: ThreadedFakeWorker,
                                                                        keys_file: Path) -> None:
    with gateway([worker.url], keys_file, upstream_api_key="internal-worker-key") as gw:
        for body in (CHAT, {**CHAT, "stream": False}):
            assert post(gw, body, {**auth("alice"), "x-api-key": "leak?", "proxy-authorization": "x"}
                        ).status_code == 200
            sent = worker.received[-1]
            assert sent.headers.get("authorization") == "Bearer internal-worker-key"
            assert KEYS["alice"] not in repr(sent.headers) and KEYS["alice"].encode() not in sent.body
            assert "x-api-key" not in sent.headers and "proxy-authorization" not in sent.headers


def test_allowed_models_and_regions(keys_file: Path) -> None:
    with ThreadedFakeWorker() as fr, ThreadedFakeWorker() as uae:
        with gateway([f"fr={fr.url}", f"uae={uae.url}"], keys_file, region="fr") as gw:
            assert post(gw, CHAT, auth("fr-only")).status_code == 200
            err = assert_error(post(gw, CHAT, {**auth("fr-only"), "x-tokengate-region": "uae"}), 403)
            assert "uae" in err["message"]
            assert post(gw, CHAT, {**auth("alice"), "x-tokengate-region": "uae"}).status_code == 200
            err = assert_error(post(gw, CHAT, auth("other-model")), 403)
            assert err["param"] == "model"
            # /v1/models lists only what the key may use
            ids = [m["id"] for m in httpx.get(gw.base + "/models", headers=auth("other-model")).json()["data"]]
            assert ids == []
            doc = httpx.get(gw.base + "/models", headers=auth("fr-only")).json()
            assert [m["regions"] for m in doc["data"]] == [["fr"]]
            assert httpx.get(gw.base + "/models", headers=auth("alice")).json()["data"][0]["regions"] == ["fr", "uae"]
            # naming a region the key may not use lists nothing, as a generation request naming it is refused
            r = httpx.get(gw.base + "/models", headers={**auth("fr-only"), "x-tokengate-region": "uae"})
            assert r.status_code == 200 and r.json()["data"] == []
            # one model's card (the SDK's models.retrieve): the same rules
            card = httpx.get(gw.base + "/models/tiny", headers=auth("fr-only")).json()
            assert card["id"] == "tiny" and card["regions"] == ["fr"] and card["object"] == "model"
            assert_error(httpx.get(gw.base + "/models/tiny", headers=auth("other-model")), 404, "model_not_found")
            assert_error(httpx.get(gw.base + "/models/nope", headers=auth("alice")), 404, "model_not_found")


def test_tokenize_is_the_workers_count_under_the_same_key_rules(keys_file: Path) -> None:
    """POST /tokenize passes the worker's own answer through, with the key's context cap as max_model_len, to keys
    that may use the model and region only."""
    with ThreadedFakeWorker(record=True) as fr, ThreadedFakeWorker(record=True) as uae:
        with gateway([f"fr={fr.url}", f"uae={uae.url}"], keys_file, region="fr") as gw:
            body = {"model": "tiny", "messages": CHAT["messages"], "add_generation_prompt": True}
            direct = httpx.post(fr.url + "/tokenize", json=body, timeout=10).json()

            def tokenize(headers: dict[str, str], payload: Any = body) -> httpx.Response:
                return httpx.post(gw.url + "/tokenize", json=payload, headers=headers, timeout=10)

            r = tokenize(auth("alice"))
            assert r.status_code == 200 and r.json() == direct
            assert fr.received[-1].path == "/tokenize" and fr.received[-1].json() == body  # type: ignore[index]
            assert not [q for q in uae.received or () if q.path == "/tokenize"]
            r = tokenize({**auth("alice"), "x-tokengate-region": "uae"})
            assert r.status_code == 200 and uae.received[-1].path == "/tokenize"  # type: ignore[index]
            small = tokenize(auth("small")).json()
            assert small["count"] == direct["count"] and small["max_model_len"] == 64
            assert_error(tokenize({}), 401)
            assert_error(tokenize(auth("other-model")), 403)
            assert_error(tokenize({**auth("fr-only"), "x-tokengate-region": "uae"}), 403, "region_not_allowed")
            assert_error(tokenize(auth("alice"), {**body, "model": "nope"}), 404, "model_not_found")
            assert_error(tokenize(auth("alice"), {"prompt": "x"}), 400)
            bad = httpx.post(gw.url + "/tokenize", content=b"{", headers=auth("alice"), timeout=10)
            assert_error(bad, 400, "invalid_json")
            # the request policy of a generation: no remote media for the worker to fetch, no template hooks,
            # no unknown fields
            sent = len(fr.received or ())
            image = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}]
            assert_error(tokenize(auth("alice"), {**body, "messages": image}), 400, "remote_media_not_allowed")
            assert_error(tokenize(auth("alice"), {**body, "chat_template_kwargs": {"x": 1}}), 400,
                         "parameter_not_allowed")
            assert_error(tokenize(auth("alice"), {**body, "temprature": 1}), 400, "unknown_parameter")
            assert len(fr.received or ()) == sent  # none of them reached a worker
            assert tokenize(auth("alice"), {"model": "tiny", "prompt": "x", "return_token_strs": True}).is_success
            # the key's request limit counts it (2 a minute)
            assert [tokenize(auth("slow-rpm")).status_code for _ in range(3)] == [200, 200, 429]
            # a worker's refusal, rendered as the gateway renders any: its status, OpenAI-shaped
            fr.options.tokenize = False
            assert_error(tokenize(auth("alice")), 404)


def test_key_caps_apply_below_the_gateway_caps(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file, max_tokens_cap=100) as gw:
        r = post(gw, {**CHAT, "max_tokens": 50}, auth("small"))
        assert r.status_code == 200 and r.headers["x-tokengate-max-tokens-clamped"] == "50"
        assert worker.received[-1].json()["max_tokens"] == 4  # type: ignore[index]
        r = post(gw, {**CHAT, "max_tokens": 50}, auth("alice"))
        assert r.status_code == 200 and worker.received[-1].json()["max_tokens"] == 50  # type: ignore[index]
        long = {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}
        assert_error(post(gw, long, auth("small")), 400, "context_length_exceeded")
        assert post(gw, long, auth("alice")).status_code == 200
        model = httpx.get(gw.base + "/models", headers=auth("small")).json()["data"][0]
        assert model["max_model_len"] == 64


def test_requests_per_minute_429_with_retry_after(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        first = post(gw, CHAT, auth("slow-rpm"))
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert post(gw, CHAT, auth("slow-rpm")).status_code == 200
        before = worker.stats.requests
        r = post(gw, CHAT, auth("slow-rpm"))
        assert_error(r, 429)
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert worker.stats.requests == before
        assert post(gw, CHAT, auth("alice")).status_code == 200  # other keys unaffected


def _remaining_tokens(r: httpx.Response) -> int:
    return int(r.headers["x-ratelimit-remaining-tokens"])


def test_tokens_per_minute_reserve_the_estimate_then_settle_the_real_usage(worker: ThreadedFakeWorker,
                                                                          keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        worker.options.tokens = 3  # the worker stops early: far below max_tokens
        body = {**CHAT, "max_tokens": 100, "stream": False}
        r1 = post(gw, body, auth("tpm"))
        usage = r1.json()["usage"]
        reserved = 400 - _remaining_tokens(r1)
        assert reserved == usage["prompt_tokens"] + 100  # prompt (counted) + max_tokens
        r2 = post(gw, body, auth("tpm"))
        # the first one was settled at its real cost, not at its reservation
        assert _remaining_tokens(r2) == 400 - usage["total_tokens"] - reserved
        big = post(gw, {**body, "max_tokens": 390}, auth("tpm"))
        assert_error(big, 429)
        assert "retry-after" in big.headers
        too_large = post(gw, {**body, "max_tokens": 1000, "n": 1}, {**auth("tpm")})
        assert_error(too_large, 429, "request_too_large")


def test_the_openai_sdk_does_not_retry_a_request_too_large_for_the_token_budget(worker: ThreadedFakeWorker,
                                                                              keys_file: Path) -> None:
    """No wait lets such a request through, so the SDK's own retries (two by default, each after Retry-After) must not
    happen; a request that fits gets OpenAI's three headers per unit."""
    import openai

    with gateway([worker.url], keys_file) as gw:
        client = openai.OpenAI(base_url=gw.base, api_key=KEYS["tpm"], max_retries=2)
        messages: Any = CHAT["messages"]
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1000, stream=False)
        assert info.value.code == "request_too_large"
        assert info.value.response.headers["x-should-retry"] == "false"
        refused = metric_sum(scrape(gw.url + "/metrics"), "tokengate_requests_total", status="429")
        assert refused == 1  # one request reached the gateway, not three
        r = post(gw, {**CHAT, "max_tokens": 100, "stream": False}, auth("tpm"))
        reserved = 400 - _remaining_tokens(r)
        seconds = reserved * 60 / 400  # the bucket refills 400 tokens a minute
        assert r.headers["x-ratelimit-reset-tokens"] == f"{math.ceil(seconds)}s"


def test_with_a_local_tokenizer_a_token_budget_is_charged_the_exact_count(keys_file: Path,
                                                                          tmp_path: Path) -> None:
    """A prompt the byte bound lets through the context uncounted is counted for a key with a token budget: the bound
    (twice the tokens here) refused a prompt that fits as "request_too_large"."""
    from app.tinymodel import build_tiny_model
    from app.tokenizer import LocalTokenizer

    root = build_tiny_model(tmp_path / "tiny")
    messages = [{"role": "user", "content": "a" + " a" * 249}]  # " a": one token of the tiny vocabulary
    tok = LocalTokenizer(root)
    exact = tok.count(tok.render_chat(messages), add_special_tokens=False)
    bound = tok.upper_bound(tok.render_chat(messages), add_special_tokens=False)
    assert bound is not None and exact + 2 <= 400 < bound + 2  # fits the budget; its byte bound does not
    with ThreadedFakeWorker() as w, gateway([w.url], keys_file, tokenizers=[f"tiny={root}"]) as gw:
        r = post(gw, {**CHAT, "messages": messages, "max_tokens": 2, "stream": False}, auth("tpm"))
        assert r.status_code == 200, r.text
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == 400 - (exact + 2)


def test_n_times_max_tokens_counts_against_the_limit(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        r = post(gw, {**CHAT, "max_tokens": 50, "n": 2, "stream": False}, auth("tpm"))
        prompt = r.json()["usage"]["prompt_tokens"]
        assert 400 - _remaining_tokens(r) == prompt + 2 * 50
        assert_error(post(gw, {**CHAT, "max_tokens": 150, "n": 3}, auth("tpm")), 429, "request_too_large")


def test_each_prompt_of_a_completions_batch_counts_against_the_limit(worker: ThreadedFakeWorker,
                                                                     keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        body = {"model": "tiny", "prompt": [[1, 2]] * 3, "max_tokens": 50, "stream": False}
        r = httpx.post(gw.base + "/completions", json=body, headers=auth("tpm"), timeout=10)
        assert r.status_code == 200, r.text
        assert 400 - _remaining_tokens(r) == 3 * (2 + 50)  # (one prompt of them reserved 52)
        four = {**body, "prompt": [[1, 2]] * 4, "n": 2}  # 4 x (2 + 2 x 50) = 408 > 400
        r = httpx.post(gw.base + "/completions", json=four, headers=auth("tpm"), timeout=10)
        assert_error(r, 429, "request_too_large")


def test_a_completions_batch_reserves_each_prompts_own_count(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    """Not the longest prompt times the prompts: 3 x (300 + 10) = 930 was "too large" for a tpm of 400 (never
    retried), for a batch that costs 334."""
    with gateway([worker.url], keys_file) as gw:
        body = {"model": "tiny", "prompt": [[7] * 300, [1, 2], [1, 2]], "max_tokens": 10, "stream": False}
        r = httpx.post(gw.base + "/completions", json=body, headers=auth("tpm"), timeout=10)
        assert r.status_code == 200, r.text
        assert 400 - _remaining_tokens(r) == 300 + 2 + 2 + 3 * 10


def test_tokens_streamed_before_a_disconnect_are_charged(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        worker.options.token_delay = 0.05
        t0 = time.monotonic()
        sock = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 200}, auth("tpm"))
        data = b""
        while data.count(b'"content"') < 5:
            data += sock.recv(65536)
        head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
        reserved = 400 - int(head.split("x-ratelimit-remaining-tokens: ")[1].split("\r\n")[0])
        sock.close()
        assert worker.wait_for(lambda s: s.aborted == 1, 5)
        worker.options.token_delay = 0.0
        streamed = worker.stats.generation_tokens
        assert 5 <= streamed < 200
        prompt = reserved - 200
        # settling follows the abort; the probe reserves prompt + 10 of its own
        time.sleep(0.3)
        r = post(gw, {**CHAT, "max_tokens": 10}, auth("tpm"))
        refill = (time.monotonic() - t0) * 400 / 60 + 1  # the bucket refills 400 tokens a minute meanwhile
        charged = 400 - _remaining_tokens(r) - (prompt + 10)
        # not charged the reservation of 200 completion tokens: only what was streamed
        assert prompt + 4 - refill <= charged <= prompt + streamed + 1


def test_max_concurrent_requests_per_key(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file) as gw:
        worker.options.token_delay = 0.05
        sock = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 100}, auth("one-at-a-time"))
        assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        r = post(gw, CHAT, auth("one-at-a-time"))
        assert_error(r, 429, "concurrency_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        sock.close()
        assert worker.wait_for(lambda s: s.in_flight == 0, 5)
        worker.options.token_delay = 0.0
        wait_until(lambda: post(gw, CHAT, auth("one-at-a-time")).status_code == 200, 5, "the slot to be freed")


def test_limits_hold_across_two_gateway_replicas_through_redis(worker: ThreadedFakeWorker, keys_file: Path,
                                                               redis_url: str) -> None:
    with gateway([worker.url], keys_file, redis_url=redis_url) as a, \
            gateway([worker.url], keys_file, redis_url=redis_url) as b:
        assert post(a, CHAT, auth("slow-rpm")).status_code == 200
        assert post(b, CHAT, auth("slow-rpm")).status_code == 200
        assert_error(post(a, CHAT, auth("slow-rpm")), 429)
        assert_error(post(b, CHAT, auth("slow-rpm")), 429)
        # concurrency: a stream held open on replica a blocks the key on replica b
        with held_stream(worker, a, auth("one-at-a-time")):
            assert_error(post(b, CHAT, auth("one-at-a-time")), 429, "concurrency_limit_exceeded")
        wait_until(lambda: post(b, CHAT, auth("one-at-a-time")).status_code == 200, 5, "slot freed on b")


def test_redis_fail_open_admits_without_the_limits_while_redis_is_gone(worker: ThreadedFakeWorker, keys_file: Path,
                                                                      redis_url: str) -> None:
    with gateway([worker.url], keys_file, redis_url=redis_url, redis_fail_open=True) as open_gw, \
            gateway([worker.url], keys_file, redis_url=redis_url) as closed_gw:
        assert post(open_gw, CHAT, auth("slow-rpm")).status_code == 200
        assert post(open_gw, CHAT, auth("slow-rpm")).status_code == 200
        assert_error(post(open_gw, CHAT, auth("slow-rpm")), 429)  # metered while Redis answers
        with redis.Redis.from_url(redis_url) as admin:
            admin.shutdown(nosave=True)
        for _ in range(3):
            assert post(open_gw, CHAT, auth("slow-rpm")).status_code == 200
        assert_error(post(closed_gw, CHAT, auth("slow-rpm")), 503, "rate_limiter_unavailable")


def test_redis_fail_open_starts_a_gateway_whose_redis_is_down(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                 redis_fail_open=True) as gw:
        for _ in range(3):
            assert post(gw, CHAT, auth("slow-rpm")).status_code == 200


def test_memory_limits_are_per_replica_without_redis(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    """The single-replica default: the same key on two replicas without Redis gets twice the budget (this is
    why the README says to configure --redis with more than one replica)."""
    with gateway([worker.url], keys_file) as a, gateway([worker.url], keys_file) as b:
        for gw in (a, b, a, b):
            assert post(gw, CHAT, auth("slow-rpm")).status_code == 200
        assert_error(post(a, CHAT, auth("slow-rpm")), 429)


@contextlib.contextmanager
def held_stream(worker: ThreadedFakeWorker, gw: Any, headers: dict[str, str]) -> Iterator[None]:
    """One slow stream in flight through ``gw`` for the block; the worker is fast again after it."""
    worker.options.token_delay = 0.05
    sock = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 200}, headers)
    try:
        assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        yield
    finally:
        sock.close()
        assert worker.wait_for(lambda s: s.in_flight == 0, 5)
        worker.options.token_delay = 0.0


def _hold(gw: Any, n: int) -> list[socket.socket]:
    return [open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 200}) for _ in range(n)]


def test_admission_queue_full_is_429_at_once_and_a_long_wait_is_503(worker: ThreadedFakeWorker) -> None:
    settings = {"discovery_interval": 60.0, "worker_concurrency": 1, "queue_size": 1, "queue_timeout": 1.0}
    with run_gateway(Settings(upstream=[worker.url], **settings), ready_timeout=20) as gw:
        worker.options.token_delay = 0.05
        held = _hold(gw, 1)
        assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        results: dict[str, Any] = {}

        def queued() -> None:
            t0 = time.monotonic()
            results["queued"] = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
            results["queued_s"] = time.monotonic() - t0

        t = threading.Thread(target=queued)
        t.start()
        wait_until(lambda: "tokengate_queue" in httpx.get(gw.url + "/metrics").text
                   and gw.state.proxy.gates.queued("tiny", gw.state.proxy.default_region) == 1,
                   5, "one request queued")
        t0 = time.monotonic()
        full = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert time.monotonic() - t0 < 0.5  # at once, not after the queue timeout
        assert_error(full, 429)
        assert int(full.headers["retry-after"]) >= 1
        t.join(10)
        assert_error(results["queued"], 503)
        assert "retry-after" in results["queued"].headers
        assert 0.9 <= results["queued_s"] < 3  # the queue timeout, not a hang
        assert worker.stats.requests == 2  # the readiness probe and the held stream: neither refusal was sent
        for s in held:
            s.close()
        assert worker.wait_for(lambda s: s.in_flight == 0, 5)
        worker.options.token_delay = 0.0
        ok = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert ok.status_code == 200
        text = httpx.get(gw.url + "/metrics").text
        samples = scrape(gw.url + "/metrics")
        for reason in ("queue_full", "queue_timeout"):
            assert metric_sum(samples, "tokengate_admission_rejections_total", reason=reason) == 1
        assert "tokengate_queue_time_seconds_count" in text
        assert orjson.loads(ok.text.split("data: ")[1].split("\n")[0])["model"] == "tiny"


def test_a_request_the_admission_queue_refuses_does_not_use_up_the_keys_rpm(worker: ThreadedFakeWorker,
                                                                             keys_file: Path) -> None:
    with gateway([worker.url], keys_file, worker_concurrency=1, queue_size=0) as gw:
        with held_stream(worker, gw, auth("alice")):
            full = post(gw, CHAT, auth("slow-rpm"))
            assert_error(full, 429, "queue_full")
            assert "x-ratelimit-remaining-requests" not in full.headers  # (the key's count before its refund)
        first = post(gw, CHAT, auth("slow-rpm"))  # the key's rpm is 2: both still there
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "1"
        assert post(gw, CHAT, auth("slow-rpm")).status_code == 200


def test_a_request_given_up_while_queued_is_charged_nothing(worker: ThreadedFakeWorker, keys_file: Path) -> None:
    with gateway([worker.url], keys_file, worker_concurrency=1, queue_size=4, queue_timeout=30.0) as gw:
        with held_stream(worker, gw, auth("alice")):
            # most of the key's 400 tokens a minute: charged, its prompt would take most of a minute to refill
            long = {**CHAT, "messages": [{"role": "user", "content": "word " * 280}], "max_tokens": 10}
            queued = open_request(gw.url, "/v1/chat/completions", long, auth("tpm"))
            proxy = gw.state.proxy
            wait_until(lambda: proxy.gates.queued("tiny", proxy.default_region) == 1, 5, "queued")
            queued.close()  # the client gives up before any worker saw it
            wait_until(lambda: proxy.gates.queued("tiny", proxy.default_region) == 0, 5, "left the queue")
        r = post(gw, {**CHAT, "stream": False}, auth("tpm"))
        assert r.status_code == 200
        assert _remaining_tokens(r) == 400 - (r.json()["usage"]["prompt_tokens"] + CHAT["max_tokens"])


def test_a_request_no_worker_could_be_reached_for_costs_the_key_nothing(keys_file: Path, tmp_path: Path) -> None:
    """Counted on the gateway (so the key is charged before dispatch), then every worker refuses the connection:
    502, and the key keeps its place in the rpm window (the SDK's two retries had used up three of them)."""
    from app.limits import MemoryLimiter
    from app.tinymodel import build_tiny_model

    root = build_tiny_model(tmp_path / "tiny")
    worker = ThreadedFakeWorker()
    worker.__enter__()
    with gateway([worker.url], keys_file, tokenizers=[f"tiny={root}"]) as gw:
        worker.__exit__(None, None, None)  # gone, while the gateway still counts it ready
        r = post(gw, CHAT, auth("slow-rpm"))
        assert_error(r, 502, "worker_unreachable")
        assert "x-ratelimit-remaining-requests" not in r.headers  # (the count from before it was given back)
        limiter = gw.state.proxy.limiter
        assert isinstance(limiter, MemoryLimiter)
        # (given back as the request ends, which is just after its answer was written: the test's thread may look
        # in between)
        wait_until(lambda: len(limiter._keys["slow-rpm"].requests) == 0, 2, "the key's place given back")


def test_a_queued_request_proceeds_when_a_slot_frees(worker: ThreadedFakeWorker) -> None:
    settings = {"discovery_interval": 60.0, "worker_concurrency": 1, "queue_size": 4, "queue_timeout": 10.0}
    with run_gateway(Settings(upstream=[worker.url], **settings), ready_timeout=20) as gw:
        worker.options.token_delay = 0.02
        held = _hold(gw, 1)
        assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        out: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "r", httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=20)))
        t.start()
        time.sleep(0.3)
        assert "r" not in out and worker.stats.in_flight == 1  # waiting in the gateway, not at the worker
        held[0].close()
        t.join(15)
        assert out["r"].status_code == 200 and out["r"].text.rstrip().endswith("data: [DONE]")

"""Calls from web pages (--cors-origin): the preflight, and the headers on every kind of answer — streamed through
the relay's own writes, JSON, errors, FastAPI routes — once each, and none for an origin not allowed."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from app.cors import Cors
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import run_gateway

PAGE = "https://app.example.com"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def test_allowed_origins_by_name_or_any() -> None:
    named = Cors([PAGE, "http://localhost:3000/"])
    allowed = named.headers(b"HTTPS://APP.example.com")
    assert allowed is not None and (b"access-control-allow-origin", b"HTTPS://APP.example.com") in allowed
    assert (b"vary", b"origin") in allowed
    assert named.headers(b"http://localhost:3000") is not None and named.headers(b"https://evil.example") is None
    assert dict(Cors(["*"]).headers(b"https://any.example") or [])[b"access-control-allow-origin"] == b"*"
    pre = dict(named.preflight(PAGE.encode(), b"authorization, content-type, x-tokengate-region") or [])
    assert pre[b"access-control-allow-headers"] == b"authorization, content-type, x-tokengate-region"
    assert b"POST" in pre[b"access-control-allow-methods"] and named.preflight(b"https://evil.example", None) is None


@pytest.mark.parametrize("cors", [[], [PAGE]])
def test_a_page_not_allowed_cannot_make_the_gateway_generate(cors: list[str]) -> None:
    """A page may POST a body without a type cross-origin with no preflight (fetch of a Blob, mode no-cors): the
    browser keeps the answer from it, but the gateway would have generated. One that declares JSON is asked about
    first (and the preflight refused), so that one passes: the gateway's own /docs page and proxies that forward
    a page's Origin send it."""
    with ThreadedFakeWorker(record=True) as w, \
            run_gateway(Settings(upstream=[w.url], cors_origins=cors), ready_timeout=20) as gw:
        def generated() -> int:
            return len([q for q in w.received or () if q.path in ("/v1/chat/completions", "/tokenize")])

        before = generated()
        for path in ("/v1/chat/completions", "/tokenize"):
            r = httpx.post(gw.url + path, content=orjson.dumps(CHAT), headers={"origin": "https://evil.example"})
            assert r.status_code == 415, r.text
            err = r.json()["error"]
            assert err["code"] == "unsupported_media_type" and "https://evil.example" in err["message"], err
            assert not _cors(r)
        assert generated() == before
        declared = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False},
                              headers={"origin": gw.url})  # (what /docs sends: its own origin, JSON)
        assert declared.status_code == 200 and not _cors(declared), declared.text
        if cors:  # an allowed page may leave the type out
            r = httpx.post(gw.base + "/chat/completions", content=orjson.dumps({**CHAT, "stream": False}),
                           headers={"origin": PAGE})
            assert r.status_code == 200 and _cors(r) == [PAGE], r.text


@pytest.fixture(scope="module")
def gw() -> Iterator[object]:
    with ThreadedFakeWorker() as w, run_gateway(Settings(upstream=[w.url], cors_origins=[PAGE]),
                                                ready_timeout=20) as gateway:
        yield gateway


def _cors(r: httpx.Response) -> list[str]:
    return r.headers.get_list("access-control-allow-origin")


def test_the_preflight_is_answered_for_an_allowed_page_only(gw: object) -> None:
    base = gw.base  # type: ignore[attr-defined]
    ask = {"origin": PAGE, "access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type"}
    r = httpx.options(base + "/chat/completions", headers=ask)
    assert r.status_code == 204 and _cors(r) == [PAGE]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    refused = httpx.options(base + "/chat/completions", headers={**ask, "origin": "https://evil.example"})
    assert refused.status_code != 204 and not _cors(refused)


def test_every_kind_of_answer_carries_the_headers_once(gw: object) -> None:
    base, url = gw.base, gw.url  # type: ignore[attr-defined]
    page = {"origin": PAGE}
    with httpx.stream("POST", base + "/chat/completions", json=CHAT, headers=page) as streamed:
        body = b"".join(streamed.iter_bytes())
        assert streamed.status_code == 200 and _cors(streamed) == [PAGE] and body.endswith(b"data: [DONE]\n\n")
        assert "x-request-id" in streamed.headers["access-control-expose-headers"]
    answers = [
        httpx.post(base + "/chat/completions", json={**CHAT, "stream": False}, headers=page),
        httpx.post(base + "/chat/completions", content=b"{not json", headers=page),  # an error
        httpx.get(base + "/models", headers=page),  # FastAPI
        httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "hi"}, headers=page),
        httpx.get(url + "/healthz", headers=page),
    ]
    assert [r.status_code for r in answers] == [200, 400, 200, 200, 200]
    assert all(_cors(r) == [PAGE] for r in answers), [r.headers for r in answers]
    other = httpx.post(base + "/chat/completions", json={**CHAT, "stream": False},
                       headers={"origin": "https://evil.example"})
    assert other.status_code == 200 and not _cors(other)  # (the browser keeps the answer from that page)


def test_without_cors_origins_no_answer_says_anything() -> None:
    with ThreadedFakeWorker() as w, run_gateway(Settings(upstream=[w.url]), ready_timeout=20) as gw:
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, headers={"origin": PAGE})
        assert r.status_code == 200 and not _cors(r)
        pre = httpx.options(gw.base + "/chat/completions",
                            headers={"origin": PAGE, "access-control-request-method": "POST"})
        assert pre.status_code == 405

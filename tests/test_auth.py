from __future__ import annotations

import pickle
import statistics
import time
from pathlib import Path

import orjson
import pytest

from app.auth import (
    OPEN,
    PRIORITIES,
    KeyCaps,
    KeyEntry,
    KeysError,
    KeyStore,
    Principal,
    check_access,
    generate_key,
    hash_key,
    load_keys,
)
from app.caps import Caps
from app.errors import AuthenticationFailed, PermissionDenied, render
from app.limits import UNLIMITED, Limits


def _store(*keys: tuple[str, str], **fields: object) -> KeyStore:
    return KeyStore([KeyEntry.model_validate({"name": name, "hash": hash_key(key), **fields}) for name, key in keys])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def test_generated_keys_are_prefixed_random_and_hash_to_sha256() -> None:
    a, b = generate_key(), generate_key()
    assert a.startswith("tg-") and b.startswith("tg-") and a != b
    assert len(a) >= 40
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_bearer_key_authenticates_to_its_principal() -> None:
    key = generate_key()
    store = _store(("alice", key), ("bob", generate_key()))
    assert store.authenticate(f"Bearer {key}".encode()).name == "alice"
    assert store.authenticate(f"bearer   {key}  ").name == "alice"  # scheme is case-insensitive (RFC 9110)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "You didn't provide an API key"),
        (b"", "You didn't provide an API key"),
        (b"   ", "You didn't provide an API key"),
        (b"Bearer", "You didn't provide an API key"),
        (b"Bearer    ", "You didn't provide an API key"),
        (b"Bearer tg-wrong", "Incorrect API key provided."),
        (b"Basic dXNlcjpwYXNz", "Unsupported authorization scheme"),
        (b"tg-just-the-key", "Unsupported authorization scheme"),
    ],
)
def test_missing_empty_wrong_or_wrong_scheme_is_401_openai_shaped(header: bytes | None, message: str) -> None:
    store = _store(("alice", generate_key()))
    with pytest.raises(AuthenticationFailed) as info:
        store.authenticate(header)
    status, headers, body = render(info.value)
    assert status == 401
    err = orjson.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
    assert err["message"].startswith(message)
    assert (b"www-authenticate", b'Bearer realm="tokengate"') in headers


def test_the_key_itself_under_another_scheme_is_refused() -> None:
    key = generate_key()
    store = _store(("alice", key))
    for header in (f"Basic {key}", f"Token {key}", key):
        with pytest.raises(AuthenticationFailed):
            store.authenticate(header)


def test_wrong_key_is_never_echoed() -> None:
    store = _store(("alice", generate_key()))
    with pytest.raises(AuthenticationFailed) as info:
        store.authenticate(b"Bearer tg-secret-guess-123")
    assert b"tg-secret-guess-123" not in render(info.value)[2]


def test_disabled_key_is_401() -> None:
    key = generate_key()
    store = _store(("alice", key), disabled=True)
    with pytest.raises(AuthenticationFailed) as info:
        store.authenticate(f"Bearer {key}")
    assert info.value.error_code == "api_key_disabled"


def test_open_mode_admits_everyone_unlimited() -> None:
    store = KeyStore.open()
    assert store.is_open
    for header in (None, b"", b"Bearer anything"):
        assert store.authenticate(header) is OPEN
    assert OPEN.limits == UNLIMITED and OPEN.limits.unlimited
    assert OPEN.regions is None and OPEN.models is None


def test_store_holds_only_digests_never_raw_keys() -> None:
    keys = [generate_key() for _ in range(5)]
    store = _store(*[(f"k{i}", k) for i, k in enumerate(keys)])
    assert all(isinstance(d, bytes) and len(d) == 32 for d in store.digests)
    dumped = pickle.dumps((store.digests, store.principals))
    assert store.__slots__ == ("_entries", "_open")
    for key in keys:
        assert key.encode() not in dumped
        assert key not in repr(store.principals)


def _median_ns(store: KeyStore, header: bytes, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        try:
            store.authenticate(header)
        except AuthenticationFailed:
            pass
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples)


def test_timing_does_not_depend_on_how_much_of_the_key_matched() -> None:
    key = generate_key()
    store = _store(("alice", key), *[(f"k{i}", generate_key()) for i in range(20)])
    near = f"Bearer {key[:-1]}{'A' if key[-1] != 'A' else 'B'}".encode()  # all but the last character
    far = b"Bearer " + b"x" * len(key)  # nothing in common, same length
    ratios = []
    for _ in range(5):  # interleaved batches, so machine noise hits both sides alike
        a, b = _median_ns(store, near, 400), _median_ns(store, far, 400)
        ratios.append(a / b)
    assert 0.5 < statistics.median(ratios) < 2.0, ratios


def test_load_keys_file_with_every_field(tmp_path: Path) -> None:
    key = generate_key()
    path = _write(
        tmp_path,
        f"""
keys:
  - name: alice
    hash: {hash_key(key)}
    regions: [fr, uae]
    models: [llama]
    caps: {{max_tokens_cap: 100, context_cap: 1000, default_max_tokens: 50}}
    rpm: 60
    tpm: 10000
    max_concurrent: 2
    priority: high
  - name: batch
    hash: {hash_key(generate_key())}
    priority: -3
""",
    )
    store = load_keys(path)
    alice = store.authenticate(f"Bearer {key}")
    assert alice == Principal(
        name="alice",
        regions=frozenset({"fr", "uae"}),
        models=frozenset({"llama"}),
        caps=KeyCaps(max_tokens_cap=100, context_cap=1000, default_max_tokens=50),
        limits=Limits(rpm=60, tpm=10000, max_concurrent=2),
        priority=PRIORITIES["high"],
    )
    batch = store.principals[1]
    assert batch.priority == -3 and batch.limits == UNLIMITED and batch.regions is None
    assert PRIORITIES["high"] > PRIORITIES["normal"] > PRIORITIES["low"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("keys:\n  - name: alice\n    hash: sha256:abc\n", "key alice: field hash:"),
        (f"keys:\n  - name: alice\n    hash: {hash_key('x')}\n    rmp: 5\n", "key alice: field rmp: unknown field"),
        (f"keys:\n  - name: alice\n    hash: {hash_key('x')}\n    rpm: 0\n", "key alice: field rpm:"),
        (
            f"keys:\n  - name: a\n    hash: {hash_key('x')}\n  - name: b\n    hash: {hash_key('y')}\n"
            "    caps: {max_token_cap: 5}\n",
            "key b: field caps.max_token_cap: unknown field",
        ),
        (f"keys:\n  - name: a\n    hash: {hash_key('x')}\n    priority: urgent\n", "key a: field priority"),
        (
            f"keys:\n  - name: a\n    hash: {hash_key('x')}\n  - name: a\n    hash: {hash_key('y')}\n",
            "key a: field name: this name is given to more than one key",
        ),
        (
            f"keys:\n  - name: a\n    hash: {hash_key('x')}\n  - name: b\n    hash: {hash_key('x')}\n",
            "key b: field hash: the same hash",
        ),
        (f"keys:\n  - hash: {hash_key('x')}\n", "key #1: field name: Field required"),
        ("- just a list\n", "the top level must be a mapping"),
        ("keys: [\n", "cannot read"),
        ("kees: []\n", "field kees: unknown field"),
    ],
)
def test_bad_keys_file_names_file_key_and_field(tmp_path: Path, body: str, expected: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(KeysError) as info:
        load_keys(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert expected in str(info.value)


def test_missing_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="cannot read"):
        load_keys(tmp_path / "nope.yaml")


def test_config_models_are_frozen() -> None:
    entry = KeyEntry(name="a", hash=hash_key("x"))
    with pytest.raises(ValueError):
        entry.rpm = 5  # type: ignore[misc]


def test_check_access_models_and_regions() -> None:
    p = Principal(name="alice", regions=frozenset({"fr"}), models=frozenset({"llama"}))
    check_access(p, "llama", "fr")
    check_access(OPEN, "anything", "anywhere")
    with pytest.raises(PermissionDenied) as info:
        check_access(p, "gpt", "fr")
    status, _, body = render(info.value)
    err = orjson.loads(body)["error"]
    assert status == 403 and err["type"] == "permission_error" and err["param"] == "model"
    assert "'alice'" in err["message"] and "'gpt'" in err["message"]
    with pytest.raises(PermissionDenied, match="region 'uae' .allowed: fr."):
        check_access(p, "llama", "uae")
    assert p.allows_region("fr") and not p.allows_region("uae")


def test_key_caps_never_exceed_the_gateway_caps() -> None:
    base = Caps.build(model_max_len=4096, context_cap=None, max_tokens_cap=1000, default_max_tokens=256, policy="clamp")
    assert KeyCaps().apply(base) is base
    tighter = KeyCaps(max_tokens_cap=100, context_cap=2048, default_max_tokens=500).apply(base)
    assert (tighter.max_tokens_cap, tighter.context_cap, tighter.default_max_tokens) == (100, 2048, 100)
    looser = KeyCaps(max_tokens_cap=5000, context_cap=100_000, default_max_tokens=800).apply(base)
    assert (looser.max_tokens_cap, looser.context_cap, looser.default_max_tokens) == (1000, 4096, 800)
    assert looser.model_max_len == 4096 and looser.policy == "clamp"

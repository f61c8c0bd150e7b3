"""API key → Principal: hashed keys, constant-time comparison, per-key access rules.

Keys are configured as hashes only (``tokengate keys create`` prints a new key once, with its hash). A request
presents ``Authorization: Bearer <key>``; the gateway hashes what it was given and compares that digest with every
configured digest using ``hmac.compare_digest`` — the raw key is never compared, so the time taken does not depend
on how much of a key matched. The keys file (YAML)::

    keys:
      - name: alice
        hash: sha256:5e88...          # tokengate keys create / tokengate keys hash
        regions: [fr, uae]            # allowed regions (absent: all)
        models: [llama-3-8b]          # allowed models (absent: all)
        caps: {max_tokens_cap: 1024, context_cap: 8192, default_max_tokens: 256}  # never above the gateway's
        rpm: 60                       # requests per minute
        tpm: 100000                   # tokens (prompt + completion) per minute
        max_concurrent: 4
        priority: high                # high | normal | low, or an int (higher is admitted first)
        disabled: false

``KeyStore.open()`` is open mode (no keys, for local use): every request is the unlimited ``OPEN`` principal.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .caps import Caps
from .errors import AuthenticationFailed, PermissionDenied
from .limits import UNLIMITED, Limits

KEY_PREFIX = "tg-"
HASH_PREFIX = "sha256:"
PRIORITIES: dict[str, int] = {"high": 10, "normal": 0, "low": -10}

KeyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
KeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
PriorityName = Literal["high", "normal", "low"]

_MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth "
    "(i.e. Authorization: Bearer YOUR_KEY)."
)
_WRONG = "Incorrect API key provided."
_DISABLED = "This API key has been disabled."


def generate_key() -> str:
    """A new random API key: ``tg-`` and 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The form a key is configured in: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeysError(ValueError):
    """A keys file that cannot be used; ``str()`` names the file, the key and the field."""

    def __init__(
        self, message: str, *, path: Path | None = None, key: str | None = None, field: str | None = None
    ) -> None:
        where = [str(path)] if path is not None else []
        if key is not None:
            where.append(f"key {key}")
        if field is not None:
            where.append(f"field {field}")
        super().__init__(": ".join([*where, message]))
        self.path, self.key, self.field, self.detail = path, key, field, message


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class KeyCaps(_Config):
    max_tokens_cap: int | None = Field(None, ge=1)
    context_cap: int | None = Field(None, ge=1)
    default_max_tokens: int | None = Field(None, ge=1)

    def apply(self, base: Caps) -> Caps:
        """The key's own caps within ``base`` (the gateway's/preset's): each cap is the smaller of the two; the
        key's default max_tokens replaces the gateway's but is lowered to the cap."""
        if self.max_tokens_cap is None and self.context_cap is None and self.default_max_tokens is None:
            return base
        ctx = base.context_cap if self.context_cap is None else min(base.context_cap, self.context_cap)
        cap = min(base.max_tokens_cap, ctx, self.max_tokens_cap or base.max_tokens_cap)
        default = min(self.default_max_tokens or base.default_max_tokens, cap)
        return Caps(
            max_tokens_cap=cap,
            default_max_tokens=default,
            context_cap=ctx,
            model_max_len=base.model_max_len,
            policy=base.policy,
            reject_above=min(base.reject_above, self.max_tokens_cap or base.reject_above),
        )


class KeyEntry(_Config):
    name: KeyName
    hash: KeyHash
    regions: list[str] | None = None
    models: list[str] | None = None
    caps: KeyCaps = KeyCaps()
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    priority: PriorityName | int = "normal"
    disabled: bool = False


class KeysFile(_Config):
    keys: list[KeyEntry]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and what they may do. ``None`` regions/models: all allowed."""

    name: str
    regions: frozenset[str] | None = None
    models: frozenset[str] | None = None
    caps: KeyCaps = KeyCaps()
    limits: Limits = UNLIMITED
    priority: int = 0

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def allows_region(self, region: str) -> bool:
        return self.regions is None or region in self.regions

    @classmethod
    def from_entry(cls, entry: KeyEntry) -> Principal:
        priority = entry.priority if isinstance(entry.priority, int) else PRIORITIES[entry.priority]
        return cls(
            name=entry.name,
            regions=None if entry.regions is None else frozenset(entry.regions),
            models=None if entry.models is None else frozenset(entry.models),
            caps=entry.caps,
            limits=Limits(rpm=entry.rpm, tpm=entry.tpm, max_concurrent=entry.max_concurrent),
            priority=priority,
        )


OPEN = Principal(name="open")


def check_access(principal: Principal, model: str, region: str) -> None:
    """Raise 403 when the key may not use ``model`` or ``region``."""
    if not principal.allows_model(model):
        raise PermissionDenied(f"API key '{principal.name}' is not allowed to use model '{model}'.", param="model")
    if not principal.allows_region(region):
        allowed = ", ".join(sorted(principal.regions or ()))
        raise PermissionDenied(
            f"API key '{principal.name}' is not allowed to use region '{region}' (allowed: {allowed}).",
            code="region_not_allowed",
        )


class KeyStore:
    """Authenticates ``Authorization`` header values against configured key digests.

    store = load_keys(Path("keys.yaml"))      # or KeyStore.open() for local use
    principal = store.authenticate(header)    # raises AuthenticationFailed (401)
    """

    __slots__ = ("_entries", "_open")

    def __init__(self, entries: Iterable[KeyEntry], *, open_mode: bool = False) -> None:
        # only digests and principals are kept: the raw keys were never here
        self._entries: tuple[tuple[bytes, Principal, bool], ...] = tuple(
            (bytes.fromhex(e.hash.removeprefix(HASH_PREFIX)), Principal.from_entry(e), e.disabled) for e in entries
        )
        self._open = open_mode

    @classmethod
    def open(cls) -> KeyStore:
        return cls((), open_mode=True)

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def digests(self) -> tuple[bytes, ...]:
        return tuple(d for d, _, _ in self._entries)

    @property
    def principals(self) -> tuple[Principal, ...]:
        return tuple(p for _, p, _ in self._entries)

    def authenticate(self, authorization: bytes | str | None) -> Principal:
        if self._open:
            return OPEN
        token = _bearer_token(authorization)
        digest = hashlib.sha256(token).digest()
        found: tuple[Principal, bool] | None = None
        for stored, principal, disabled in self._entries:  # every entry, no early exit
            if hmac.compare_digest(digest, stored):
                found = (principal, disabled)
        if found is None:
            raise AuthenticationFailed(_WRONG)
        principal, disabled = found
        if disabled:
            raise AuthenticationFailed(_DISABLED, code="api_key_disabled")
        return principal


def _bearer_token(authorization: bytes | str | None) -> bytes:
    if authorization is None:
        raise AuthenticationFailed(_MISSING)
    raw = authorization.encode("latin-1", "replace") if isinstance(authorization, str) else authorization
    parts = raw.strip().split(None, 1)
    if not parts:
        raise AuthenticationFailed(_MISSING)
    if parts[0].lower() != b"bearer":
        raise AuthenticationFailed("Unsupported authorization scheme: use 'Authorization: Bearer YOUR_KEY'.")
    token = parts[1].strip() if len(parts) == 2 else b""
    if not token:
        raise AuthenticationFailed(_MISSING)
    return token


def load_keys(path: Path) -> KeyStore:
    """Read a keys file; a problem raises ``KeysError`` naming the file, the key and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise KeysError(f"cannot read: {exc}", path=path) from None
    if not isinstance(raw, dict):
        raise KeysError("the top level must be a mapping with a 'keys:' list", path=path)
    try:
        parsed = KeysFile.model_validate(raw)
    except ValidationError as exc:
        _raise_from(exc, raw, path)
    names: set[str] = set()
    hashes: set[str] = set()
    for entry in parsed.keys:
        if entry.name in names:
            raise KeysError("this name is given to more than one key", path=path, key=entry.name, field="name")
        if entry.hash in hashes:
            raise KeysError("the same hash as an earlier key", path=path, key=entry.name, field="hash")
        names.add(entry.name)
        hashes.add(entry.hash)
    return KeyStore(parsed.keys)


def _raise_from(exc: ValidationError, raw: dict[Any, Any], path: Path) -> NoReturn:
    # an unknown field first: a typo also makes the field it misspells look missing
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = [str(part) for part in err["loc"]]
    key: str | None = None
    if loc[:1] == ["keys"] and len(loc) > 1 and loc[1].isdigit():
        key = _entry_name(raw.get("keys"), int(loc[1]))
        loc = loc[2:]
    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    raise KeysError(message, path=path, key=key, field=".".join(loc) or None) from None


def _entry_name(entries: object, index: int) -> str:
    if isinstance(entries, Sequence) and index < len(entries):
        entry = entries[index]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            return str(entry["name"])
    return f"#{index + 1}"

"""``tokengate keys``: create API keys and hash existing ones.

    tokengate keys create [--name NAME] [--rpm N] [--tpm N] [--max-concurrent N] [--regions fr,uae]
                          [--models m1,m2] [--priority high|normal|low|INT] [--max-tokens-cap N]
                          [--context-cap N] [--default-max-tokens N]
    tokengate keys hash                          (reads the key from stdin)

``create`` prints the new key once and a YAML entry (its hash, never the key) to append under ``keys:`` in the keys
file. Exit status: 0 done; 2 bad input (argparse exits 2 on usage errors too).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from .auth import PRIORITIES, KeyEntry, generate_key, hash_key

EXIT_BAD_INPUT = 2


def add_keys_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="create and hash API keys", description="Create API keys and hash keys.")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    c = keys.add_parser(
        "create",
        help="create a key; prints it once and its keys-file entry",
        description="Create a new API key. The key is printed once and never stored: the keys "
        "file holds only its hash.",
    )
    c.add_argument("--name", help="key name (default: key-<random>); shown in logs and errors")
    c.add_argument("--rpm", type=_positive, metavar="N", help="requests per minute")
    c.add_argument("--tpm", type=_positive, metavar="N", help="tokens (prompt + completion) per minute")
    c.add_argument("--max-concurrent", type=_positive, metavar="N", help="requests in flight at once")
    c.add_argument("--regions", type=_names, metavar="R1,R2", help="allowed regions (default: all)")
    c.add_argument("--models", type=_names, metavar="M1,M2", help="allowed models (default: all)")
    c.add_argument("--priority", type=_priority, help="high, normal, low or an integer (higher first)")
    c.add_argument("--max-tokens-cap", type=_positive, metavar="N", help="never above the gateway's cap")
    c.add_argument("--context-cap", type=_positive, metavar="N", help="never above the gateway's cap")
    c.add_argument("--default-max-tokens", type=_positive, metavar="N", help="max_tokens when a request gives none")
    c.set_defaults(func=cmd_keys_create)

    h = keys.add_parser(
        "hash",
        help="print the hash of a key read from stdin",
        description="Read a key from stdin (prompted without echo on a terminal) and print the "
        "hash to put in the keys file.",
    )
    h.set_defaults(func=cmd_keys_hash)


def cmd_keys_create(args: argparse.Namespace) -> int:
    key = generate_key()
    entry: dict[str, object] = {"name": args.name or f"key-{os.urandom(4).hex()}", "hash": hash_key(key)}
    for attr in ("regions", "models", "rpm", "tpm", "max_concurrent", "priority"):
        value = getattr(args, attr, None)
        if value is not None:
            entry[attr] = value
    caps = {
        a: getattr(args, a)
        for a in ("max_tokens_cap", "context_cap", "default_max_tokens")
        if getattr(args, a, None) is not None
    }
    if caps:
        entry["caps"] = caps
    try:
        KeyEntry.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        print(f"tokengate keys create: {field}: {err['msg']}", file=sys.stderr)
        return EXIT_BAD_INPUT
    body = yaml.safe_dump(entry, sort_keys=False, default_flow_style=False).splitlines()
    snippet = "keys:\n" + "".join(("  - " if i == 0 else "    ") + line + "\n" for i, line in enumerate(body))
    print(f"New API key '{entry['name']}'. Store it now: it is not stored anywhere and will not be shown again.\n")
    print(f"    {key}\n")
    print("For the keys file (it holds only the key's hash); with a `keys:` list already there, append the entry:\n")
    print(snippet, end="")
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        print("tokengate keys hash: no key on stdin", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(hash_key(key))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, comma separated")
    return names


def _priority(text: str) -> str | int:
    if text in PRIORITIES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use high, normal, low or an integer, not {text!r}") from None

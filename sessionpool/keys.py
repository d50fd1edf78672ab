"""`sessionpool new-key` and `sessionpool hash-key`: API keys for the `api_keys_file`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import yaml

from router.auth import EXECUTOR, KEY_NAME, ROLES, hash_key, new_key


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `new-key` and `hash-key` on the `sessionpool` command's subparsers."""
    sub.add_parser("hash-key", help="print the key_sha256 of a key read from stdin")
    new = sub.add_parser("new-key", help="make a key; print it (stderr) and its entry (stdout)")
    new.add_argument("name")
    new.add_argument(
        "--role", action="append", choices=sorted(ROLES), help="repeatable; default executor"
    )
    new.add_argument("--pool", action="append", help="repeatable; default every pool")


def key_entry(name: str, key: str, roles: list[str], pools: list[str] | None) -> dict[str, Any]:
    """The `api_keys_file` entry of `key` (only its hash goes to the file).

    Raises:
        ValueError: the name is not 1-128 of [A-Za-z0-9_.@-].
    """
    if not KEY_NAME.fullmatch(name):
        raise ValueError("new-key: the name must be 1-128 of [A-Za-z0-9_.@-]")
    entry: dict[str, Any] = {"name": name, "key_sha256": hash_key(key), "roles": roles}
    if pools:
        entry["pools"] = pools
    return entry


def run_new_key(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Make a key: the key itself on `err` (shown once), its file entry as YAML on `out`.

    Raises:
        ValueError: the name is not valid.
    """
    key = new_key()
    entry = key_entry(args.name, key, args.role or [EXECUTOR], args.pool)
    print(f"# the key (shown once, give it to the client): {key}", file=err or sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False), end="", file=out or sys.stdout)
    return 0


def run_hash_key(inp: TextIO | None = None, out: TextIO | None = None) -> int:
    """Print the `key_sha256` of the key on the first line of `inp`.

    Raises:
        ValueError: there is no key on that line.
    """
    key = (inp or sys.stdin).readline().strip()
    if not key:
        raise ValueError("hash-key: no key on stdin")
    print(hash_key(key), file=out or sys.stdout)
    return 0

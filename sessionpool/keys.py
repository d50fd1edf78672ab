"""`sessionpool new-key` and `sessionpool hash-key`: API keys for the `api_keys_file`."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import yaml

from router.auth import EXECUTOR, KEY_NAME, ROLES, hash_key, load_api_keys, new_key
from router.auth.keyfile import ALL_POOLS


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `new-key` and `hash-key` on the `sessionpool` command's subparsers."""
    sub.add_parser("hash-key", help="print the key_sha256 of a key read from stdin")
    new = sub.add_parser("new-key", help="make a key; print it (stderr) and its entry (stdout)")
    new.add_argument("name")
    new.add_argument(
        "--role", action="append", choices=sorted(ROLES), help="repeatable; default executor"
    )
    new.add_argument(
        "--pool", action="append", help='repeatable; default every pool (written as ["*"])'
    )
    new.add_argument(
        "--file",
        type=Path,
        help="add the entry to this api_keys_file (atomically: a router never reads half of it)",
    )


def key_entry(name: str, key: str, roles: list[str], pools: list[str] | None) -> dict[str, Any]:
    """The `api_keys_file` entry of `key` (only its hash goes to the file).

    Raises:
        ValueError: the name is not 1-128 of [A-Za-z0-9_.@-].
    """
    if not KEY_NAME.fullmatch(name):
        raise ValueError("new-key: the name must be 1-128 of [A-Za-z0-9_.@-]")
    return {
        "name": name,
        "key_sha256": hash_key(key),
        "roles": roles,
        "pools": pools or [ALL_POOLS],  # always explicit: a missing `pools` is refused
    }


def append_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add `entry` to the keys file at `path` (made, mode 0600, if absent) in one rename.

    The new content is written to a temporary file beside it, checked with the same parser
    the routers use, flushed to disk and renamed over the old file: a router re-reading the
    file sees the old keys or the new ones, never a half-written entry. Comments and layout
    of the existing file are kept (the entry is appended as text).

    Raises:
        ValueError: the file is not a top-level list, or the result would not load.
    """
    try:
        old = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        old, mode = b"", 0o600
    doc = yaml.safe_load(old) if old.strip() else None
    if doc is not None and not isinstance(doc, list):
        raise ValueError(f"new-key --file: {path} is not a top-level list of keys")
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = old + yaml.safe_dump([entry], sort_keys=False).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        load_api_keys(tmp)  # duplicates or a bad entry: refuse before anyone can read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def run_new_key(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Make a key: the key itself on `err` (shown once), its file entry as YAML on `out`
    or, with `--file`, added to that file atomically.

    Raises:
        ValueError: the name is not valid, or the file cannot take the entry.
    """
    key = new_key()
    entry = key_entry(args.name, key, args.role or [EXECUTOR], args.pool)
    if args.file is not None:
        append_entry(args.file, entry)
        print(f"# added key {args.name!r} to {args.file}", file=err or sys.stderr)
    else:
        print(yaml.safe_dump([entry], sort_keys=False), end="", file=out or sys.stdout)
    print(f"# the key (shown once, give it to the client): {key}", file=err or sys.stderr)
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

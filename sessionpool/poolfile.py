"""Pool files (`pools:` as a list of {name, properties} or a mapping) and applying them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from router.errors import InvalidPoolError
from router.limits import LimitPolicy
from router.pools import CODE_INTERPRETER_IMAGE, SHELL_IMAGE, parse_pool
from router.store import Store


def load_pool_file(path: Path) -> dict[str, Any]:
    """`{name: definition}` from `pools:` (a list of {name, properties} or a mapping).

    Raises:
        InvalidPoolError: the file is not a pool file.
    """
    text = path.read_text()
    doc = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    pools = doc.get("pools", doc) if isinstance(doc, dict) else doc
    if isinstance(pools, dict):
        return {str(k): v for k, v in pools.items()}
    if isinstance(pools, list):
        out = {}
        for i, item in enumerate(pools):
            if not isinstance(item, dict) or "name" not in item:
                raise InvalidPoolError(f"pools[{i}]: needs a name")
            out[str(item["name"])] = {k: v for k, v in item.items() if k != "name"}
        return out
    raise InvalidPoolError(f"{path}: expected `pools:` as a list or a mapping")


async def apply_file(
    store: Store,
    path: Path,
    code_interpreter_image: str = CODE_INTERPRETER_IMAGE,
    shell_image: str = SHELL_IMAGE,
    limits: LimitPolicy | None = None,
) -> list[tuple[str, str]]:
    """Validate every pool first (nothing half-applied), then write; returns (name, change).

    Raises:
        InvalidPoolError: the file, or one of its pools, is not valid (nothing was written).
    """
    parsed = []
    for name, body in load_pool_file(path).items():
        try:
            pool = parse_pool(
                name,
                body,
                code_interpreter_image=code_interpreter_image,
                shell_image=shell_image,
            )
            (limits or LimitPolicy()).check(pool)
            parsed.append(pool)
        except InvalidPoolError as exc:
            raise InvalidPoolError(f"pool {name}: {exc.message}") from None
    changes = []
    for pool in parsed:
        old = await store.get_pool(pool.name)
        if old is None:
            change = "created"
        elif old.dumps() == pool.dumps():
            changes.append((pool.name, "unchanged"))
            continue
        else:
            change = "updated" if old.version == pool.version else "updated (new template)"
        await store.put_pool(pool)
        changes.append((pool.name, change))
    return changes

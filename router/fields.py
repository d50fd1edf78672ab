"""A reader over a parsed JSON object that carries its path, so every error names its field."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from router.errors import InvalidPoolError


class Fields:
    """One JSON object and where it sits (`properties.scaleConfiguration`).

    Readers apply the default when a key is absent and raise `InvalidPoolError` naming the
    full path (`properties.scaleConfiguration.maxConcurrentSessions: must be ...`) otherwise.
    """

    __slots__ = ("data", "path")

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data = data
        self.path = path

    def where(self, key: str) -> str:
        """The path of `key` in this object."""
        return f"{self.path}.{key}"

    def error(self, key: str | None, message: str) -> InvalidPoolError:
        """An error about `key` (or about this object itself when `key` is None)."""
        return InvalidPoolError(f"{self.where(key) if key else self.path}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of `key` (unchecked)."""
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def obj(self, key: str, empty_if_falsy: bool = False) -> Fields:
        """The object at `key`; absent or null (or any falsy value if asked) reads as empty.

        Raises:
            InvalidPoolError: the value is not an object.
        """
        value = self.data.get(key)
        if value is None or (empty_if_falsy and not value):
            return Fields({}, self.where(key))
        if not isinstance(value, dict):
            raise self.error(key, "must be an object")
        return Fields(value, self.where(key))

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        """An integer in `lo`-`hi` (booleans are not integers here).

        Raises:
            InvalidPoolError: the value is not an integer in range.
        """
        value = self.data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.error(key, f"must be an integer {lo}-{hi}")
        return value

    def number(self, key: str, lo: float, hi: float) -> float | None:
        """A number in `lo`-`hi`, or None when absent.

        Raises:
            InvalidPoolError: the value is not a number in range.
        """
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.error(key, f"must be a number {lo:g}-{hi:g}")
        return float(value)

    def choice(
        self, key: str, choices: Collection[str], default: str, message: str | None = None
    ) -> str:
        """One of `choices`.

        Raises:
            InvalidPoolError: the value is not one of them.
        """
        value = self.data.get(key, default)
        if not isinstance(value, str) or value not in choices:
            raise self.error(key, message or f"must be one of {sorted(choices)}")
        return value

    def optional_choice(self, key: str, choices: Collection[str]) -> str | None:
        """One of `choices`, or None when absent.

        Raises:
            InvalidPoolError: the value is present and not one of them.
        """
        if self.data.get(key) is None:
            return None
        return self.choice(key, choices, "")

    def flag(self, key: str, default: bool) -> bool:
        """`true` or `false`.

        Raises:
            InvalidPoolError: the value is not a boolean.
        """
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of strings; absent reads as empty.

        Raises:
            InvalidPoolError: the value is not a list of strings.
        """
        value = self.data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return tuple(value)

    def items(self, key: str) -> Iterator[tuple[str, Any]]:
        """`(path, item)` for each item of the list at `key`; absent reads as empty.

        Raises:
            InvalidPoolError: the value is not a list.
        """
        value = self.data.get(key) or []
        if not isinstance(value, list):
            raise self.error(key, "must be a list")
        for i, item in enumerate(value):
            yield f"{self.where(key)}[{i}]", item

"""Who is calling: the roles and the `Principal` a credential turns into."""

from __future__ import annotations

from dataclasses import dataclass

from router.errors import ForbiddenError

EXECUTOR = "executor"
ADMIN = "admin"
ROLES = frozenset({EXECUTOR, ADMIN})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. `id` owns tenant-bound sessions; `pools` None means every pool."""

    id: str
    roles: frozenset[str]
    pools: frozenset[str] | None = None

    def require(self, role: str, pool: str | None = None) -> None:
        """Check that the principal has `role`, and `pool` in its scope when one is given.

        Raises:
            ForbiddenError: the role is missing or the pool is out of scope.
        """
        if role not in self.roles:
            raise ForbiddenError(f"The credential lacks the '{role}' role.")
        if pool is not None and not self.may_use(pool):
            raise ForbiddenError(f"The credential is not valid for session pool '{pool}'.")

    def may_use(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools


ANONYMOUS = Principal("anonymous", ROLES)

"""Sandbox limits: operator defaults and maximums, and how a pool's own values meet them."""

from __future__ import annotations

from typing import Any

import pytest

from router.errors import InvalidPoolError
from router.limits import DEFAULT, MAXIMUM, LimitPolicy, Limits
from router.settings import GiB, MiB, Settings, parse_bytes
from sessionpool.cli import build_parser, settings_from
from tests.helpers import make_pool


def pool(resources: dict[str, Any] | None = None, pids: int | None = None) -> Any:
    container: dict[str, Any] = {"image": "x"}
    if resources is not None:
        container["resources"] = resources
    return make_pool(
        "limited",
        customContainerTemplate={"containers": [container], "ingress": {"targetPort": 80}},
        **({"sandboxConfiguration": {"pidsLimit": pids}} if pids is not None else {}),
    )


def test_a_pool_naming_nothing_gets_the_defaults_and_half_its_memory_as_storage() -> None:
    assert LimitPolicy().resolve(pool()) == DEFAULT
    assert DEFAULT.storage_bytes <= DEFAULT.memory_bytes // 2
    small = LimitPolicy().resolve(pool({"memory": "256Mi"}))
    assert small == Limits(cpu=1.0, memory_bytes=256 * MiB, pids=256, storage_bytes=128 * MiB)
    own = LimitPolicy().resolve(
        pool({"cpu": 0.25, "memory": "2Gi", "ephemeralStorage": "3Gi"}, pids=64)
    )
    assert own == Limits(cpu=0.25, memory_bytes=2 * GiB, pids=64, storage_bytes=3 * GiB)


def test_a_pool_stored_before_a_maximum_was_lowered_is_held_to_it() -> None:
    lowered = LimitPolicy(
        default=Limits(cpu=0.5, memory_bytes=GiB, pids=100, storage_bytes=256 * MiB),
        maximum=Limits(cpu=0.5, memory_bytes=GiB, pids=100, storage_bytes=GiB),
    )
    big = pool({"cpu": 2, "memory": "4Gi", "ephemeralStorage": "4Gi"}, pids=4000)
    assert lowered.resolve(big) == Limits(0.5, GiB, 100, GiB)


@pytest.mark.parametrize(
    ("resources", "pids", "field"),
    [
        ({"cpu": 2.01}, None, "containers[0].resources.cpu: 2.01 is above"),
        ({"memory": "4097Mi"}, None, "containers[0].resources.memory: 4097Mi is above"),
        ({"ephemeralStorage": "5Gi"}, None, "resources.ephemeralStorage: 5120Mi is above"),
        (None, 4097, "sandboxConfiguration.pidsLimit: 4097 is above"),
    ],
)
def test_a_pool_above_a_maximum_is_refused_naming_the_field(
    resources: dict[str, Any] | None, pids: int | None, field: str
) -> None:
    with pytest.raises(InvalidPoolError) as err:
        LimitPolicy().check(pool(resources, pids))
    assert field in err.value.message
    assert "sandbox_max_" in err.value.message
    LimitPolicy().check(pool({"cpu": 2, "memory": "4Gi", "ephemeralStorage": "4Gi"}, 4096))


def test_storage_is_validated_like_memory() -> None:
    with pytest.raises(InvalidPoolError, match="ephemeralStorage: must look like"):
        pool({"ephemeralStorage": "lots"})
    with pytest.raises(InvalidPoolError, match="ephemeralStorage: must be 1Mi-1Ti"):
        pool({"ephemeralStorage": "100Ki"})
    assert pool({"ephemeralStorage": "1Gi"}).version != pool().version  # a new template


def test_settings_from_variables_and_flags() -> None:
    env = {
        "SESSIONPOOL_SANDBOX_DEFAULT_MEMORY_BYTES": "512Mi",
        "SESSIONPOOL_SANDBOX_MAX_STORAGE_BYTES": "2Gi",
        "SESSIONPOOL_SANDBOX_DEFAULT_CPU": "0.5",
        "SESSIONPOOL_INSECURE_SKIP_HOST_FIREWALL": "true",
    }
    s = Settings.from_env(env)
    policy = LimitPolicy.from_settings(s)
    assert policy.default == Limits(0.5, 512 * MiB, 256, 512 * MiB)
    assert policy.maximum == Limits(2.0, 4 * GiB, 4096, 2 * GiB)
    assert s.insecure_skip_host_firewall
    assert LimitPolicy.from_settings(Settings()) == LimitPolicy(DEFAULT, MAXIMUM)
    args = build_parser().parse_args(
        ["worker", "--sandbox-max-memory-bytes", "8Gi", "--sandbox-default-pids", "128"]
    )
    s = settings_from(args)
    assert (s.sandbox_max_memory_bytes, s.sandbox_default_pids) == (8 * GiB, 128)
    assert not s.insecure_skip_host_firewall
    args = build_parser().parse_args(["apply", "-f", "x", "--sandbox-max-cpu", "4"])
    assert settings_from(args).sandbox_max_cpu == 4.0


def test_bad_limit_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="sandbox_default_memory_bytes: must be positive"):
        Settings(sandbox_default_memory_bytes=8 * GiB)
    with pytest.raises(ValueError, match="SANDBOX_MAX_PIDS"):
        Settings.from_env({"SESSIONPOOL_SANDBOX_MAX_PIDS": "many"})
    with pytest.raises(ValueError, match="is not a size"):
        parse_bytes("1 GB")
    assert parse_bytes("1.5Gi") == 3 * GiB // 2
    assert parse_bytes("1024") == 1024

"""The pool model: the field reader's paths, the template version, the PythonLTS default."""

from __future__ import annotations

import dataclasses

import pytest

from router.errors import InvalidPoolError
from router.fields import Fields
from router.pools import parse_pool
from router.settings import Settings

BODY = {
    "properties": {
        "scaleConfiguration": {"maxConcurrentSessions": 4, "readySessionInstances": 1},
        "customContainerTemplate": {
            "containers": [{"name": "main", "image": "sessionpool/echo:dev"}],
            "ingress": {"targetPort": 8080},
        },
    }
}


def test_the_reader_names_the_nested_field() -> None:
    root = Fields({"a": {"b": [{"c": "x"}]}}, "properties")
    ((at, item),) = root.obj("a").items("b")
    with pytest.raises(InvalidPoolError, match=r"^properties\.a\.b\[0\]\.c: must be an integer"):
        Fields(item, at).integer("c", 0, 0, 9)
    with pytest.raises(InvalidPoolError, match=r"^properties\.a: must be a list"):
        list(root.items("a"))
    assert root.obj("missing").path == "properties.missing"


def test_the_version_follows_the_template_not_the_scale() -> None:
    pool = parse_pool("demo", BODY)
    scaled = parse_pool("demo", {"properties": {**BODY["properties"], "scaleConfiguration": {}}})
    assert pool.version == scaled.version != ""
    other = parse_pool(
        "demo",
        {
            "properties": {
                **BODY["properties"],
                "sandboxConfiguration": {"pidsLimit": 512},
            }
        },
    )
    assert other.version != pool.version
    with pytest.raises(dataclasses.FrozenInstanceError):
        pool.version = "x"  # type: ignore[misc]


def test_python_lts_gets_the_configured_image_written_into_its_definition() -> None:
    body = {"properties": {"containerType": "PythonLTS"}}
    pool = parse_pool("ci-pool", body, code_interpreter_image="example/ci-image:1")
    assert pool.image == "example/ci-image:1"
    assert pool.properties["customContainerTemplate"]["containers"][0]["image"] == pool.image
    assert parse_pool("ci-pool", body).image == Settings().code_interpreter_image

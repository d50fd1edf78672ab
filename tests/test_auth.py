"""Authentication and authorization at the router edge: API keys, JWTs, roles, tenant binding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import RSAAlgorithm

from router import management
from router.app import ROUTING, create_app
from router.auth import AUTH, hash_key, keyfile, load_api_keys
from router.identifiers import session_key
from router.keys import Keys
from router.settings import Settings
from router.store import Store
from tests.helpers import add_ready, make_pool

EXEC_KEY = "sp_exec-key-0123456789abcdef"
ADMIN_KEY = "sp_admin-key-0123456789abcdef"
SCOPED_KEY = "sp_scoped-key-0123456789abcdef"
TENANT_P = "sp_tenant-p-0123456789abcdef"
TENANT_Q = "sp_tenant-q-0123456789abcdef"
HS_SECRET = "an-hs256-secret-that-is-long-enough-0123456789"
AUDIENCE = "https://dynamicsessions.io"
ISSUER = "https://issuer.test"


@dataclass
class Running:
    base: str
    app: web.Application


StartRouter = Callable[..., Awaitable[Running]]
Keyed = Callable[..., Awaitable[Running]]


def write_keys(path: Path, entries: list[dict[str, Any]]) -> str:
    path.write_text(yaml.safe_dump(entries))
    return str(path)


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    return write_keys(
        tmp_path / "keys.yaml",
        [
            {
                "name": "exec",
                "key_sha256": hash_key(EXEC_KEY),
                "roles": ["executor"],
                "pools": ["*"],
            },
            {"name": "ops", "key_sha256": hash_key(ADMIN_KEY), "roles": ["admin"], "pools": ["*"]},
            {
                "name": "scoped",
                "key_sha256": hash_key(SCOPED_KEY),
                "roles": ["executor"],
                "pools": ["demo"],
            },
            {"name": "p", "key_sha256": hash_key(TENANT_P), "roles": ["executor"], "pools": ["*"]},
            {"name": "q", "key_sha256": hash_key(TENANT_Q), "roles": ["executor"], "pools": ["*"]},
        ],
    )


@pytest.fixture
async def start_router(settings: Settings) -> AsyncIterator[StartRouter]:
    servers: list[TestServer] = []

    async def start(**changes: Any) -> Running:
        app = create_app(settings.replace(**changes))
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return Running(f"http://127.0.0.1:{server.port}", app)

    yield start
    for server in servers:
        await server.close()


async def seed(store: Store, sandboxes: Any, name: str = "demo", n: int = 2, **props: Any) -> None:
    pool = make_pool(name, **props)
    await store.put_pool(pool)
    for _ in range(n):
        await add_ready(store, pool, await sandboxes())


@pytest.fixture
async def demo(store: Store, sandboxes: Any) -> None:
    """The demo pool with two ready fake sandboxes."""
    await seed(store, sandboxes)


@pytest.fixture
def keyed(store: Store, sandboxes: Any, keys_file: str, start_router: StartRouter) -> Keyed:
    """Seed a pool (`seed`'s arguments; the demo pool by default) and start a router that
    wants the API keys of `keys_file`."""

    async def start(*args: Any, **props: Any) -> Running:
        await seed(store, sandboxes, *args, **props)
        return await start_router(auth="required", api_keys_file=keys_file)

    return start


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    async with http.request(method, url, headers=headers) as r:
        body = await r.read()
        doc = orjson.loads(body) if r.content_type == "application/json" else body.decode()
        return r.status, doc, r.headers


def assert_error(status: int, body: Any, headers: Any, want: int, code: str) -> None:
    assert status == want, body
    assert body["error"]["code"] == code
    assert headers["x-ms-error-code"] == code
    if want == 401:
        assert headers["WWW-Authenticate"].startswith("Bearer")
    else:
        assert "WWW-Authenticate" not in headers


def hs_token(**claims: Any) -> str:
    now = int(time.time())
    payload = {
        "sub": "user-1",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
        "roles": ["executor"],
        **claims,
    }
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None}, HS_SECRET, algorithm="HS256"
    )


def b64(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()


# Settings and start-up ---------------------------------------------------------------------


def test_settings_refuse_required_auth_without_a_credential_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="credential source"):
        Settings(auth="required").check_router_auth()
    with pytest.raises(ValueError, match="credential source"):
        create_app(Settings())  # the default: a router never starts open by accident
    Settings(auth="none").check_router_auth()
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(auth="required", jwt_hs256_secret="short")
    with pytest.raises(ValueError, match="jwt_audience"):
        Settings(auth="required", jwt_hs256_secret=HS_SECRET, jwt_audience=" ")
    s = Settings.from_env(
        {
            "SESSIONPOOL_AUTH": "required",
            "SESSIONPOOL_JWT_HS256_SECRET": HS_SECRET,
            "SESSIONPOOL_JWT_LEEWAY_S": "5",
        }
    )
    assert s.jwt_leeway_s == 5.0
    assert HS_SECRET not in repr(s)  # never printed with the settings


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x y", "key_sha256": "0" * 64, "roles": ["executor"]}, r"keys\[0\]\.name"),
        ({"name": "x", "key_sha256": "abc", "roles": ["executor"]}, "key_sha256"),
        ({"name": "x", "key_sha256": "0" * 64, "roles": ["root"]}, "roles"),
        ({"name": "x", "key_sha256": "0" * 64, "roles": []}, "roles"),
        ({"name": "x", "key_sha256": "0" * 64, "roles": ["admin"], "pools": ["Bad!"]}, "pools"),
        # No `pools` once silently meant every pool: now it must be said.
        ({"name": "x", "key_sha256": "0" * 64, "roles": ["admin"]}, r"keys\[0\]\.pools: required"),
        ({"name": "x", "key_sha256": "0" * 64, "roles": ["admin"], "pools": []}, "pools"),
        ({"name": "x", "key_sha256": "0" * 64, "roles": ["admin"], "pools": ["*", "a"]}, "pools"),
    ],
)
def test_bad_api_keys_file_refuses_to_start(
    tmp_path: Path, settings: Settings, entry: dict[str, Any], message: str
) -> None:
    path = write_keys(tmp_path / "keys.yaml", [entry])
    with pytest.raises(ValueError, match=message):
        create_app(settings.replace(auth="required", api_keys_file=path))


def test_keys_file_forms_and_duplicates(tmp_path: Path, settings: Settings) -> None:
    entry = {"name": "a", "key_sha256": hash_key("k1"), "roles": ["admin"], "pools": ["*"]}
    path = tmp_path / "keys.json"
    path.write_bytes(orjson.dumps({"keys": [entry]}))  # JSON and the {keys: [...]} form
    (key,) = load_api_keys(str(path))
    assert key.principal.id == "key:a"
    dup = write_keys(tmp_path / "dup.yaml", [entry, {**entry, "name": "b"}])
    with pytest.raises(ValueError, match="twice"):
        load_api_keys(dup)
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="jwt_jwks"):
        create_app(settings.replace(auth="required", jwt_jwks=str(tmp_path / "nope.json")))


def test_plain_http_jwks_only_on_loopback_and_issuer_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    for url in ("http://keys.example/jwks.json", "http://10.0.0.1:8080/jwks"):
        with pytest.raises(ValueError, match="plain http to another host"):
            create_app(settings.replace(auth="required", jwt_jwks=url))
    with caplog.at_level(logging.WARNING, logger="sessionpool.auth"):
        create_app(settings.replace(auth="required", jwt_jwks="http://127.0.0.1:9/jwks"))
        create_app(settings.replace(auth="required", jwt_jwks="https://keys.example/jwks"))
    assert sum("tokens of ANY issuer are accepted" in r.message for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sessionpool.auth"):
        create_app(settings.replace(auth="required", jwt_hs256_secret=HS_SECRET, jwt_issuer=ISSUER))
    assert not any("ANY issuer" in r.message for r in caplog.records)


# API keys ----------------------------------------------------------------------------------


async def test_health_stays_open(
    keys_file: str, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    r = await start_router(auth="required", api_keys_file=keys_file)
    for path in ("/healthz", "/readyz"):
        status, _, _ = await call(http, "GET", r.base + path)
        assert status == 200


async def test_api_key_reaches_the_session_and_never_leaks_to_it(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    r = await keyed()
    for headers in (
        bearer(EXEC_KEY),
        {"x-api-key": EXEC_KEY},
        {"authorization": f"bearer  {EXEC_KEY} "},
    ):
        status, body, _ = await call(
            http, "GET", f"{r.base}/pools/demo/x?identifier=user1", headers
        )
        assert status == 200, body
        seen = {k.lower(): v for k, v in body["headers"]}
        assert "authorization" not in seen
        assert "x-api-key" not in seen
        assert EXEC_KEY not in orjson.dumps(body["headers"]).decode()


@pytest.mark.parametrize(
    ("headers", "path", "status", "code"),
    [
        ({}, "/pools/demo/x?identifier=user1", 401, "Unauthorized"),
        (bearer("sp_not-a-key"), "/pools/demo/x?identifier=user1", 401, "Unauthorized"),
        ({"x-api-key": "sp_not-a-key"}, "/pools/demo/x?identifier=user1", 401, "Unauthorized"),
        (
            {"Authorization": f"Basic {EXEC_KEY}"},
            "/pools/demo/x?identifier=u1",
            401,
            "Unauthorized",
        ),
        ({"Authorization": "Bearer"}, "/pools/demo/x?identifier=user1", 401, "Unauthorized"),
        ({"Authorization": "Bearer a b"}, "/pools/demo/x?identifier=user1", 401, "Unauthorized"),
        (
            {**bearer(EXEC_KEY), "x-api-key": EXEC_KEY},
            "/pools/demo/x?identifier=user1",
            401,
            "Unauthorized",
        ),
        ({}, "/pools/demo/.management/listSessions", 401, "Unauthorized"),
        ({}, "/admin/pools", 401, "Unauthorized"),
        (
            {},
            "/subscriptions/s/resourceGroups/g/sessionPools/demo/x?identifier=u1",
            401,
            "Unauthorized",
        ),
        (bearer(EXEC_KEY), "/admin/pools", 403, "Forbidden"),
        (bearer(EXEC_KEY), "/admin/pools/demo", 403, "Forbidden"),
        (bearer(ADMIN_KEY), "/pools/demo/x?identifier=user1", 403, "Forbidden"),
        (bearer(ADMIN_KEY), "/pools/demo/.management/listSessions", 403, "Forbidden"),
        (bearer(SCOPED_KEY), "/pools/other/x?identifier=user1", 403, "Forbidden"),
        (bearer(SCOPED_KEY), "/pools/other/.management/listSessions", 403, "Forbidden"),
    ],
)
async def test_bad_or_insufficient_credentials(
    demo: None,
    keyed: Keyed,
    store: Store,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    path: str,
    status: int,
    code: str,
) -> None:
    r = await keyed("other")
    assert_error(*await call(http, "GET", r.base + path, headers), status, code)
    assert (await store.counts("demo"))["allocated"] == 0  # nothing was claimed


async def test_scoped_key_serves_its_pool_and_admin_key_the_control_plane(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    r = await keyed()
    status, _, _ = await call(
        http, "GET", f"{r.base}/pools/demo/x?identifier=user1", bearer(SCOPED_KEY)
    )
    assert status == 200
    status, body, _ = await call(http, "GET", f"{r.base}/admin/pools", bearer(ADMIN_KEY))
    assert status == 200
    assert [p["name"] for p in body["value"]] == ["demo"]


async def test_keys_file_is_reloaded_when_it_changes(
    demo: None,
    tmp_path: Path,
    start_router: StartRouter,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_keys(
        tmp_path / "k.yaml",
        [
            {
                "name": "old",
                "key_sha256": hash_key("sp_old-key"),
                "roles": ["executor"],
                "pools": ["*"],
            }
        ],
    )
    r = await start_router(auth="required", api_keys_file=path)
    url = f"{r.base}/pools/demo/x?identifier=user1"
    assert (await call(http, "GET", url, bearer("sp_old-key")))[0] == 200
    monkeypatch.setattr(keyfile, "KEYS_RECHECK_S", 0.0)
    write_keys(
        tmp_path / "k.yaml",
        [
            {
                "name": "new",
                "key_sha256": hash_key("sp_new-key"),
                "roles": ["executor"],
                "pools": ["*"],
            }
        ],
    )
    assert (await call(http, "GET", url, bearer("sp_old-key")))[0] == 401
    assert (await call(http, "GET", url, bearer("sp_new-key")))[0] == 200
    (tmp_path / "k.yaml").write_text("- {name: broken")  # a bad edit keeps the last good keys
    assert (await call(http, "GET", url, bearer("sp_new-key")))[0] == 200


async def test_credentials_never_reach_the_logs(
    demo: None,
    keys_file: str,
    start_router: StartRouter,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    r = await start_router(auth="required", api_keys_file=keys_file, jwt_hs256_secret=HS_SECRET)
    token = hs_token(aud="https://elsewhere")
    for headers in (
        bearer(EXEC_KEY),
        bearer("sp_wrong-key"),
        bearer(token),
        {"x-api-key": ADMIN_KEY},
    ):
        await call(http, "GET", f"{r.base}/pools/demo/x?identifier=user1", headers)
    for secret in (EXEC_KEY, "sp_wrong-key", token, ADMIN_KEY, HS_SECRET):
        assert secret not in caplog.text


# JWT ---------------------------------------------------------------------------------------


def _alg_none() -> str:
    now = int(time.time())
    return (
        b64({"alg": "none", "typ": "JWT"})
        + "."
        + b64({"sub": "u", "aud": AUDIENCE, "exp": now + 300, "roles": ["executor"]})
        + "."
    )


@pytest.mark.parametrize(
    ("make_token", "status"),
    [
        (lambda: hs_token(), 200),
        (lambda: hs_token(scp="openid SessionPool.Executor"), 200),
        (lambda: hs_token(roles=None, scope="executor"), 200),
        (lambda: hs_token(sub=None, oid="object-id"), 200),
        (lambda: hs_token(exp=int(time.time()) - 10), 200),  # within the 30 s leeway
        (lambda: hs_token(iss=None), 401),
        (lambda: hs_token(exp=int(time.time()) - 120), 401),
        (lambda: hs_token(exp=None), 401),
        (lambda: hs_token(nbf=int(time.time()) + 120), 401),
        (lambda: hs_token(aud="https://elsewhere"), 401),
        (lambda: hs_token(aud=None), 401),
        (lambda: hs_token(iss="https://evil.test"), 401),
        (lambda: hs_token(sub=None), 401),
        (lambda: hs_token(pools=5), 401),
        (lambda: hs_token()[:-4] + "AAAA", 401),  # signature tampered
        (
            lambda: jwt.encode(
                {"sub": "u", "aud": AUDIENCE, "exp": int(time.time()) + 60, "roles": ["executor"]},
                "x" * 40,
                algorithm="HS256",
            ),
            401,
        ),
        (_alg_none, 401),
        (lambda: "a.b.c", 401),
        (lambda: hs_token(roles=None), 403),
        (lambda: hs_token(roles=["admin"]), 403),
        (lambda: hs_token(roles=["executor-ish", "superuser"]), 403),
        (lambda: hs_token(pools=["other"]), 403),
        (lambda: hs_token(pools="demo other"), 200),
    ],
)
async def test_hs256_tokens(
    demo: None,
    start_router: StartRouter,
    http: aiohttp.ClientSession,
    make_token: Callable[[], str],
    status: int,
) -> None:
    r = await start_router(auth="required", jwt_hs256_secret=HS_SECRET, jwt_issuer=ISSUER)
    got = await call(http, "GET", f"{r.base}/pools/demo/x?identifier=user1", bearer(make_token()))
    if status == 200:
        assert got[0] == 200, got[1]
    else:
        assert_error(*got, status, "Unauthorized" if status == 401 else "Forbidden")


async def test_jwt_is_not_accepted_as_x_api_key(
    demo: None, start_router: StartRouter, http: aiohttp.ClientSession
) -> None:
    r = await start_router(auth="required", jwt_hs256_secret=HS_SECRET)
    url = f"{r.base}/pools/demo/x?identifier=user1"
    assert (await call(http, "GET", url, bearer(hs_token())))[0] == 200
    assert_error(*await call(http, "GET", url, {"x-api-key": hs_token()}), 401, "Unauthorized")


class JwksServer:
    """A JWKS endpoint on loopback whose key set the test can rotate."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        app = web.Application()
        app.router.add_get("/jwks.json", self.serve)
        self.server = TestServer(app, host="127.0.0.1")

    async def serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": self.keys})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/jwks.json"


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.server.start_server()
    yield server
    await server.server.close()


def rsa_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    assert isinstance(jwk, dict)
    return key, {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


def rs_token(key: rsa.RSAPrivateKey, kid: str | None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "svc", "aud": AUDIENCE, "exp": now + 300, "roles": ["executor"], **claims}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm="RS256", headers=headers)


async def test_rs256_with_jwks_url_and_key_rotation(
    demo: None, start_router: StartRouter, http: aiohttp.ClientSession, jwks: JwksServer
) -> None:
    k1, jwk1 = rsa_key("k1")
    k2, jwk2 = rsa_key("k2")
    jwks.keys = [jwk1]
    r = await start_router(auth="required", jwt_jwks=jwks.url)
    url = f"{r.base}/pools/demo/x?identifier=user1"
    assert (await call(http, "GET", url, bearer(rs_token(k1, "k1"))))[0] == 200
    assert (await call(http, "GET", url, bearer(rs_token(k1, None))))[0] == 200  # one key
    assert (await call(http, "GET", url, bearer(rs_token(k1, "k1"))))[0] == 200
    assert jwks.hits == 1  # cached
    # Wrong key under a known kid; an HS256 token "signed" with the public key (alg confusion).
    assert_error(*await call(http, "GET", url, bearer(rs_token(k2, "k1"))), 401, "Unauthorized")
    pem = k1.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = (
        b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
        + "."
        + b64({"sub": "x", "aud": AUDIENCE, "exp": int(time.time()) + 60, "roles": ["executor"]})
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    hs = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert_error(*await call(http, "GET", url, bearer(hs)), 401, "Unauthorized")
    # Rotation: the new kid is unknown, so the set is fetched again, but not more often than
    # the refetch interval allows (a flood of random kids cannot hammer the JWKS endpoint).
    jwks.keys = [jwk2]
    for _ in range(3):
        assert_error(*await call(http, "GET", url, bearer(rs_token(k2, "k2"))), 401, "Unauthorized")
    assert jwks.hits == 1
    verifier = r.app[AUTH].jwt
    assert verifier is not None
    assert verifier.jwks is not None
    verifier.jwks.refetch_min_s = 0.0
    assert (await call(http, "GET", url, bearer(rs_token(k2, "k2"))))[0] == 200
    assert jwks.hits == 2
    assert_error(*await call(http, "GET", url, bearer(rs_token(k1, "k1"))), 401, "Unauthorized")


async def test_rs256_with_jwks_file(
    demo: None, start_router: StartRouter, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    key, jwk = rsa_key("file-key")
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps({"keys": [jwk, {"kty": "oct", "k": "abc"}]}))
    r = await start_router(auth="required", jwt_jwks=str(path), jwt_audience="api://a, api://b")
    url = f"{r.base}/pools/demo/x?identifier=user1"
    assert (await call(http, "GET", url, bearer(rs_token(key, "file-key", aud="api://b"))))[
        0
    ] == 200
    assert_error(
        *await call(http, "GET", url, bearer(rs_token(key, "file-key"))), 401, "Unauthorized"
    )  # the default audience is not configured here


# Tenant binding ----------------------------------------------------------------------------


async def test_tenant_binding_scopes_identifiers_per_principal(
    keyed: Keyed, store: Store, http: aiohttp.ClientSession
) -> None:
    r = await keyed(n=3, tenantBinding=True)
    ep = f"{r.base}/pools/demo"
    p, q = bearer(TENANT_P), bearer(TENANT_Q)
    status, first, _ = await call(http, "GET", f"{ep}/x?identifier=shared-id", p)
    assert status == 200
    status, again, _ = await call(http, "GET", f"{ep}/x?identifier=shared-id", p)
    assert again["sandbox"] == first["sandbox"]
    # The sandbox sees the identifier exactly as the caller sent it.
    assert again["raw_path"] == "/x?identifier=shared-id"
    # Same identifier, another principal: another session, never P's.
    status, theirs, _ = await call(http, "GET", f"{ep}/x?identifier=shared-id", q)
    assert status == 200
    assert theirs["sandbox"] != first["sandbox"]
    status, views, _ = await call(http, "GET", f"{ep}/.management/listSessions", q)
    assert [(v["identifier"], v["etag"]) for v in views["value"]] == [
        ("shared-id", (await store.get_session("demo", session_key("shared-id", "key:q"))).sandbox)
    ]
    assert views["count"] == 1
    status, view, _ = await call(
        http, "GET", f"{ep}/.management/getSession?identifier=shared-id", p
    )
    assert status == 200 and view["identifier"] == "shared-id"
    assert view["etag"] != views["value"][0]["etag"]


async def test_non_owner_cannot_detect_stop_or_extend_a_session(
    keyed: Keyed, store: Store, http: aiohttp.ClientSession, settings: Settings
) -> None:
    r = await keyed(n=1, tenantBinding=True)
    ep = f"{r.base}/pools/demo"
    p, q = bearer(TENANT_P), bearer(TENANT_Q)
    assert (await call(http, "GET", f"{ep}/x?identifier=p-secret", p))[0] == 200
    expiry = Keys(settings.key_prefix).pool("demo").expiry
    p_key = session_key("p-secret", "key:p")
    await r.app[ROUTING].flush()  # P's own activity is in Redis before we look
    before = await store.redis.zscore(expiry, p_key)
    assert before is not None

    async def answer(url: str, headers: dict[str, str]) -> tuple[int, Any]:
        status, body, hdrs = await call(http, "POST", url, headers)
        assert hdrs["x-ms-error-code"] == "SessionNotFound", body
        body["error"].pop("traceId")
        return status, body

    for action in ("getSession", "stopSession"):
        # The owner's session and one that never existed answer Q identically.
        taken = await answer(f"{ep}/.management/{action}?identifier=p-secret", q)
        missing = await answer(f"{ep}/.management/{action}?identifier=p-nothing", q)
        assert missing[0] == 404
        assert taken == (
            404,
            orjson.loads(orjson.dumps(missing[1]).replace(b"p-nothing", b"p-secret")),
        )
    # Q on the data plane: the pool is empty, so Q waits and gets 503 (its own session
    # cannot be made), and P's session is not touched.
    status, _, _ = await call(http, "GET", f"{ep}/x?identifier=p-secret", q)
    assert status == 503
    await r.app[ROUTING].flush()
    assert await store.redis.zscore(expiry, p_key) == before
    assert (await store.get_session("demo", p_key)) is not None
    # Stop is also checked against the owner inside the script.
    assert not await store.stop("demo", p_key, "stopped", owner="key:q")
    assert await store.stop("demo", p_key, "stopped", owner="key:p")


async def test_tenant_bound_listing_pages_only_the_callers_sessions(
    keyed: Keyed, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(management, "PAGE_SIZE", 2)
    r = await keyed(n=5, tenantBinding=True)
    ep = f"{r.base}/pools/demo"
    p, q = bearer(TENANT_P), bearer(TENANT_Q)
    for ident in ("p-one", "p-two", "p-three", "p-four"):
        assert (await call(http, "GET", f"{ep}/x?identifier={ident}", p))[0] == 200
    assert (await call(http, "GET", f"{ep}/x?identifier=q-only", q))[0] == 200
    # Q: one session, one page; the four of P's change nothing in what Q sees.
    _, listing, _ = await call(http, "GET", f"{ep}/.management/listSessions", q)
    assert [v["identifier"] for v in listing["value"]] == ["q-only"]
    assert (listing["count"], listing["nextLink"]) == (1, None)
    _, listing, _ = await call(http, "GET", f"{ep}/.management/listSessions?skip=2", q)
    assert (listing["value"], listing["count"], listing["nextLink"]) == ([], 1, None)
    # P: its four, two pages of two, linked.
    _, first, _ = await call(http, "GET", f"{ep}/.management/listSessions", p)
    assert first["count"] == 4 and first["nextLink"].endswith("/listSessions?skip=2")
    _, second, _ = await call(http, "GET", first["nextLink"], p)
    assert second["nextLink"] is None
    seen = {v["identifier"] for v in first["value"] + second["value"]}
    assert seen == {"p-one", "p-two", "p-three", "p-four"}


async def test_without_tenant_binding_any_executor_shares_an_identifier(
    keyed: Keyed, http: aiohttp.ClientSession
) -> None:
    r = await keyed()
    url = f"{r.base}/pools/demo/x?identifier=shared-id"
    _, a, _ = await call(http, "GET", url, bearer(TENANT_P))
    _, b, _ = await call(http, "GET", url, bearer(TENANT_Q))
    assert a["sandbox"] == b["sandbox"]

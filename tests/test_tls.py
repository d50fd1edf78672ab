"""TLS at the edge: HTTPS and WSS through the router, certificates re-read on change."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import ipaddress
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from router import tls
from router.server import start_site
from router.settings import Settings
from router.store import Store
from tests.helpers import FakeSandbox, add_ready, make_pool, wait_until


@dataclass(frozen=True)
class Cert:
    name: str
    cert_pem: bytes
    key_pem: bytes

    def install(self, directory: Path, *, key: bool = True) -> None:
        (directory / "cert.pem").write_bytes(self.cert_pem)
        if key:
            (directory / "key.pem").write_bytes(self.key_pem)


def make_cert(name: str) -> Cert:
    """A self-signed certificate for localhost and 127.0.0.1 (what the tests dial)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Cert(
        name,
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def client_context(*certs: Cert) -> ssl.SSLContext:
    """A client that trusts exactly these self-signed certificates."""
    return ssl.create_default_context(cadata=b"".join(c.cert_pem for c in certs).decode())


class TlsStream:
    """One raw TLS connection to the router, kept open across requests (HTTP/1.1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str, context: ssl.SSLContext) -> TlsStream:
        port = int(base.rsplit(":", 1)[1])
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=context))

    @property
    def peer_name(self) -> str:
        """The common name of the certificate the server showed on this connection."""
        cert = self.writer.get_extra_info("peercert")
        return str(dict(x[0] for x in cert["subject"])["commonName"])

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1])

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


@pytest.fixture
async def tls_router(
    settings: Settings, store: Store, tmp_path: Path
) -> AsyncIterator[tuple[str, Path]]:
    """A router serving HTTPS with the certificate in tmp_path, and a pool of two fakes."""
    make_cert("sessionpool-test-one").install(tmp_path)
    pool = make_pool(ready=2)
    await store.put_pool(pool)
    fakes = [await FakeSandbox().start() for _ in range(2)]
    for fake in fakes:
        await add_ready(store, pool, fake)
    runner, port = await start_site(
        settings.replace(
            host="127.0.0.1",
            port=0,
            tls_cert=str(tmp_path / "cert.pem"),
            tls_key=str(tmp_path / "key.pem"),
        )
    )
    yield f"https://127.0.0.1:{port}", tmp_path
    await runner.cleanup()
    for fake in fakes:
        await fake.close()


async def test_https_and_wss_through_the_router(tls_router: tuple[str, Path]) -> None:
    base, directory = tls_router
    trusted = client_context(
        Cert("sessionpool-test-one", (directory / "cert.pem").read_bytes(), b"")
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as http:
        async with http.get(f"{base}/pools/demo/x?identifier=tls-user") as r:
            assert r.status == 200
            seen = await r.json()
        headers = {k.lower(): v for k, v in seen["headers"]}
        assert headers["x-forwarded-proto"] == "https"  # the session knows it was TLS
        # A large body of declared length goes up from the TLS socket as it is decrypted.
        body = os.urandom(3 << 20)
        up = f"{base}/pools/demo/up?identifier=tls-user"
        async with http.put(up, data=io.BytesIO(body)) as r:
            echoed = await r.json()
            assert r.headers["Connection"] == "close"
        assert echoed["body_bytes"] == len(body)
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
        async with http.ws_connect(f"{WSS(base)}/pools/demo/ws?identifier=tls-user") as ws:
            await ws.send_str("over wss")
            assert (await ws.receive_str()) == f"{seen['sandbox']}:over wss"
    # Plain HTTP to the TLS port is not served, and an untrusting client refuses the cert.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"{base}/healthz")
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"{base.replace('https', 'http')}/healthz")


async def test_rotated_certificate_reaches_new_handshakes_only(
    tls_router: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, directory = tls_router
    monkeypatch.setattr(tls, "TLS_RECHECK_S", 0.0)  # look at the files at every handshake
    one = Cert("sessionpool-test-one", (directory / "cert.pem").read_bytes(), b"")
    rotated = make_cert("sessionpool-test-rotated")
    trusted = client_context(one, rotated)

    async def fresh_handshake() -> str:
        stream = await TlsStream.open(base, trusted)
        try:
            assert await stream.get("/healthz") == 200
            return stream.peer_name
        finally:
            await stream.close()

    kept = await TlsStream.open(base, trusted)
    kept_ws = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted))
    try:
        assert await kept.get("/healthz") == 200
        assert kept.peer_name == "sessionpool-test-one"
        ws = await kept_ws.ws_connect(f"{WSS(base)}/pools/demo/ws?identifier=rotating")
        await ws.send_str("before")
        assert (await ws.receive_str()).endswith(":before")

        # Half a renewal: the new certificate, still the old key. Skipped, loudly.
        caplog.set_level(logging.WARNING, logger="sessionpool.tls")
        rotated.install(directory, key=False)
        assert await fresh_handshake() == "sessionpool-test-one"
        assert any("does not load" in rec.getMessage() for rec in caplog.records)
        # The key lands: the next handshake sees the new certificate.
        (directory / "key.pem").write_bytes(rotated.key_pem)

        async def rotated_in() -> bool:
            return await fresh_handshake() == "sessionpool-test-rotated"

        await wait_until(rotated_in, timeout=10)

        # What was open before the rotation is still up, on the certificate it agreed on.
        assert await kept.get("/healthz") == 200
        assert kept.peer_name == "sessionpool-test-one"
        await ws.send_str("after")
        assert (await ws.receive_str()).endswith(":after")
        await ws.close()
    finally:
        await kept.close()
        await kept_ws.close()


def WSS(base: str) -> str:
    return "wss://" + base.removeprefix("https://")


async def test_bad_tls_settings_stop_the_router(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give both or neither"):
        Settings(tls_cert=str(tmp_path / "cert.pem"))
    make_cert("a").install(tmp_path)
    (tmp_path / "key.pem").write_bytes(make_cert("b").key_pem)  # not the certificate's key
    bad = settings.replace(
        host="127.0.0.1",
        port=0,
        tls_cert=str(tmp_path / "cert.pem"),
        tls_key=str(tmp_path / "key.pem"),
    )
    with pytest.raises(ValueError, match="tls_cert/tls_key: cannot load"):
        await start_site(bad)
    missing = bad.replace(tls_key=str(tmp_path / "absent.pem"))
    with pytest.raises(ValueError, match=r"absent\.pem"):
        await start_site(missing)
    env = Settings.from_env({"SESSIONPOOL_TLS_CERT": "/c.pem", "SESSIONPOOL_TLS_KEY": "/k.pem"})
    assert (env.tls_cert, env.tls_key) == ("/c.pem", "/k.pem")
    assert "/k.pem" not in repr(env)

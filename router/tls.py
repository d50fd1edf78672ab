"""TLS at the edge: the listener's certificate, re-read from its files when they change.

The listening socket keeps one `SSLContext` for its whole life; its SNI callback, which
OpenSSL calls at every ClientHello (with or without a server name), hands the handshake the
newest context instead. So a renewed certificate reaches the next handshake within
`TLS_RECHECK_S`, connections already open keep the one they agreed on, and nothing restarts.
A renewal is often two writes (certificate, then key): a pair that does not load (half
written, mismatched) is skipped with a warning and tried again at the next check, while the
previous pair keeps serving.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

log = logging.getLogger("sessionpool.tls")

TLS_RECHECK_S = 1.0  # how often a handshake may look at the files' metadata

_Stamp = tuple[tuple[int, int, int], tuple[int, int, int]]


def load_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for a PEM certificate chain and its key (TLS 1.2 or later).

    Raises:
        ValueError: a file cannot be read, or the pair does not load (the message says why).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"tls_cert/tls_key: cannot load {cert_file} with {key_file}: {exc}"
        ) from None
    return context


class ReloadingTLS:
    """The SSL context to serve with, following `cert_file` and `key_file` as they change."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        """Raises: ValueError: the pair does not load now (a router must not start without)."""
        self.cert_file = cert_file
        self.key_file = key_file
        self.reloads = 0
        try:  # before loading: a change made meanwhile is then seen at the first check
            self._stamp = self._files_stamp()
        except OSError as exc:
            raise ValueError(f"tls_cert/tls_key: {exc}") from None
        self.context = load_context(cert_file, key_file)
        self.context.sni_callback = self._on_client_hello
        self._current = self.context
        self._checked = time.monotonic()

    def _files_stamp(self) -> _Stamp:
        a, b = os.stat(self.cert_file), os.stat(self.key_file)
        return (a.st_mtime_ns, a.st_size, a.st_ino), (b.st_mtime_ns, b.st_size, b.st_ino)

    def current(self) -> ssl.SSLContext:
        """The context for a new handshake, reloading the files first when they changed."""
        now = time.monotonic()
        if now - self._checked >= TLS_RECHECK_S:
            self._checked = now
            self._maybe_reload()
        return self._current

    def _maybe_reload(self) -> None:
        try:
            stamp = self._files_stamp()
        except OSError as exc:  # mid-rename, or removed: keep serving what we have
            log.warning("tls: keeping the current certificate: %s", exc)
            return
        if stamp == self._stamp:
            return
        try:
            context = load_context(self.cert_file, self.key_file)
        except ValueError as exc:
            log.warning("tls: keeping the current certificate, the new pair does not load: %s", exc)
            return  # the stamp is not taken: the pair is tried again at the next check
        self._stamp = stamp
        self._current = context
        self.reloads += 1
        log.info("tls: certificate reloaded from %s", self.cert_file)

    def _on_client_hello(
        self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        context = self.current()
        if context is not sslobj.context:
            sslobj.context = context

"""TLS contexts from the [security] table, and the event loop both daemons run on."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from kowalski.common.config import SecurityConfig


def server_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """A server context when a certificate is configured, else None (plain HTTP)."""
    if not security.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(security.tls_cert_file, security.tls_key_file)
    return context


def client_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """A client context trusting the configured CA, else None (system defaults)."""
    if not security.tls_ca_file:
        return None
    return ssl.create_default_context(cafile=security.tls_ca_file)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

"""TLS contexts from the [security] table, and the event loop the controller runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kowalski.common.config import SecurityConfig
from kowalski.common.errors import ConfigError

if TYPE_CHECKING:
    import ssl


def server_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """A server context when a certificate is configured, else None (plain HTTP)."""
    if not security.tls_cert_file:
        return None
    # Here, not at the top: an agent without TLS settings runs without the ssl module.
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = (str(Path(name).expanduser())
                 for name in (security.tls_cert_file, security.tls_key_file))
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} with key {key}: {exc}",
                          key="security.tls_cert_file") from None
    return context


def client_ssl_context(security: SecurityConfig) -> ssl.SSLContext | None:
    """A client context trusting the configured CA (and no other), else None (system CAs)."""
    if not security.tls_ca_file:
        return None
    import ssl

    cafile = str(Path(security.tls_ca_file).expanduser())
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS CA bundle {cafile}: {exc}",
                          key="security.tls_ca_file") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

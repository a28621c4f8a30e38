"""From an endpoint's config entry to a client: its URL, API key and model list."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp

from kowalski.common.config import EndpointConfig, ExoConfig
from kowalski.common.errors import ConfigError
from kowalski.controller.models.exo_client import ExoClient


def read_api_key(endpoint: EndpointConfig) -> str:
    """The endpoint's API key from its file or environment variable; empty when it has none."""
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"the environment variable {endpoint.api_key_env} holding the API key of "
                f"{endpoint.url} is not set", key="exo.endpoints.api_key_env")
        return key
    if not endpoint.api_key_file:
        return ""
    path = Path(endpoint.api_key_file).expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"cannot read the API key of {endpoint.url}: {reason}",
                          path=str(path)) from None
    if not key:
        raise ConfigError(f"the API key file of {endpoint.url} is empty", path=str(path))
    return key


def client_for(
    entry: str | EndpointConfig, config: ExoConfig, *, session: aiohttp.ClientSession | None,
) -> ExoClient:
    """A client for one `exo.endpoints` entry, with its key and models."""
    endpoint = entry if isinstance(entry, EndpointConfig) else EndpointConfig(url=entry)
    return ExoClient.from_config(endpoint.url, config, session=session,
                                 api_key=read_api_key(endpoint), models=tuple(endpoint.models))

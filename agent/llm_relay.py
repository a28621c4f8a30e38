"""Carries a session's llm_query() calls to the controller that owns the run."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from kowalski.common.client import SignedClient
from kowalski.common.errors import ConfigError, KowalskiError
from kowalski.common.messages import LlmAnswer, LlmCallback, LlmQuery

if TYPE_CHECKING:
    import ssl


class LlmRelay:
    """The session manager's llm_handler: one signed POST per llm_query call."""

    def __init__(self, http: aiohttp.ClientSession, *, secret: bytes | None,
                 ssl_context: ssl.SSLContext | None, timeout_s: float) -> None:
        self._http = http
        self._secret = secret
        self._timeout_s = timeout_s
        # The configured CA's context serves every callback; without one, https callbacks
        # get the system CA store, loaded on first use (see kowalski.agent.__main__.run).
        self._client = SignedClient(http, secret=secret, ssl=ssl_context)
        self._system_ca_client: SignedClient | None = None if ssl_context is None else (
            self._client)

    async def _client_for(self, url: str) -> SignedClient:
        if urlsplit(url).scheme != "https":
            return self._client
        if self._system_ca_client is None:
            try:
                import ssl
            except ImportError:
                # Started without TLS settings, the agent left TLS out (see __main__.run).
                raise ConfigError(
                    f"the controller's callback {url} is https, but this agent runs without "
                    "TLS: it has no security.tls_* setting. Set security.tls_ca_file (the CA "
                    "that signed the controller's certificate, or the system bundle, e.g. "
                    "/etc/ssl/certs/ca-certificates.crt) and restart the agent",
                    key="security.tls_ca_file") from None
            context = await asyncio.to_thread(ssl.create_default_context)
            self._system_ca_client = SignedClient(self._http, secret=self._secret, ssl=context)
        return self._system_ca_client

    async def __call__(self, callback: LlmCallback, prompts: list[str], model: str = ""
                       ) -> list[str]:
        client = await self._client_for(callback.url)
        query = LlmQuery(token=callback.token, prompts=prompts, model=model)
        answer = await client.call(
            "POST", callback.url, LlmAnswer, query,
            timeout_s=self._timeout_s,
        )
        if answer.error is not None:
            raise KowalskiError(f"llm_query failed: {answer.error.message}")
        if len(answer.answers) != len(prompts):
            raise KowalskiError(
                f"llm_query got {len(answer.answers)} answers for {len(prompts)} prompts")
        return answer.answers

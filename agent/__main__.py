"""The kowalski-agent command (also `python -m kowalski.agent`)."""

from __future__ import annotations

import os
import sys

# OpenSSL reads these each time it loads its default trust store; see run().
_CA_ENVIRONMENT = ("SSL_CERT_FILE", "SSL_CERT_DIR")


def run() -> int:
    """Start the daemon: without TLS settings, with no TLS at all; else without the CA store.

    An agent that neither serves TLS nor trusts a CA of its own never speaks TLS: the ssl
    module (and the OpenSSL libraries asyncio and aiohttp would load with it, about 4 MiB
    of an idle agent) is kept out, and an https callback gets a clear error instead.

    aiohttp builds its default client contexts at import, parsing the whole system CA store
    (about 2 MiB an idle agent never uses). Pointed at nothing while it imports, they stay
    empty; the agent's only client, the llm_query relay, loads the store itself the first
    time a callback is https without a configured CA (see LlmRelay).
    """
    from kowalski.agent.arguments import build_config, needs_tls, parse_args
    from kowalski.common.config import Config
    from kowalski.common.errors import KowalskiError

    args = parse_args(None)
    config: Config | KowalskiError
    try:
        config = build_config(args)
    except KowalskiError as exc:
        config = exc  # main() reports it; with TLS left in, nothing is decided here
    if isinstance(config, Config) and not needs_tls(config.security):
        sys.modules["ssl"] = None  # type: ignore[assignment]
    saved = {name: os.environ.get(name) for name in _CA_ENVIRONMENT}
    for name in _CA_ENVIRONMENT:
        os.environ[name] = os.path.join(os.devnull, "none")
    try:
        from kowalski.agent.main import main
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    return main(parsed=(args, config))


if __name__ == "__main__":
    raise SystemExit(run())

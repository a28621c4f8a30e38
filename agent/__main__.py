"""The kowalski-agent command (also `python -m kowalski.agent`)."""

from __future__ import annotations

import os

# OpenSSL reads these each time it loads its default trust store; see run().
_CA_ENVIRONMENT = ("SSL_CERT_FILE", "SSL_CERT_DIR")


def run() -> int:
    """Start the daemon, with aiohttp imported before any system CA store is loaded.

    aiohttp builds its default client contexts at import, parsing the whole system CA store
    (about 2 MiB an idle agent never uses). Pointed at nothing while it imports, they stay
    empty; the agent's only client, the llm_query relay, loads the store itself the first
    time a callback is https without a configured CA (see LlmRelay).
    """
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
    return main()


if __name__ == "__main__":
    raise SystemExit(run())

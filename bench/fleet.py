"""Many simulated agents in one process: each port answers heartbeats as an agent of its own.

`python -m bench.fleet --port-file F --count N` listens on N ports of 127.0.0.1. The agent
on port P calls itself `sim-P`, and answers GET /v1/heartbeat with a real `Heartbeat`
(its own sequence number, metrics that drift). Requests are checked and answers signed
with the shared secret (KOWALSKI_SECRET) by the agent's own middleware. GET /bench/served
on any port returns how many heartbeats the fleet has answered, so a run can tell the rate
it was really polled at.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

from aiohttp import web

from bench import serving
from kowalski.common import config as config_module
from kowalski.common.config import SecurityConfig
from kowalski.common.http import errors_middleware, sign_responses, signature_middleware
from kowalski.common.messages import Heartbeat, Metrics, encode
from kowalski.common.signing import Verifier

LANGUAGES = ["bash", "java", "javascript", "python", "rust"]
MEMORY_TOTAL_BYTES = 16 << 30
SERVED_PATH = "/bench/served"


class Fleet:
    """The state of every simulated agent, keyed by port."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.seq: dict[int, int] = {}
        self.served = 0
        self._rng = random.Random(1)

    def heartbeat(self, port: int) -> bytes:
        seq = self.seq.get(port, 0)
        self.seq[port] = seq + 1
        self.served += 1
        metrics = Metrics(
            memory_total_bytes=MEMORY_TOTAL_BYTES,
            memory_available_bytes=int(MEMORY_TOTAL_BYTES * self._rng.uniform(0.3, 0.9)),
            cpu_percent=self._rng.uniform(0, 100), cpu_count=8,
            load_1m=1.0, load_5m=1.0, load_15m=1.0)
        return encode(Heartbeat(
            agent_id=f"sim-{port}", name=f"sim-{port}", version="0.1.0",
            started_at=self.started_at, sent_at=time.time(), seq=seq, sandbox_mode="bwrap",
            languages=LANGUAGES, metrics=metrics, jobs_running=0, jobs_queued=0, sessions=0))


def make_app(fleet: Fleet, secret: bytes | None) -> web.Application:
    async def heartbeat(request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sockname[1]) if sockname else 0
        return web.Response(body=fleet.heartbeat(port), content_type="application/json")

    async def served(_request: web.Request) -> web.Response:
        return web.json_response({"served": fleet.served})

    verifier = None if secret is None else Verifier(secret, clock_skew_s=30.0)
    app = web.Application(middlewares=[
        errors_middleware, signature_middleware(verifier, open_paths=frozenset({SERVED_PATH}))])
    sign_responses(app, secret)
    app.router.add_get("/v1/heartbeat", heartbeat)
    app.router.add_get(SERVED_PATH, served)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True, help="simulated agents (ports)")
    args = parser.parse_args(argv)
    # A listening socket and a connection per agent: more than the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.count * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    app = make_app(Fleet(), config_module.read_secret(SecurityConfig()))
    return serving.run(lambda: serving.serve_sites(app, args.count, args.port_file))


if __name__ == "__main__":
    sys.exit(main())

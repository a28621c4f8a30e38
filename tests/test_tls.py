"""TLS between controller and agents, and on the controller's API, with a test CA."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import DEFAULT_MODEL, make_exo_app
from procs import SECRET, AgentProcess

from kowalski.common import errors
from kowalski.common.client import SignedClient
from kowalski.common.config import SecurityConfig
from kowalski.common.messages import DeviceId, Heartbeat, JobRequest
from kowalski.common.tls import client_ssl_context, server_ssl_context

pytestmark = pytest.mark.timeout(90)


@dataclass
class Pki:
    """A throwaway CA and a certificate it issued for 127.0.0.1, as files."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server(self) -> dict[str, object]:
        return {"tls_cert_file": str(self.cert_file), "tls_key_file": str(self.key_file)}

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path / "pki"
    directory.mkdir()
    pki = Pki(ca_file=directory / "ca.pem", cert_file=directory / "cert.pem",
              key_file=directory / "key.pem")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    issued.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(str(pki.cert_file), append=True)
    issued.private_key_pem.write_to_path(str(pki.key_file))
    pki.key_file.chmod(0o600)
    return pki


@pytest.fixture
async def tls_agent(tmp_path: Path, pki: Pki) -> AsyncIterator[AgentProcess]:
    # The CA too: the agent calls the controller back (llm_query) over https.
    agent = AgentProcess(tmp_path, name="tls",
                         security={**pki.server(), "tls_ca_file": str(pki.ca_file)})
    await agent.start()
    yield agent
    assert await agent.stop() == 0, agent.read_log()


def https(agent: AgentProcess) -> str:
    return f"https://127.0.0.1:{agent.port}"


async def test_agent_over_https_is_healthy_and_runs_jobs(
    tls_agent: AgentProcess, pki: Pki, tmp_path: Path,
) -> None:
    config = controller_config([], [], tmp_path, controller={"static_agents": [https(tls_agent)]},
                               security={"tls_ca_file": str(pki.ca_file)})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(
            lambda t: healthy_ids(t) == {tls_agent.agent_id}, timeout_s=15), running.cluster.table
        result = await running.dispatcher.run_job(
            JobRequest(job_id="over-tls", language="python", code="print(6 * 7)"))
        assert (result.status, result.stdout) == ("ok", "42\n")
        assert running.cluster.table.devices[DeviceId(tls_agent.agent_id)].url == https(tls_agent)


async def test_client_without_the_ca_is_refused_and_plain_http_fails(
    tls_agent: AgentProcess, pki: Pki,
) -> None:
    async with aiohttp.ClientSession() as session:
        untrusting = SignedClient(session, secret=SECRET.encode())
        with pytest.raises(errors.NetworkError, match="certificate verify failed"):
            await untrusting.call("GET", https(tls_agent) + "/v1/heartbeat", Heartbeat,
                                  timeout_s=5)
        with pytest.raises(errors.NetworkError):
            await untrusting.call("GET", tls_agent.url + "/v1/heartbeat", Heartbeat,
                                  timeout_s=5)
        # Neither attempt hurt the agent: a client that trusts the CA still gets in.
        trusting = SignedClient(session, secret=SECRET.encode(), ssl=pki.client_context())
        beat = await trusting.call("GET", https(tls_agent) + "/v1/heartbeat", Heartbeat,
                                   timeout_s=5)
        assert beat.agent_id == tls_agent.agent_id


def scripted(body: dict[str, Any]) -> str:
    """A model that asks one sub-question from the REPL, then answers with its reply."""
    messages = body["messages"]
    last = messages[-1]["content"]
    if messages[0]["role"] != "system":
        return "pong over tls"
    if "pong over tls" in last:
        return "FINAL_VAR(note)"
    return "```repl\nnote = llm_query('ping')\nprint(note)\n```"


async def test_controller_api_and_session_callbacks_run_over_https(
    tls_agent: AgentProcess, pki: Pki, tmp_path: Path, aiohttp_server: Any,
) -> None:
    exo = await aiohttp_server(make_exo_app(flavour="v1", models=(DEFAULT_MODEL,),
                                            reply=scripted))
    config = controller_config([], [str(exo.make_url("")).rstrip("/")], tmp_path,
                               controller={"static_agents": [https(tls_agent)]},
                               security={**pki.server(), "tls_ca_file": str(pki.ca_file)})
    async with running_controller(config) as running:
        assert running.base_url.startswith("https://")
        assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1, timeout_s=15)
        async with aiohttp.ClientSession() as session:
            async with session.post(running.base_url + "/v1/runs", ssl=pki.client_context(),
                                    json={"query": "ping it", "context": "x"}) as response:
                assert response.status == 200, await response.text()
                result = await response.json()
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(running.base_url + "/v1/status")
    assert (result["answer"], result["sub_calls"]) == ("pong over tls", 1)


async def test_session_callbacks_over_https_trust_the_system_ca_store(
    pki: Pki, tmp_path: Path, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No tls_ca_file on the agent: its relay loads the system store on the first https
    # callback (kept out of the idle agent), here made of the test CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    agent = AgentProcess(tmp_path, name="system-ca", security=pki.server())
    await agent.start()
    try:
        exo = await aiohttp_server(make_exo_app(flavour="v1", models=(DEFAULT_MODEL,),
                                                reply=scripted))
        config = controller_config([], [str(exo.make_url("")).rstrip("/")], tmp_path,
                                   controller={"static_agents": [https(agent)]},
                                   security={**pki.server(), "tls_ca_file": str(pki.ca_file)})
        async with running_controller(config) as running:
            assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1,
                                                  timeout_s=15)
            async with aiohttp.ClientSession() as session, session.post(
                    running.base_url + "/v1/runs", ssl=pki.client_context(),
                    json={"query": "ping it", "context": "x"}) as response:
                assert response.status == 200, await response.text()
                result = await response.json()
    finally:
        assert await agent.stop() == 0, agent.read_log()
    assert (result["answer"], result["sub_calls"]) == ("pong over tls", 1)


async def test_unreadable_certificates_fail_start_up_with_the_reason(
    tmp_path: Path, pki: Pki,
) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(errors.ConfigError, match="cannot load the TLS certificate"):
        server_ssl_context(SecurityConfig(tls_cert_file=missing, tls_key_file=missing))
    with pytest.raises(errors.ConfigError, match="cannot load the TLS CA bundle"):
        client_ssl_context(SecurityConfig(tls_ca_file=str(pki.cert_file) + ".nope"))
    # A key that does not belong to the certificate.
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "wrong.key"
    other.private_key_pem.write_to_path(str(wrong_key))
    with pytest.raises(errors.ConfigError, match="tls_cert_file"):
        server_ssl_context(SecurityConfig(tls_cert_file=str(pki.cert_file),
                                          tls_key_file=str(wrong_key)))
    agent = AgentProcess(tmp_path, name="badtls",
                         security={"tls_cert_file": missing, "tls_key_file": missing})
    with pytest.raises(RuntimeError, match="cannot load the TLS certificate"):
        await agent.start(timeout_s=10)
    assert agent.process is not None
    assert await agent.process.wait() == 1
    agent.log.close()


async def test_an_agent_without_tls_settings_runs_without_tls_and_says_so_to_https_callbacks(
    pki: Pki, tmp_path: Path, aiohttp_server: Any,
) -> None:
    # No tls_* key at all: the agent leaves the ssl module (and libssl) out, which keeps
    # an idle agent small; a controller that calls back over https gets a clear reason.
    agent = AgentProcess(tmp_path, name="plain")
    await agent.start()
    try:
        assert agent.process is not None
        maps = Path(f"/proc/{agent.process.pid}/maps").read_text()
        assert "libssl" not in maps
        exo = await aiohttp_server(make_exo_app(flavour="v1", models=(DEFAULT_MODEL,),
                                                reply=scripted))
        config = controller_config([], [str(exo.make_url("")).rstrip("/")], tmp_path,
                                   controller={"static_agents": [agent.url]},
                                   rlm={"max_iterations": 1},
                                   security={**pki.server(), "tls_ca_file": str(pki.ca_file)})
        async with running_controller(config) as running:
            assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1,
                                                  timeout_s=15)
            async with aiohttp.ClientSession() as session, session.post(
                    running.base_url + "/v1/runs", ssl=pki.client_context(),
                    json={"query": "ping it", "context": "x", "stream": True}) as response:
                assert response.status == 200, await response.text()
                lines = [line async for line in response.content]
    finally:
        assert await agent.stop() == 0, agent.read_log()
    outputs = [event["output"] for event in map(json.loads, lines)
               if event.get("kind") == "code_executed"]
    assert outputs, lines[-1]
    assert "this agent runs without TLS: it has no security.tls_* setting" in outputs[0]
    assert "security.tls_ca_file" in outputs[0]

"""kowalski-agent's command line and the config it makes, with no networking imported."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from kowalski.common import config as config_module
from kowalski.common.config import Config, SecurityConfig

__all__ = ["build_config", "needs_tls", "parse_args"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kowalski-agent",
        description="The Kowalski agent: runs sandboxed jobs and sessions for a controller.")
    parser.add_argument("-c", "--config", help="config file (TOML); defaults if omitted")
    parser.add_argument("--host", help="override agent.host")
    parser.add_argument("--port", type=int, help="override agent.port (0 picks a free port)")
    parser.add_argument("--name", help="override agent.name")
    parser.add_argument("--work-dir", help="override agent.work_dir")
    parser.add_argument("--no-mdns", action="store_true", help="do not advertise over mDNS")
    parser.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    config = config_module.load(args.config)
    overrides = {
        "host": args.host, "port": args.port, "name": args.name, "work_dir": args.work_dir,
        "advertise_mdns": False if args.no_mdns else None,
    }
    agent = msgspec.structs.replace(
        config.agent, **{key: value for key, value in overrides.items() if value is not None})
    return msgspec.structs.replace(config, agent=agent)


def needs_tls(security: SecurityConfig) -> bool:
    """Whether this agent speaks TLS at all: to serve, or to reach an https controller."""
    return bool(security.tls_cert_file or security.tls_key_file or security.tls_ca_file)

"""The one TOML config file, decoded into frozen structs; every default lives here."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from kowalski.common.errors import ConfigError, ConfigFileError, MissingSecretError
from kowalski.common.messages import LANGUAGES, Language

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]

SECRET_ENV = "KOWALSKI_SECRET"
SECRET_FILE_ENV = "KOWALSKI_SECRET_FILE"
# systemd credentials (LoadCredential=NAME:/path) holding the secret and the API token.
SECRET_CREDENTIAL = "kowalski-secret"
API_TOKEN_CREDENTIAL = "kowalski-api-token"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class AgentConfig(_Section, frozen=True):
    host: str = "0.0.0.0"
    port: Port = 7070
    # Name advertised over mDNS and shown in the device table; empty means the host name.
    name: str = ""
    advertise_mdns: bool = True
    # Address put in the mDNS record; empty means every non-loopback address of the host.
    advertise_address: str = ""
    work_dir: str = "/var/lib/kowalski/jobs"
    max_concurrent_jobs: PositiveInt = 4
    # Jobs waiting for a slot beyond this are refused with 503 + Retry-After.
    max_queued_jobs: Annotated[int, Meta(ge=0)] = 64
    max_sessions: PositiveInt = 16
    # Sessions kept started without a context, for a new one (an RLM run's) to adopt at
    # once; they count against max_sessions. 0 starts every session on demand.
    warm_sessions: Annotated[int, Meta(ge=0)] = 1
    session_idle_timeout_s: PositiveFloat = 900.0
    # Results kept for idempotent job ids (a repeated id returns the first result).
    result_cache_size: PositiveInt = 4096
    max_body_bytes: PositiveInt = 64 * 1024 * 1024
    max_code_bytes: PositiveInt = 1024 * 1024
    shutdown_timeout_s: PositiveFloat = 10.0


class ControllerConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 7080
    discover_mdns: bool = True
    # Agents reached without multicast, as "host:port" or "http(s)://host:port".
    static_agents: list[str] = msgspec.field(default_factory=list)
    heartbeat_interval_s: PositiveFloat = 1.0
    # An agent is unhealthy after this long without a good heartbeat.
    failure_timeout_s: PositiveFloat = 3.0
    heartbeat_timeout_s: PositiveFloat = 1.0
    retry_max_attempts: PositiveInt = 4
    retry_base_delay_ms: PositiveInt = 100
    retry_max_delay_ms: PositiveInt = 5000
    circuit_failure_threshold: PositiveInt = 3
    circuit_reset_s: PositiveFloat = 10.0
    # Penalty per in-flight job, subtracted from a device's score so work spreads.
    load_penalty: NonNegativeFloat = 0.05
    state_dir: str = "~/.local/state/kowalski"
    max_body_bytes: PositiveInt = 64 * 1024 * 1024


class EndpointConfig(_Section, frozen=True):
    """One model server: an exo node or any OpenAI-compatible server."""

    url: str
    # The API key, sent as a Bearer token, read from a file or an environment variable.
    api_key_file: str = ""
    api_key_env: str = ""
    # Models this endpoint serves; empty: what the server itself says it serves.
    models: list[str] = msgspec.field(default_factory=list)
    # Calls in flight at once on this endpoint; 0: no limit of its own.
    max_concurrency: Annotated[int, Meta(ge=0)] = 0


class ExoConfig(_Section, frozen=True):
    # Model servers: base URLs, or tables with a url and per-endpoint settings;
    # empty starts the embedded local model instead.
    endpoints: list[str | EndpointConfig] = msgspec.field(default_factory=list)
    default_model: str = ""
    request_timeout_s: PositiveFloat = 300.0
    connect_timeout_s: PositiveFloat = 5.0
    # A chat whose answer has not begun by then is abandoned and tried elsewhere. A server
    # that answers only once the whole generation is done begins late: hence the default.
    first_byte_timeout_s: PositiveFloat = 300.0
    # After "unsupported model", an endpoint is not asked for that model again for this long.
    unservable_model_s: NonNegativeFloat = 300.0
    # A health probe (connect, first answer, model list) gets this long, whatever
    # request_timeout_s says; past it the endpoint is down until the next probe.
    probe_timeout_s: PositiveFloat = 2.0
    # A probe that took longer than this is logged as a WARNING.
    probe_slow_s: PositiveFloat = 1.0
    poll_interval_s: PositiveFloat = 2.0
    # Place an instance of a model that has none (exo v1 only).
    place_instances: bool = False
    max_concurrency: PositiveInt = 16
    cache_ttl_s: NonNegativeFloat = 600.0
    cache_max_entries: Annotated[int, Meta(ge=0)] = 1024
    # With no endpoints, start the embedded local model (false: run without a model).
    embedded: bool = True
    embedded_threads: PositiveInt = 2
    embedded_context_tokens: PositiveInt = 8192
    embedded_startup_timeout_s: PositiveFloat = 120.0
    # A GGUF file for the embedded server; empty: the SmolLM2 weights package.
    embedded_model_file: str = ""
    # "repl": a grammar holds the embedded model's RLM replies to the REPL protocol's
    # shape; "": free replies. Never sent to the endpoints above.
    embedded_grammar: Literal["repl", ""] = ""

    def endpoint_settings(self) -> list[EndpointConfig]:
        """Every endpoint as a table, plain URLs given default settings."""
        return [e if isinstance(e, EndpointConfig) else EndpointConfig(url=e)
                for e in self.endpoints]


SandboxMode = Literal["bwrap", "rlimit", "none"]
# The languages whose sandboxes can be made ahead of time (an interpreter waits for code).
PoolLanguage = Literal["python"]


class SandboxConfig(_Section, frozen=True):
    # bwrap: bubblewrap + cgroup + rlimits; rlimit: rlimits and process groups only;
    # none: no isolation at all (only when set explicitly).
    mode: SandboxMode = "bwrap"
    memory_limit_mb: PositiveInt = 1024
    pids_limit: PositiveInt = 256
    cpu_time_limit_s: PositiveInt = 300
    # CPU time per wall second a job or session may use (cgroup cpu quota); 1.5 = 1.5 cores.
    cpu_limit_cores: Annotated[float, Meta(gt=0, le=1024)] = 1.0
    file_size_limit_mb: PositiveInt = 64
    open_files_limit: PositiveInt = 256
    tmpfs_size_mb: PositiveInt = 64
    max_output_bytes: PositiveInt = 1_000_000
    unprivileged_uid: Annotated[int, Meta(ge=1)] = 65534
    unprivileged_gid: Annotated[int, Meta(ge=1)] = 65534
    timeout_ms_python: PositiveInt = 30_000
    timeout_ms_bash: PositiveInt = 30_000
    timeout_ms_javascript: PositiveInt = 30_000
    # The run's limit; compiled languages get their compilation's beside it.
    timeout_ms_rust: PositiveInt = 30_000
    timeout_ms_java: PositiveInt = 30_000
    compile_timeout_ms_rust: PositiveInt = 60_000
    compile_timeout_ms_java: PositiveInt = 60_000
    # Interpreter overrides; empty means found on PATH at start-up.
    python_path: str = ""
    node_path: str = ""
    rustc_path: str = ""
    java_path: str = ""
    bash_path: str = ""
    # Sandboxes made ahead of time per pooled language, each used by one job; 0: no pool.
    pool_size: Annotated[int, Meta(ge=0, le=64)] = 2
    pool_languages: list[PoolLanguage] = msgspec.field(default_factory=lambda: ["python"])


class RlmConfig(_Section, frozen=True):
    max_iterations: PositiveInt = 20
    # Sub-calls at this depth are plain LLM calls.
    max_depth: Annotated[int, Meta(ge=0)] = 1
    max_context_length: PositiveInt = 200_000_000
    run_timeout_s: PositiveFloat = 1800.0
    token_budget: PositiveInt = 1_000_000
    # Code output shown back to the model is cut at this many characters.
    max_output_chars: PositiveInt = 20_000
    sub_call_concurrency: PositiveInt = 8
    # The model's window; folding starts at fold_threshold of it.
    context_window_tokens: PositiveInt = 8192
    fold_threshold: Fraction = 0.8
    keep_last_turns: Annotated[int, Meta(ge=1)] = 4
    # Sent as max_tokens on every model call of the loop; a reply cut there is told so.
    max_reply_tokens: PositiveInt = 1024
    trajectory_dir: str = "~/.local/state/kowalski/runs"
    # Model for llm_query sub-calls (the leaves of a run); empty: the run's own model.
    sub_model: str = ""
    # How the system prompt teaches the model to end a run: FINAL(...) lines, or the
    # REPL's `answer` dict; the loop accepts both either way.
    final_protocol: Literal["final", "answer_dict"] = "final"
    # When the controller starts, runs left unfinished by a controller that stopped or died
    # go on by themselves (replayed from their trajectories).
    resume_on_start: bool = True
    # The stored context of a run stopped at its iteration limit waits this long (since the
    # run's file last changed) for `kowalski-ctl runs resume`; 0 keeps it for good.
    keep_contexts_days: Annotated[float, Meta(ge=0)] = 14.0
    # Languages whose blocks run: Python in the session, the rest as jobs beside it.
    languages: list[Language] = msgspec.field(default_factory=lambda: list(LANGUAGES))


class SecurityConfig(_Section, frozen=True):
    # Shared HMAC secret; the environment's KOWALSKI_SECRET / KOWALSKI_SECRET_FILE win.
    secret_file: str = ""
    # Accept unsigned requests (a single trusted host only).
    allow_unsigned: bool = False
    clock_skew_s: PositiveFloat = 30.0
    # Bearer token file for writes to the controller's own API; empty leaves it open.
    api_token_file: str = ""
    # Serve the write API without a token on a non-loopback address (refused otherwise).
    allow_open_api: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # Requests per second and burst per client on job submission and chat.
    rate_limit_per_s: PositiveFloat = 50.0
    rate_limit_burst: PositiveInt = 100


class AlertsConfig(_Section, frozen=True):
    # Where the controller POSTs alert changes as signed JSON; empty sends none.
    webhook_url: str = ""
    # How often the controller looks at the cluster for alerts that began or ended.
    check_interval_s: PositiveFloat = 5.0
    # Queue full: some agent refused work as busy within this window.
    queue_full_window_s: PositiveFloat = 300.0
    # Runs failing: at least this many of the runs held failed, and more than finished.
    runs_failing_min: PositiveInt = 3
    webhook_timeout_s: PositiveFloat = 10.0
    # Attempts per notice, the first one included, with exponential backoff between them.
    webhook_attempts: PositiveInt = 6
    webhook_retry_base_delay_ms: PositiveInt = 500
    webhook_retry_max_delay_ms: PositiveInt = 30_000


class Config(_Section, frozen=True):
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    controller: ControllerConfig = msgspec.field(default_factory=ControllerConfig)
    exo: ExoConfig = msgspec.field(default_factory=ExoConfig)
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)
    rlm: RlmConfig = msgspec.field(default_factory=RlmConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)


_PATH_RE = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def _explain(exc: msgspec.MsgspecError, source: str) -> ConfigError:
    text = str(exc)
    match = _PATH_RE.search(text)
    if match is None:
        return ConfigError(text, path=source)
    key = match.group("path").replace("[", ".").replace("]", "")
    return ConfigError(text[: match.start()], path=source, key=key)


def _check(config: Config, source: str) -> Config:
    """Rules that span fields, which struct types cannot state."""
    controller = config.controller
    if controller.failure_timeout_s < controller.heartbeat_interval_s:
        raise ConfigError(
            "must be at least controller.heartbeat_interval_s", path=source,
            key="controller.failure_timeout_s",
        )
    if controller.retry_max_delay_ms < controller.retry_base_delay_ms:
        raise ConfigError(
            "must be at least controller.retry_base_delay_ms", path=source,
            key="controller.retry_max_delay_ms",
        )
    for index, endpoint in enumerate(config.exo.endpoint_settings()):
        key = f"exo.endpoints.{index}"
        if not endpoint.url.startswith(("http://", "https://")):
            raise ConfigError(
                f"expected an http:// or https:// URL, got {endpoint.url!r}", path=source,
                key=key if isinstance(config.exo.endpoints[index], str) else f"{key}.url",
            )
        if endpoint.api_key_file and endpoint.api_key_env:
            raise ConfigError(
                "set api_key_file or api_key_env, not both", path=source, key=key,
            )
    webhook = config.alerts.webhook_url
    if webhook and not webhook.startswith(("http://", "https://")):
        raise ConfigError(
            f"expected an http:// or https:// URL, got {webhook!r}", path=source,
            key="alerts.webhook_url",
        )
    if config.alerts.webhook_retry_max_delay_ms < config.alerts.webhook_retry_base_delay_ms:
        raise ConfigError(
            "must be at least alerts.webhook_retry_base_delay_ms", path=source,
            key="alerts.webhook_retry_max_delay_ms",
        )
    tls = config.security
    if bool(tls.tls_cert_file) != bool(tls.tls_key_file):
        raise ConfigError(
            "tls_cert_file and tls_key_file go together", path=source, key="security",
        )
    return config


def loads(data: str | bytes, *, source: str = "<string>") -> Config:
    """Decode and check TOML text."""
    try:
        config = msgspec.toml.decode(data, type=Config)
    except msgspec.MsgspecError as exc:
        raise _explain(exc, source) from None
    return _check(config, source)


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load a config file; None gives the defaults."""
    if path is None:
        return Config()
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigFileError(f"cannot read the file: {exc.strerror}", path=str(file)) from None
    return loads(data, source=str(file))


def dumps(config: Config) -> str:
    """Encode a config as TOML (tomli-w writes the values)."""
    return msgspec.toml.encode(config).decode()


def read_secret(security: SecurityConfig) -> bytes | None:
    """The shared secret from the environment, a systemd credential or the configured file."""
    value = os.environ.get(SECRET_ENV)
    if value:
        return value.encode()
    candidates = [os.environ.get(SECRET_FILE_ENV, "")]
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidates.append(os.path.join(credentials, SECRET_CREDENTIAL))
    candidates.append(security.secret_file)
    for candidate in filter(None, candidates):
        return read_secret_file(Path(candidate).expanduser())
    return None


def required_secret(security: SecurityConfig) -> bytes | None:
    """The shared secret a daemon needs; None only where unsigned requests are allowed."""
    secret = read_secret(security)
    if secret is None and not security.allow_unsigned:
        raise MissingSecretError(
            "no shared secret: set KOWALSKI_SECRET or KOWALSKI_SECRET_FILE, "
            "security.secret_file, or security.allow_unsigned = true on a trusted host",
            key="security.secret_file")
    return secret


def read_api_token(security: SecurityConfig) -> bytes | None:
    """The controller API's bearer token: a systemd credential, else the configured file."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (credential := Path(credentials, API_TOKEN_CREDENTIAL)).exists():
        return read_secret_file(credential)
    if security.api_token_file:
        return read_secret_file(Path(security.api_token_file).expanduser())
    return None


def read_secret_file(path: Path) -> bytes:
    """A secret from a file that only its owner can read, at least 16 bytes long."""
    try:
        info = path.stat()
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file: {exc.strerror}", path=str(path)) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"secret file is readable by others (mode {stat.filemode(info.st_mode)}); "
            "run chmod 600 on it",
            path=str(path),
        )
    if len(secret) < 16:
        raise ConfigError("secret is shorter than 16 bytes", path=str(path))
    return secret

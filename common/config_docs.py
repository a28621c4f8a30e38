"""What each config key means, and the commented default file made from it."""

from __future__ import annotations

import textwrap
from typing import Any

import msgspec
import tomli_w

from kowalski.common.config import SECRET_ENV, SECRET_FILE_ENV, Config

SECTIONS: dict[str, str] = {
    "agent": "The daemon on every exo node (kowalski-agent).",
    "controller": "The controller (kowalski-ctl): discovery, health, routing, its HTTP API.",
    "exo": "exo endpoints; with none, the controller starts the embedded local model.",
    "sandbox": "How the agent isolates code jobs.",
    "rlm": "The Recursive Language Model loop.",
    "security": "Request signing, tokens, TLS and rate limits.",
    "alerts": "Alert notices from the controller to a webhook (the Prometheus rules' events).",
}

KEYS: dict[str, str] = {
    "agent.host": "Address the agent's HTTP API listens on.",
    "agent.port": "Port of the agent's HTTP API (0 picks a free one).",
    "agent.name": "Name shown in the device table; empty means the host name.",
    "agent.advertise_mdns": "Advertise the agent as _kowalski._tcp over mDNS.",
    "agent.advertise_address": ("Address put in the mDNS record; empty means every address a "
                                "peer can reach: the bound one, or all but loopback."),
    "agent.work_dir": "Where per-job directories are made.",
    "agent.max_concurrent_jobs": "Jobs run at once; more wait in the queue.",
    "agent.max_queued_jobs": "Jobs waiting beyond this are refused with 503 and Retry-After.",
    "agent.max_sessions": "Persistent Python sessions alive at once, warm ones counted.",
    "agent.warm_sessions": ("Sessions kept started without a context, so that a new session "
                            "(an RLM run's) adopts one at once; 0 starts each on demand."),
    "agent.session_idle_timeout_s": "A session unused this long is ended.",
    "agent.result_cache_size": "Finished job results kept so a repeated job id is not run twice.",
    "agent.max_body_bytes": "Largest request body accepted (contexts travel in bodies).",
    "agent.max_code_bytes": "Largest code in one job or cell.",
    "agent.shutdown_timeout_s": "How long a stop waits for running jobs.",
    "controller.host": "Address the controller's HTTP API and dashboard listen on.",
    "controller.port": "Port of the controller's HTTP API and dashboard.",
    "controller.discover_mdns": "Find agents over mDNS.",
    "controller.static_agents": 'Agents reached without multicast: ["host:port", ...].',
    "controller.heartbeat_interval_s": "How often each agent is asked for its heartbeat.",
    "controller.failure_timeout_s": "An agent is unhealthy after this long with no heartbeat.",
    "controller.heartbeat_timeout_s": "How long one heartbeat request may take.",
    "controller.retry_max_attempts": "Attempts for a job or call before its error is final.",
    "controller.retry_base_delay_ms": "First retry delay; it doubles per attempt, with jitter.",
    "controller.retry_max_delay_ms": "Cap on one retry delay.",
    "controller.circuit_failure_threshold": "Failures in a row that open a device's circuit.",
    "controller.circuit_reset_s": "How long a circuit stays open before one probe is let through.",
    "controller.load_penalty": (
        "Score taken off a device (or exo endpoint) per call in flight, so work spreads."),
    "controller.state_dir": "Where the controller keeps journals and run logs.",
    "controller.max_body_bytes": "Largest request body the controller's API accepts.",
    "exo.endpoints": 'Model servers (exo or any OpenAI-compatible server): URLs, e.g. '
                     '["http://10.0.0.5:52415"], or `[[exo.endpoints]]` tables (see below).',
    "exo.default_model": "Model used when a request names none; empty picks a ready one.",
    "exo.request_timeout_s": "Total time one model call may take.",
    "exo.connect_timeout_s": "Time to connect to an exo endpoint.",
    "exo.first_byte_timeout_s": "A chat with no answer begun by then is tried on another "
                                "endpoint; lower it (e.g. 20) for exo v0 clusters, whose "
                                "nodes hang while a peer is lost.",
    "exo.unservable_model_s": "An endpoint that called a model unsupported is not asked for "
                              "it again for this long.",
    "exo.probe_timeout_s": "Time a background health probe may take; then the endpoint is down.",
    "exo.probe_slow_s": "A health probe slower than this is logged as a WARNING.",
    "exo.poll_interval_s": ("How often each endpoint is probed: exo v1's readiness and node "
                            "sub-trees of /state, exo v0's /v1/topology, an OpenAI-compatible "
                            "server's /v1/models."),
    "exo.place_instances": "Place an instance of a model that has none (exo v1).",
    "exo.max_concurrency": ("A batch's model calls in flight at once (`batch --concurrency` "
                            "overrides it), and the capacity assumed for an endpoint with no "
                            "`max_concurrency` of its own when sub-calls are spread."),
    "exo.cache_ttl_s": "How long an identical call's result is reused (0 disables).",
    "exo.cache_max_entries": "Results kept in the call cache (0 disables).",
    "exo.embedded": "With no endpoints, start the embedded local model (SmolLM2-135M).",
    "exo.embedded_threads": "CPU threads for the embedded model.",
    "exo.embedded_context_tokens": "Context window of the embedded model.",
    "exo.embedded_startup_timeout_s": "How long the embedded model may take to start.",
    "exo.embedded_model_file": "A GGUF file the embedded server loads instead of SmolLM2-135M.",
    "exo.embedded_grammar": ('"repl": the embedded model\'s RLM replies follow a grammar (a '
                             'little prose, then one ```repl block or a FINAL line); "": free.'),
    "sandbox.mode": '"bwrap" (bubblewrap + cgroup + rlimits), "rlimit", or "none".',
    "sandbox.memory_limit_mb": "Memory of one job or session (cgroup).",
    "sandbox.pids_limit": "Processes and threads of one job or session (cgroup).",
    "sandbox.cpu_time_limit_s": "CPU seconds of one process (RLIMIT_CPU).",
    "sandbox.cpu_limit_cores": "Cores one job or session may keep busy (cgroup CPU quota).",
    "sandbox.file_size_limit_mb": "Largest file a job may write (RLIMIT_FSIZE).",
    "sandbox.open_files_limit": "Open files of one process (RLIMIT_NOFILE).",
    "sandbox.tmpfs_size_mb": "Size of the job's private /tmp.",
    "sandbox.max_output_bytes": "stdout and stderr kept per job; more is cut and flagged.",
    "sandbox.unprivileged_uid": "User id jobs run as inside the sandbox.",
    "sandbox.unprivileged_gid": "Group id jobs run as inside the sandbox.",
    "sandbox.timeout_ms_python": "Default time limit of a Python job.",
    "sandbox.timeout_ms_bash": "Default time limit of a bash job.",
    "sandbox.timeout_ms_javascript": "Default time limit of a JavaScript job.",
    "sandbox.timeout_ms_rust": "Default time limit of a Rust job's run (compilation apart).",
    "sandbox.timeout_ms_java": "Default time limit of a Java job's run (compilation apart).",
    "sandbox.compile_timeout_ms_rust": "Time limit of compiling a Rust job, before its run.",
    "sandbox.compile_timeout_ms_java": "Time limit of compiling a Java job, before its run.",
    "sandbox.python_path": "Python for jobs; empty finds python3 on the system PATH.",
    "sandbox.node_path": "Node.js for JavaScript jobs; empty finds node.",
    "sandbox.rustc_path": "rustc for Rust jobs; empty finds rustc.",
    "sandbox.java_path": "java for Java jobs; empty finds java.",
    "sandbox.bash_path": "bash for shell jobs; empty finds bash.",
    "sandbox.pool_size": ("Ready sandboxes kept per pooled language (each serves one job, then "
                          "is destroyed); 0 turns the pool off."),
    "sandbox.pool_languages": "Languages whose jobs may take a ready sandbox (python only).",
    "rlm.max_iterations": "Model turns before the loop asks for a final answer.",
    "rlm.max_depth": "Nesting of llm_query sub-calls; at this depth they are plain calls.",
    "rlm.max_context_length": "Largest context, in characters.",
    "rlm.run_timeout_s": "Wall-clock limit of one run; it stops there, without an answer.",
    "rlm.token_budget": "Tokens one run may use, sub-calls included.",
    "rlm.max_output_chars": "Code output shown back to the model is cut here, with a marker.",
    "rlm.sub_call_concurrency": "llm_query_batched prompts in flight at once.",
    "rlm.context_window_tokens": "The model's window, used to decide when to fold.",
    "rlm.fold_threshold": "Fraction of the window at which older turns are folded.",
    "rlm.keep_last_turns": "Recent turns never folded.",
    "rlm.max_reply_tokens": "Most tokens of one model reply in the loop; a cut reply is told so.",
    "rlm.trajectory_dir": "Where each run's JSONL trajectory is written.",
    "rlm.sub_model": "Model answering llm_query sub-calls (the leaves); empty: the run's model.",
    "rlm.final_protocol": ("How the system prompt teaches ending a run: \"final\" (FINAL lines) "
                           "or \"answer_dict\" (the REPL's answer dict); both are accepted."),
    "rlm.resume_on_start": ("At start, runs a stopped or dead controller left unfinished go on "
                            "by themselves (docs/RLM.md, Durable runs)."),
    "rlm.keep_contexts_days": ("Days the stored context of a run stopped at its iteration limit "
                               "is kept for `runs resume`; 0: for good."),
    "rlm.languages": ("Languages whose code blocks run: Python in the run's session, the others "
                      "as one-shot jobs on its agent; blocks in the rest get a note."),
    "security.secret_file": "Shared HMAC secret (chmod 600); KOWALSKI_SECRET(_FILE) win.",
    "security.allow_unsigned": "Accept unsigned requests: only for a single trusted host.",
    "security.clock_skew_s": "How far a signed request's clock may be off.",
    "security.api_token_file": "Bearer token for writes to the controller API; empty: open.",
    "security.allow_open_api": "Start without an API token on a non-loopback address.",
    "security.tls_cert_file": "TLS certificate (PEM) for the HTTP API; empty: plain HTTP.",
    "security.tls_key_file": "TLS private key (PEM).",
    "security.tls_ca_file": "CA bundle to verify agents' certificates.",
    "security.rate_limit_per_s": "Requests per second per client on jobs and chat.",
    "security.rate_limit_burst": "Burst allowed above that rate.",
    "alerts.webhook_url": "URL the controller POSTs signed JSON alert changes to; empty: off.",
    "alerts.check_interval_s": "How often the controller checks for alerts that begin or end.",
    "alerts.queue_full_window_s": "Queue full fires while an agent refused work within this.",
    "alerts.runs_failing_min": "Runs failing fires at this many failed runs, more than finished.",
    "alerts.webhook_timeout_s": "Time one webhook call may take.",
    "alerts.webhook_attempts": "Attempts per notice, the first included, with backoff.",
    "alerts.webhook_retry_base_delay_ms": "First wait between webhook attempts; doubles.",
    "alerts.webhook_retry_max_delay_ms": "Longest wait between webhook attempts.",
}


ENDPOINT_TABLE = [
    "An entry of `exo.endpoints` may be a table instead of a URL, for settings of its own. "
    "The API key is never written in the file: it is read from a file or an environment "
    "variable and sent as `Authorization: Bearer KEY`.",
    "",
    "```toml",
    "[[exo.endpoints]]",
    'url = "https://llm.example.com"    # required',
    'api_key_file = "~/.config/kowalski/llm.key"   # or api_key_env = "LLM_API_KEY"',
    'models = ["qwen2.5-7b-instruct"]   # served here; empty: what the server lists',
    "max_concurrency = 4                # calls in flight here; 0: no limit of its own",
    "```",
]


def render_commented(config: Config | None = None) -> str:
    """The config as TOML, each section and key with its description as a comment."""
    config = config or Config()
    builtins: dict[str, Any] = msgspec.to_builtins(config)
    lines = ["# Kowalski configuration. Every key is optional; shown with its default.", ""]
    for section, values in builtins.items():
        lines.append(f"# {SECTIONS[section]}")
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"# {KEYS[f'{section}.{key}']}")
            lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
        lines.append("")
    return "\n".join(lines)



def render_markdown() -> str:
    """docs/CONFIGURATION.md: one table per section, types and defaults read from the structs."""
    inspect = msgspec.inspect

    def type_text(kind: inspect.Type) -> str:
        if isinstance(kind, inspect.LiteralType):
            return "one of " + ", ".join(f'`"{value}"`' for value in kind.values)
        if isinstance(kind, inspect.ListType) and isinstance(kind.item_type,
                                                             inspect.LiteralType):
            return "list of " + ", ".join(f'`"{value}"`' for value in kind.item_type.values)
        if isinstance(kind, inspect.ListType):
            return f"list of {type_text(kind.item_type)}s"
        if isinstance(kind, inspect.IntType | inspect.FloatType):
            name = "integer" if isinstance(kind, inspect.IntType) else "number"
            low = kind.ge if kind.ge is not None else kind.gt
            if low is not None and kind.le is not None:
                return f"{name}, {low:g} to {kind.le:g}"
            if kind.gt is not None:
                return f"{name} > {kind.gt:g}"
            return f"{name} ≥ {kind.ge:g}" if kind.ge is not None else name
        if isinstance(kind, inspect.BoolType):
            return "boolean"
        if isinstance(kind, inspect.StrType):
            return "string"
        if isinstance(kind, inspect.UnionType):
            return " or ".join(type_text(t) for t in kind.types)
        if isinstance(kind, inspect.StructType):
            return "table"
        raise TypeError(f"no description for the config type {kind!r}")

    def default_text(field: inspect.Field) -> str:
        value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
        dumped = tomli_w.dumps({'key': value}).strip().removeprefix('key = ')
        # tomli_w puts a list's items on lines of their own; a table cell needs one line.
        one_line = " ".join(line.strip() for line in dumped.splitlines())
        text = f"`{one_line.replace('[ ', '[').replace(', ]', ']')}`"
        if field.name.endswith("_bytes") and value >= 1024 * 1024:
            text += f" ({value / (1024 * 1024):g} MiB)"
        return text

    def paragraph(text: str) -> list[str]:
        return [*textwrap.wrap(text, width=90, break_long_words=False,
                               break_on_hyphens=False), ""]

    config = inspect.type_info(Config)
    assert isinstance(config, inspect.StructType)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the config structs (common/config.py) and their descriptions",
        "     (common/config_docs.py) by kowalski.common.config_docs.render_markdown().",
        "     Edit those, then regenerate; tests/test_docs.py fails while the two differ. -->",
        "",
        *paragraph(
            "Kowalski reads one TOML file: `kowalski-agent --config FILE` and `kowalski-ctl "
            "--config FILE ...` (the systemd units use `/etc/kowalski/kowalski.toml`). Every "
            "key is optional; without a file, every key has its default. Unknown sections "
            "and keys are errors, so a misspelt key is reported rather than ignored, and an "
            "error names the file and the key (for example `kowalski.toml:sandbox.mode`)."),
        "```sh",
        "kowalski-ctl config init /etc/kowalski/kowalski.toml   # every key, commented",
        "kowalski-ctl config validate /etc/kowalski/kowalski.toml",
        "```",
        "",
        *paragraph(
            "Units are in the key's name: `_s` seconds, `_ms` milliseconds, `_mb` megabytes "
            "(MiB), `_bytes` bytes. A number may be written with or without a decimal "
            "point. Paths may start with `~`."),
        "Rules that span keys, also checked by `config validate`:",
        "",
        "- `controller.failure_timeout_s` is at least `controller.heartbeat_interval_s`;",
        "- `controller.retry_max_delay_ms` is at least `controller.retry_base_delay_ms`;",
        "- every `exo.endpoints` entry is an `http://` or `https://` URL;",
        "- an endpoint table sets `api_key_file` or `api_key_env`, not both;",
        "- `alerts.webhook_url`, when set, is an `http://` or `https://` URL, and",
        "  `alerts.webhook_retry_max_delay_ms` is at least `alerts.webhook_retry_base_delay_ms`;",
        "- `security.tls_cert_file` and `security.tls_key_file` are set together.",
        "",
        *paragraph(
            "The shared secret is read from, in order: the environment variable "
            f"`{SECRET_ENV}` (the secret itself), the file named by `{SECRET_FILE_ENV}`, "
            "the systemd credential `kowalski-secret` (`LoadCredential=`), then "
            "`security.secret_file`. The controller's API token is read from the systemd "
            "credential `kowalski-api-token`, then `security.api_token_file`. Secret and "
            "token files must be private (`chmod 600`) and hold at least 16 bytes."),
        "Sections: " + " · ".join(f"[{field.name}](#{field.name})" for field in config.fields),
    ]
    for section in config.fields:
        struct = section.type
        assert isinstance(struct, inspect.StructType)
        lines += ["", f"## {section.name}", "", SECTIONS[section.name], "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{field.name}` | {type_text(field.type)} | {default_text(field)} "
                  f"| {KEYS[f'{section.name}.{field.name}']} |" for field in struct.fields]
        if section.name == "exo":
            lines += ["", *ENDPOINT_TABLE]
    return "\n".join(lines) + "\n"

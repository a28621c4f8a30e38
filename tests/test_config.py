"""Config decoding: defaults, the example file, and errors that name the key path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kowalski.common import config
from kowalski.common.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_empty_file_gives_every_default() -> None:
    assert config.loads("") == config.Config()


def test_example_file_parses_and_shows_every_key() -> None:
    example = config.load(ROOT / "config.example.toml")
    text = (ROOT / "config.example.toml").read_text()
    for section in config.Config.__struct_fields__:
        assert f"[{section}]" in text
        for key in getattr(example, section).__struct_fields__:
            assert f"\n{key} =" in text or f"\n# {key} =" in text, f"{section}.{key} not shown"


def test_dumps_round_trips() -> None:
    original = config.loads('[agent]\nport = 9000\n[exo]\nendpoints = ["http://a:52415"]\n')
    assert config.loads(config.dumps(original)) == original


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        ('[agent]\nport = "x"', "agent.port", "Expected `int`, got `str`"),
        ("[agent]\nport = 70000", "agent.port", "<= 65535"),
        ('[sandbox]\nmode = "docker"', "sandbox.mode", "Invalid enum value 'docker'"),
        ("[controller]\nstatic_agents = [1]", "controller.static_agents.0", "Expected `str`"),
        ('[exo]\nendpoints = ["ftp://x"]', "exo.endpoints.0", "http:// or https://"),
        ("[agent]\nprot = 1", "agent", "unknown field `prot`"),
        ("[rlm]\nmax_iterations = 0", "rlm.max_iterations", ">= 1"),
        ("[rlm]\nfold_threshold = 1.5", "rlm.fold_threshold", "<= 1"),
        (
            "[controller]\nheartbeat_interval_s = 5.0\nfailure_timeout_s = 1.0",
            "controller.failure_timeout_s",
            "at least controller.heartbeat_interval_s",
        ),
        ('[security]\ntls_cert_file = "c.pem"', "security", "go together"),
    ],
)
def test_bad_values_name_file_and_key_path(text: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.loads(text, source="kowalski.toml")
    assert caught.value.key == key
    assert str(caught.value).startswith(f"kowalski.toml:{key}:")
    assert says in str(caught.value)


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown field `agnet`"):
        config.loads("[agnet]\nport = 1", source="k.toml")


def test_toml_syntax_error_names_file_and_line() -> None:
    with pytest.raises(ConfigError, match=r"k\.toml: .*line 2"):
        config.loads("[agent]\nport = = 1\n", source="k.toml")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        config.load(tmp_path / "absent.toml")


def test_secret_from_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.SECRET_ENV, "s" * 32)
    assert config.read_secret(config.SecurityConfig(secret_file="/nonexistent")) == b"s" * 32


def test_secret_file_readable_by_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config.SECRET_ENV, raising=False)
    monkeypatch.delenv(config.SECRET_FILE_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    secret = tmp_path / "secret"
    secret.write_text("x" * 32)
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.read_secret(config.SecurityConfig(secret_file=str(secret)))
    os.chmod(secret, 0o600)
    assert config.read_secret(config.SecurityConfig(secret_file=str(secret))) == b"x" * 32


def test_systemd_credential_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.SECRET_ENV, raising=False)
    monkeypatch.delenv(config.SECRET_FILE_ENV, raising=False)
    credential = tmp_path / "kowalski-secret"
    credential.write_text("c" * 40 + "\n")
    credential.chmod(0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.read_secret(config.SecurityConfig()) == b"c" * 40


def test_short_secret_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.SECRET_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    monkeypatch.setenv(config.SECRET_FILE_ENV, str(short))
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        config.read_secret(config.SecurityConfig())


def test_every_key_has_a_description() -> None:
    from kowalski.common.config_docs import KEYS, SECTIONS

    expected = {
        f"{section}.{key}"
        for section in config.Config.__struct_fields__
        for key in getattr(config.Config(), section).__struct_fields__
    }
    assert set(KEYS) == expected
    assert set(SECTIONS) == set(config.Config.__struct_fields__)


def test_example_file_is_the_generated_default() -> None:
    from kowalski.common.config_docs import render_commented

    assert (ROOT / "config.example.toml").read_text() == render_commented()


def test_cli_config_init_then_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from kowalski.controller.cli.main import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, main

    target = tmp_path / "kowalski.toml"
    assert main(["config", "init", str(target)]) == EXIT_OK
    assert main(["config", "init", str(target)]) == EXIT_USAGE
    for name in ("KOWALSKI_SECRET", "KOWALSKI_SECRET_FILE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    # The file is fine, but serve would stop for want of a secret: so does validate.
    assert main(["config", "validate", str(target)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert f"{target}: valid" in out
    assert "no shared secret" in err
    assert "head -c 32 /dev/urandom" in err
    monkeypatch.setenv("KOWALSKI_SECRET", "s" * 32)
    assert main(["config", "validate", str(target)]) == EXIT_OK
    target.write_text("[agent]\nport = -1\n")
    assert main(["config", "validate", str(target)]) == EXIT_CONFIG

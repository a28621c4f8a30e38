"""The installed package: one kowalski namespace, no bare top-level modules."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import kowalski.common.config

SITE = Path(sysconfig.get_paths()["purelib"])


def test_the_three_parts_install_under_the_kowalski_namespace() -> None:
    if SITE not in Path(kowalski.common.config.__file__).resolve().parents:
        pytest.skip("running from the source tree, not from an installed package")
    for part in ("agent", "controller", "common"):
        assert (SITE / "kowalski" / part / "__init__.py").is_file()
        # A bare top-level module would shadow other packages' `common` or `agent`.
        assert not (SITE / part).exists(), f"{SITE / part} is installed at top level"
    assert (SITE / "kowalski" / "controller" / "api" / "static" / "index.html").is_file()
    # Every subpackage of the source tree is listed in pyproject.toml and so installed.
    source = Path(__file__).resolve().parent.parent
    for init in source.glob("*/**/__init__.py"):
        relative = init.relative_to(source)
        if relative.parts[0] in ("agent", "controller", "common"):
            assert (SITE / "kowalski" / relative).is_file(), f"{relative} is not installed"
    assert (SITE / "kowalski" / "agent" / "repl_driver.py").is_file()


def test_import_works_outside_the_source_tree(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import kowalski.common.config, kowalski.agent.main, "
         "kowalski.controller.cli.main; print('ok')"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout == "ok\n", result.stderr


@pytest.mark.parametrize("command", ["kowalski-agent", "kowalski-ctl"])
def test_entry_points_answer_help(command: str) -> None:
    script = Path(sys.executable).parent / command
    if not script.exists():
        pytest.skip(f"{command} is not installed next to this Python")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_agent_and_controller_report_the_version_in_pyproject() -> None:
    import tomllib

    from kowalski.agent import app as agent_app
    from kowalski.controller.api import state as controller_state

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert agent_app.VERSION == controller_state.VERSION == declared

"""The benchmark harness runs end to end at tiny sizes: a smoke run, no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SECTIONS = {"roundtrip", "languages", "sandbox_steps", "rlm", "batch", "failover",
                    "scale"}

pytestmark = pytest.mark.timeout(300)


def run_harness(tmp_path: Path, only: str, timeout_s: float = 280
                ) -> tuple[dict[str, Any], str]:
    """Run `python -m bench.run --quick --only ...`; the JSON figures and the Markdown."""
    report, figures = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", only, "--output", str(report),
         "--json", str(figures)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(figures.read_text()), report.read_text()


def check_section(section: dict[str, Any]) -> None:
    """A section that ran has its tables, finite figures and a verdict for every target."""
    assert not section["error"], section["error"]
    assert section["method"]
    assert section["tables"]
    assert all(table["rows"] for table in section["tables"])
    for target in section["targets"]:
        assert math.isfinite(target["measured"]), target
        assert target["met"] == (target["measured"] <= target["limit"]
                                 if target["comparison"] == "<="
                                 else target["measured"] < target["limit"])
    for name, samples in section["raw"].items():
        assert samples, name
        assert all(math.isfinite(value) for value in samples), name


def test_quick_run_measures_every_cluster_benchmark_and_writes_the_report(
        tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, ",".join(
        ["roundtrip", "rlm", "batch", "failover", "scale"]))
    sections = {section["key"]: section for section in figures["sections"]}
    assert set(sections) == CLUSTER_SECTIONS
    for section in sections.values():
        check_section(section)
    names = {target["name"] for section in sections.values() for target in section["targets"]}
    assert {"warm session cell p50", "overhead per iteration p50", "cold batch wall / ideal",
            "kill → unhealthy p50", "idle agent RSS"} <= names
    languages = sections["languages"]["tables"][0]["rows"]
    assert [row[0] for row in languages][:2] == ["python", "bash"]
    assert report.startswith("# Benchmarks\n")
    assert "`python -m bench.run --quick --only roundtrip,rlm,batch,failover,scale`" in report
    assert "| cpu |" in report
    assert "| kernel |" in report
    for section in sections.values():
        assert f". {section['title']}\n" in report
    assert figures["quick"] is True


@pytest.mark.model
def test_quick_run_of_the_embedded_model_compares_router_and_direct(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "embedded")
    (section,) = figures["sections"]
    if section["skipped"]:
        pytest.skip(section["skipped"])
    check_section(section)
    assert all(value > 0 for value in section["raw"]["direct tokens/s"])
    assert all(value > 0 for value in section["raw"]["routed tokens/s"])
    assert "router / direct (p50 over p50)" in report


@pytest.mark.model
@pytest.mark.timeout(1500)
def test_quick_run_of_the_demo_and_the_grammar_reports_times_and_rates(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "demo,grammar", timeout_s=1450)
    sections = {section["key"]: section for section in figures["sections"]}
    assert set(sections) == {"demo", "grammar"}
    for section in sections.values():
        if section["skipped"]:
            pytest.skip(section["skipped"])
        check_section(section)
    demo = sections["demo"]
    assert {target["name"] for target in demo["targets"]} == {
        "demo first token after model load p50", "demo total time max"}
    (load_s,) = demo["raw"]["model loaded s"]
    (total_s,) = demo["raw"]["total s"]
    assert 0 < load_s < total_s
    grammar = sections["grammar"]["tables"][0]["rows"]
    assert [row[0] for row in grammar] == ["free (no grammar, the baseline)", "REPL grammar"]
    assert all(row[1] in ("0/1", "1/1") for row in grammar)
    assert "The demo, end to end" in report


@pytest.mark.netns
def test_quick_run_of_mdns_discovery_files_every_agent_at_its_own_address(
        tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "mdns")
    (section,) = figures["sections"]
    if section["skipped"]:
        pytest.skip(section["skipped"])
    check_section(section)
    wrong = next(t for t in section["targets"] if t["name"] == "rows filed at a wrong address")
    assert wrong["measured"] == 0
    assert all(value > 0 for value in section["raw"]["listening → healthy (s)"])
    assert "agent listening → its row healthy" in report


def test_quick_run_of_compression_times_every_encoding(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "compression")
    [section] = figures["sections"]
    check_section(section)
    rows = section["tables"][0]["rows"]
    assert [row[1] for row in rows if row[0] == "loopback"] == ["plain", "zstd", "gzip"]
    sizes = {row[1]: float(row[2]) for row in rows if row[0] == "loopback"}
    assert sizes["zstd"] < sizes["plain"] / 2
    assert sizes["gzip"] < sizes["plain"] / 2
    assert "plain and compressed" in report


def test_quick_run_of_the_hostile_fault_benchmarks(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "hung_endpoint,resumed_agent")
    sections = {section["key"]: section for section in figures["sections"]}
    assert set(sections) == {"hung_endpoint", "resumed_agent"}
    for section in sections.values():
        check_section(section)
    names = {target["name"] for section in sections.values() for target in section["targets"]}
    assert names == {"spawn → first API answer beside a hung endpoint p50",
                     "fresh job on an agent just resumed from SIGSTOP p50"}
    assert "Controller start beside a hung exo endpoint" in report


def test_quick_run_of_state_polling_reads_less_with_sub_trees(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "state_polling")
    [section] = figures["sections"]
    check_section(section)
    raw = section["raw"]
    # Most of a 4-node state is `downloads`, which the sub-tree poll leaves on the server.
    assert max(raw["sub-tree bytes"]) * 10 < min(raw["whole state bytes"])
    assert "whole /state vs. its sub-trees" in report


def test_quick_run_of_the_sub_call_fan_out_over_endpoints(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "fanout")
    [section] = figures["sections"]
    check_section(section)
    assert {target["name"] for target in section["targets"]} == {
        "4 endpoints: time / (1 endpoint's ÷ 4)", "slow endpoint's share / its share by speed"}
    scaling, shares = section["tables"]
    assert [row[0] for row in scaling["rows"]] == ["1", "2", "4"]
    assert [row[1] for row in shares["rows"]] == ["50", "50", "50", "250"]
    assert "Sub-calls of one run over several endpoints" in report


def test_quick_run_of_the_batch_outage_fails_no_item(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "batch_outage")
    [section] = figures["sections"]
    check_section(section)
    [target] = section["targets"]
    assert target["measured"] == 0
    calm_s, stormy_s = section["raw"]["wall s (no outage, outage)"]
    assert stormy_s > calm_s + section["raw"]["down s"][0]
    assert "model outage in a 100-item batch" in report

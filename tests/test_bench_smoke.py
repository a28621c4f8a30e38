"""The benchmark harness runs end to end at tiny sizes: a smoke run, no timing is asserted."""

from __future__ import annotations

import json
import math
import shutil
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


def test_rendering_the_stored_results_is_stable_and_keeps_every_section(
        tmp_path: Path) -> None:
    first, second = tmp_path / "first.md", tmp_path / "second.md"
    for output in (first, second):
        subprocess.run([sys.executable, "-m", "bench.run", "--render", "--output", str(output)],
                       cwd=REPO_ROOT, check=True, capture_output=True, timeout=60)
    assert first.read_text() == second.read_text()
    assert first.read_text() == (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    stored = sorted((REPO_ROOT / "bench" / "results").glob("*.json"))
    titles = [section["title"] for path in stored
              for section in json.loads(path.read_text())["sections"]]
    assert len(titles) >= len(stored) > 0
    assert all(f". {title}\n" in first.read_text() for title in titles)


def test_an_only_run_replaces_its_stored_result_and_keeps_the_others(tmp_path: Path) -> None:
    results, report = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    shutil.copytree(REPO_ROOT / "bench" / "results", results)
    kept = {path.name: path.read_text() for path in results.glob("*.json")
            if path.stem != "state_polling"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "state_polling", "--results",
         str(results), "--output", str(report)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert {path.name: path.read_text() for path in results.glob("*.json")
            if path.stem != "state_polling"} == kept
    fresh = json.loads((results / "state_polling.json").read_text())
    assert fresh["key"] == "state_polling"
    assert fresh["command"] == "python -m bench.run --only state_polling"
    [section] = fresh["sections"]
    check_section(section)
    assert "legacy_markdown" not in section
    text = report.read_text()
    for name, content in kept.items():
        for stored in json.loads(content)["sections"]:
            assert f". {stored['title']}\n" in text, name
    assert "by `python -m bench.run --only state_polling`" in text
    assert "| sections measured |" in text


def test_a_quick_run_stores_nothing(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "state_polling", "--results",
         str(results), "--output", str(tmp_path / "quick.md")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not results.exists()
    assert "This is a --quick run" in (tmp_path / "quick.md").read_text()


def test_quick_run_of_the_session_flood_ends_every_cell_at_the_output_limit(
        tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "session_flood")
    [section] = figures["sections"]
    check_section(section)
    codes = {row[0]: int(row[1]) for row in section["tables"][1]["rows"]}
    assert codes == {"output_limit": 16}
    peak = next(t for t in section["targets"] if t["name"].startswith("agent peak RSS"))
    idle = float(section["tables"][0]["rows"][0][1])
    assert peak["measured"] > idle > 0
    assert "'42'" in report


def test_quick_run_of_the_side_by_side_measures_the_kowalski_half(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "peer")
    [section] = figures["sections"]
    assert not section["error"], section["error"]
    rows = section["tables"][0]["rows"]
    assert [row[0][:3] for row in rows] == ["(a)", "(b)", "(c)"]
    assert all(float(row[1]) > float(row[2]) > 0 for row in rows)
    names = {target["name"] for target in section["targets"]}
    assert "200-prompt fan-out cell / ideal" in names
    fan_out = next(t for t in section["targets"] if t["name"].startswith("200-prompt"))
    # 200 sub-calls of 50 ms, 16 at a time, cannot take less than 13 waves of 50 ms.
    assert fan_out["measured"] >= 0.65 / 0.625 - 0.01
    if section["skipped"]:
        assert "reference did not run" in section["skipped"]
    else:
        assert "per iteration: Kowalski / reference" in names
        assert all(row[3] for row in rows)
    assert "Side by side with the reference rlm" in report
def test_quick_run_of_session_open_compares_warm_and_cold(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "session_open")
    [section] = figures["sections"]
    check_section(section)
    assert [target["name"] for target in section["targets"]] == ["warm session open p50"]
    assert [row[0] for row in section["tables"][0]["rows"]] == [
        "warm, 1 KB context", "cold, 1 KB context", "warm, 1 MB context", "cold, 1 MB context"]
    assert len(section["raw"]["warm open 1 KB (ms)"]) == 3
    assert "A run's session open, warm and cold" in report
def test_quick_run_of_the_sandbox_pool_times_warm_and_empty_jobs(tmp_path: Path) -> None:
    figures, report = run_harness(tmp_path, "pool")
    [section] = figures["sections"]
    check_section(section)
    assert {target["name"] for target in section["targets"]} == {
        "cold job p50, pool warm", "cold job p50 with the pool warm / bare python spawn p50",
        "cold job p50, pool empty", "idle agent RSS with the pool"}
    steps = [row[0] for row in section["tables"][2]["rows"]]
    assert steps[0] == "pooled: take (write main.py, send the go)"
    assert "Cold Python jobs with the sandbox pool warm and empty" in report

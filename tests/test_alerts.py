"""The shipped Prometheus alerting rules: valid, firing on the series the controller exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kowalski.controller.api.status import Status, prometheus_text
from kowalski.controller.fleet.dispatch import JobCounters

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Series Prometheus records itself for every scrape.
PROMETHEUS_OWN = {"up"}
_LABEL = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_names() -> set[str]:
    """Every series name the controller's /metrics can carry."""
    empty = Status(version="0", time=0.0, devices=[], endpoints=[], jobs=JobCounters(),
                   runs=[], cache={})
    # Families without samples still print their TYPE line, under the name samples carry.
    return {line.split()[2] for line in prometheus_text(lambda: empty).decode().splitlines()
            if line.startswith("# TYPE ")}


def series_in(expr: str) -> set[str]:
    words = set(re.findall(r"\b(kowalski_\w+|up)\b", expr))
    return {word for word in words if not word.endswith(("_over_time",))}


def test_every_series_a_rule_uses_is_one_the_system_exports() -> None:
    exported = exported_names()
    assert "kowalski_jobs_total" in exported
    assert "kowalski_device_up" in exported
    used = set().union(*(series_in(rule["expr"]) for rule in rules()))
    assert used - exported - PROMETHEUS_OWN == set()
    # The five the deployment needs to hear about.
    assert {"kowalski_device_up", "kowalski_device_circuit_open", "kowalski_exo_endpoint_up",
            "kowalski_rlm_runs", "kowalski_jobs_total"} <= used


def test_each_rule_has_a_severity_summary_and_advice() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 30, rule["alert"]


def need_promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([need_promtool(), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


# Each alert's trouble, as series sampled every minute, and the labels it fires with.
TROUBLE: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "KowalskiControllerDown": ({'up{job="kowalski", instance="ctl:7080"}': "0x30"},
                               {"job": "kowalski", "instance": "ctl:7080"}),
    "KowalskiAgentDown": ({'kowalski_device_up{device="a"}': "0x30",
                           'kowalski_device_up{device="b"}': "1x30"}, {"device": "a"}),
    "KowalskiNoAgentUp": ({'kowalski_device_up{device="a"}': "0x30",
                           'kowalski_device_up{device="b"}': "0x30"}, {}),
    "KowalskiAgentCircuitOpen": ({'kowalski_device_circuit_open{device="a"}': "0x25 1 0 0 0 0"},
                                 {"device": "a"}),
    "KowalskiEndpointDown": ({'kowalski_exo_endpoint_up{endpoint="http://e:52415"}': "0x30"},
                             {"endpoint": "http://e:52415"}),
    "KowalskiEndpointCircuitOpen": (
        {'kowalski_exo_endpoint_circuit_open{endpoint="http://e:52415"}': "0x28 1 0"},
        {"endpoint": "http://e:52415"}),
    "KowalskiJobsFailing": ({'kowalski_jobs_total{outcome="submitted"}': "0+10x30",
                             'kowalski_jobs_total{outcome="failed"}': "0+4x30"}, {}),
    "KowalskiRunsFailing": ({'kowalski_rlm_runs{status="failed"}': "5x30",
                             'kowalski_rlm_runs{status="finished"}': "2x30"},
                            {"status": "failed"}),
    "KowalskiQueueFull": ({'kowalski_jobs_total{outcome="busy"}': "0+3x30"},
                          {"outcome": "busy"}),
}
# A cluster where all is well: no alert fires.
HEALTHY = {
    'up{job="kowalski", instance="ctl:7080"}': "1x30",
    'kowalski_device_up{device="a"}': "1x30",
    'kowalski_device_circuit_open{device="a"}': "0x30",
    'kowalski_exo_endpoint_up{endpoint="http://e:52415"}': "1x30",
    'kowalski_exo_endpoint_circuit_open{endpoint="http://e:52415"}': "0x30",
    'kowalski_jobs_total{outcome="submitted"}': "0+10x30",
    'kowalski_jobs_total{outcome="failed"}': "0x30",
    'kowalski_jobs_total{outcome="busy"}': "0x30",
    'kowalski_rlm_runs{status="failed"}': "1x30",
    'kowalski_rlm_runs{status="finished"}': "20x30",
}


def expected(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    def render(text: str) -> str:
        return _LABEL.sub(lambda match: labels[match.group(1)], text)

    return {"exp_labels": {"severity": rule["labels"]["severity"], **labels},
            "exp_annotations": {key: render(value)
                                for key, value in rule["annotations"].items()}}


def test_each_alert_fires_on_its_trouble_and_none_when_all_is_well(tmp_path: Path) -> None:
    promtool = need_promtool()
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(TROUBLE) == set(by_name)
    tests = [{"interval": "1m", "input_series": [{"series": series, "values": values}
                                                 for series, values in series_values.items()],
              "alert_rule_test": [{"eval_time": "30m", "alertname": name,
                                   "exp_alerts": [expected(by_name[name], labels)]}]}
             for name, (series_values, labels) in TROUBLE.items()]
    tests.append({"interval": "1m", "input_series": [{"series": series, "values": values}
                                                     for series, values in HEALTHY.items()],
                  "alert_rule_test": [{"eval_time": "30m", "alertname": name, "exp_alerts": []}
                                      for name in by_name]})
    shutil.copy(RULES, tmp_path / "alerts.yml")
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["alerts.yml"],
                                    "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

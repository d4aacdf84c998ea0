"""The Prometheus configuration and alert rules under deploy/prometheus, checked by promtool.

promtool comes with Prometheus (Debian and Ubuntu: ``apt-get install prometheus``). These
tests fail, rather than skip, when it is missing, so that CI cannot pass unchecked rules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamer.metrics import InferenceMetrics, UpdaterMetrics

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMTOOL_TIMEOUT_SECONDS = 60

# Sample names each metric type exposes, after its family name.
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH; install Prometheus (apt-get install prometheus) to check the rules")
    return path


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_SECONDS)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alerts_with_firing_case() -> set[str]:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}


def exported_sample_names() -> set[str]:
    """Return every sample name the updater and the inference worker can expose."""
    registry = CollectorRegistry()
    UpdaterMetrics(registry)
    # The two workers share some metric names, so the inference worker gets its own registry.
    inference_registry = CollectorRegistry()
    InferenceMetrics(inference_registry)
    families = [*registry.collect(), *inference_registry.collect()]
    return {family.name + suffix for family in families for suffix in SAMPLE_SUFFIXES[family.type]}


def test_promtool_check_config_passes(promtool):
    result = run_promtool(promtool, "check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_passes(promtool):
    result = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules_passes(promtool):
    result = run_promtool(promtool, "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_scrapes_both_workers():
    jobs = {job["job_name"] for job in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}
    assert jobs == {"streamer-updater", "streamer-inference"}


def test_config_loads_alert_rules():
    assert yaml.safe_load(CONFIG.read_text())["rule_files"] == ["alerts.yml"]


def test_alert_rules_exist():
    assert len(alert_rules()) >= 1


def test_every_alert_has_firing_test_case():
    missing = {rule["alert"] for rule in alert_rules()} - alerts_with_firing_case()
    assert missing == set()


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_label(rule):
    assert rule.get("labels", {}).get("severity") in {"critical", "warning"}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_summary_and_description(rule):
    assert set(rule.get("annotations", {})) >= {"summary", "description"}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_metrics_exist_in_streamer(rule):
    used = set(re.findall(r"\bstreamer_[a-z_]+", rule["expr"]))
    assert used - exported_sample_names() == set()

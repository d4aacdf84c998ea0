"""Structure checks of the Grafana provisioning and the streamer dashboard.

Every query must name only metrics that streamer/metrics.py defines, so a renamed metric
fails here and not as an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import GRAFANA_QUERY_VARIABLES, panel_queries

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamer.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "streamer.yml"
METRICS_MODULE = REPO / "streamer" / "metrics.py"
COMPOSE_FILE = REPO / "docker-compose.yml"

# Each metric the dashboard must show.
REQUIRED_METRICS = frozenset({
    "streamer_events_consumed_total",
    "streamer_consumer_lag",
    "streamer_pending_labels",
    "streamer_labels_joined_total",
    "streamer_labels_expired_total",
    "streamer_microbatch_duration_seconds",
    "streamer_training_loss",
    "streamer_prequential_auc",
    "streamer_prequential_average_precision",
    "streamer_snapshots_exported_total",
    "streamer_updater_model_version",
    "streamer_inference_model_version",
    "streamer_update_to_serving_delay_seconds",
    "streamer_inference_latency_seconds",
    "streamer_invalid_events_total",
    "streamer_broker_up",
    "streamer_broker_errors_total",
    "streamer_drift_estimate",
    "streamer_drift_detections_total",
})

_METRIC_DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(streamer_\w+)\"")
_METRIC_REFERENCE = re.compile(r"\bstreamer_\w+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels() -> list[dict]:
    return _dashboard()["panels"]


def _provisioned_uid() -> str:
    datasources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    return datasources[0]["uid"]


def _defined_metrics() -> dict[str, str]:
    """Return {metric name: Counter, Gauge or Histogram} as streamer/metrics.py defines them."""
    text = METRICS_MODULE.read_text(encoding="utf-8")
    return {name: kind for kind, name in _METRIC_DEFINITION.findall(text)}


def _base_name(series: str, histograms: set[str]) -> str:
    """Return the metric a series name belongs to: a histogram's _bucket/_sum/_count stripped."""
    for suffix in _HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in histograms:
            return base
    return series


def _referenced_metrics() -> set[str]:
    histograms = {name for name, kind in _defined_metrics().items() if kind == "Histogram"}
    names = set()
    for query in panel_queries(_dashboard()):
        names |= {_base_name(series, histograms) for series in _METRIC_REFERENCE.findall(query)}
    return names


def test_metrics_module_parsed():
    """The definition pattern still matches streamer/metrics.py."""
    defined = _defined_metrics()

    assert defined.get("streamer_events_consumed_total") == "Counter"
    assert defined.get("streamer_inference_latency_seconds") == "Histogram"


def test_dashboard_valid_json():
    dashboard = _dashboard()

    assert dashboard["uid"] == "streamer-overview"
    assert dashboard["panels"]


def test_datasource_points_at_compose_prometheus():
    datasource = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"][0]
    services = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]

    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services


def test_provider_path_is_compose_mount():
    provider = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"][0]
    grafana_volumes = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["grafana"]["volumes"]

    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes


def test_panel_ids_unique():
    ids = [panel["id"] for panel in _panels()]

    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("panel", _panels(), ids=lambda panel: panel["title"])
def test_panel_datasource_uid_provisioned(panel):
    uid = _provisioned_uid()

    assert panel["datasource"]["uid"] == uid
    for target in panel["targets"]:
        assert target["datasource"]["uid"] == uid, f"target {target['refId']}"


@pytest.mark.parametrize("panel", _panels(), ids=lambda panel: panel["title"])
def test_panel_targets_query_streamer_metric(panel):
    assert panel["targets"], "panel has no query"
    for target in panel["targets"]:
        assert _METRIC_REFERENCE.search(target["expr"]), f"target {target['refId']} names no streamer metric"


def test_queries_use_defined_metrics():
    unknown = _referenced_metrics() - set(_defined_metrics())

    assert unknown == set()


def test_queries_cover_required_metrics():
    assert REQUIRED_METRICS - _referenced_metrics() == set()


def test_histogram_suffixes_only_on_histograms():
    defined = _defined_metrics()
    misused = []
    for query in panel_queries(_dashboard()):
        for series in _METRIC_REFERENCE.findall(query):
            if series in defined:
                continue
            base = next((series.removesuffix(s) for s in _HISTOGRAM_SUFFIXES if series.endswith(s)), None)
            if base is not None and defined.get(base) != "Histogram":
                misused.append(series)

    assert misused == []


def test_quantiles_read_bucket_series():
    for query in panel_queries(_dashboard()):
        if "histogram_quantile" in query:
            assert "_bucket[" in query, query
            assert "by (le" in query, query


def test_panel_queries_replace_grafana_variables():
    queries = panel_queries(_dashboard())

    assert len(queries) == sum(len(panel["targets"]) for panel in _panels())
    assert not [query for query in queries if "$" in query]


def test_panel_queries_nested_rows():
    row = {"type": "row", "panels": [{"targets": [{"expr": "rate(streamer_x_total[$__rate_interval])"}]}]}

    queries = panel_queries({"panels": [row]})

    assert queries == [f"rate(streamer_x_total[{GRAFANA_QUERY_VARIABLES['$__rate_interval']}])"]

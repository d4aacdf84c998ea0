"""The dashboard's queries and the alert rules, run by a real Prometheus against running workers.

The test starts /usr/bin/prometheus on loopback with a configuration written to a
temporary folder. That configuration scrapes every second, lists both workers' metrics
endpoints as static targets under the job names of deploy/prometheus/prometheus.yml, and
loads a copy of deploy/prometheus/alerts.yml as its rule file. The updater and the
inference worker run against the session's broker during a short paced replay of July
transactions. Once Prometheus has scraped the final counts of both workers, and while
they still run, every panel query and every alert expression goes through Prometheus's
HTTP API. The responses are kept for the tests below, and then Prometheus and the workers
are stopped.

Panel queries use the dashboard's own ranges: `helpers.panel_queries` replaces
``$__rate_interval`` with 1m. At a 1 s scrape interval a 1 m range contains the two
samples that rate() needs after two scrapes, and the whole run fits in it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import panel_queries
from streamer.broker.process import parent_death_signal
from streamer.demo import scrape
from workers import free_port, run_command, start_worker, stop_worker, wait_until, worker_env

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "streamer.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_BINARY = "/usr/bin/prometheus"

PARTITIONS = 4
REPLAY_START = "2018-07-01"
# 3,000 July transactions span about 7.5 hours of event time, which the replay sends in
# about 7.5 s at REPLAY_SPEEDUP (event-time seconds per second), plus the label delay.
REPLAY_TRANSACTIONS = 3000
REPLAY_SPEEDUP = 3600
# 2.4 hours of event time: labels arrive while transactions are still replayed, so the
# updater trains, exports and the inference worker swaps snapshots during the replay.
LABEL_DELAY_DAYS = 0.1
SCRAPE_INTERVAL_SECONDS = 1
# Seconds Prometheus gets to report ready, and to exit after SIGTERM.
PROMETHEUS_START_TIMEOUT_SECONDS = 30
PROMETHEUS_STOP_TIMEOUT_SECONDS = 15
HTTP_TIMEOUT_SECONDS = 10
JOBS = {"updater": "streamer-updater", "inference": "streamer-inference"}
# The smaller of the two workers' counts, as Prometheus last scraped them. Both counters are
# exported at 0 from the start, so min() always covers both.
FINAL_COUNTS_QUERY = "min(streamer_examples_trained_total or streamer_scored_transactions_total)"


@dataclass(frozen=True)
class PanelQuery:
    """One target of a dashboard panel."""

    panel: str  # the panel's title
    expr: str

    @property
    def test_id(self) -> str:
        return f"{self.panel} {self.expr}"


@dataclass
class LiveRun:
    """What Prometheus returned during the run, for the tests to inspect."""

    panel_results: dict[str, dict]  # PromQL expression -> /api/v1/query response body
    alert_results: dict[str, dict]  # alert name -> /api/v1/query response body of its expression
    rules: dict  # /api/v1/rules response body
    targets: dict  # /api/v1/targets response body
    prometheus_log: str


def dashboard_panel_queries() -> list[PanelQuery]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        PanelQuery(panel["title"], expr)
        for panel in dashboard["panels"]
        for expr in panel_queries({"panels": [panel]})
    ]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_group_names() -> list[str]:
    return [group["name"] for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]]


def write_prometheus_config(folder: Path, ports: dict[str, int]) -> Path:
    """Write prometheus.yml and a copy of alerts.yml into ``folder``; return the config's path."""
    shutil.copy(ALERTS, folder / "alerts.yml")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": f"{SCRAPE_INTERVAL_SECONDS}s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": JOBS[worker], "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for worker, port in ports.items()
        ],
    }
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_prometheus(folder: Path, config: Path, port: int) -> tuple[subprocess.Popen, Path]:
    log = folder / "prometheus.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [PROMETHEUS_BINARY, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=output, stderr=subprocess.STDOUT, preexec_fn=parent_death_signal,
        )
    return process, log


def stop_prometheus(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=PROMETHEUS_STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def api_get(port: int, path: str, **params: str) -> dict:
    """GET a Prometheus API path and return the decoded body, also for an error status such as 400."""
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def scraped_value(port: int, query: str) -> float:
    """Return the value of a query that yields one sample, or 0 while it yields none."""
    result = api_get(port, "/api/v1/query", query=query)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def prometheus_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=HTTP_TIMEOUT_SECONDS) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for_prometheus(process: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_SECONDS
    while not prometheus_ready(port):
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"prometheus did not become ready within {PROMETHEUS_START_TIMEOUT_SECONDS} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live_run(settings_factory, source_path: Path, handbook_dir: Path, tmp_path_factory) -> LiveRun:
    if not Path(PROMETHEUS_BINARY).exists():
        pytest.fail(f"{PROMETHEUS_BINARY} not found; install Prometheus (apt-get install prometheus)")
    settings = settings_factory("prometheus-live").replace(partitions=PARTITIONS)
    folder = tmp_path_factory.mktemp("prometheus-live")
    ports = {"updater": free_port(), "inference": free_port()}
    env = worker_env(settings, source_path, ports["updater"], ports["inference"], PARTITIONS)
    prometheus_port = free_port()
    config = write_prometheus_config(folder, ports)

    # 1. Prometheus, then both workers, so that it scrapes them from their first sample on.
    prometheus, prometheus_log = start_prometheus(folder, config, prometheus_port)
    running = []
    try:
        for name, command in (("updater", "update"), ("inference", "serve")):
            running.append(start_worker(name, command, env, folder, ports[name]))
        wait_for_prometheus(prometheus, prometheus_port, prometheus_log)
        wait_until(lambda: scrape(ports["inference"]).get("streamer_inference_model_version", 0) >= 1,
                   "the inference worker to serve the initial snapshot", running)

        # 2. The paced replay, until Prometheus has scraped the final counts of both workers.
        july = handbook_dir / "transactions-2018-07.csv.gz"
        replay_code = run_command(
            ["replay", str(july), "--start", REPLAY_START, "--limit", str(REPLAY_TRANSACTIONS),
             "--label-delay-days", str(LABEL_DELAY_DAYS), "--speedup", str(REPLAY_SPEEDUP)],
            env, folder / "replay.log",
        )
        assert replay_code == 0, (folder / "replay.log").read_text()
        wait_until(lambda: scraped_value(prometheus_port, FINAL_COUNTS_QUERY) >= REPLAY_TRANSACTIONS,
                   "Prometheus to scrape the final counts of both workers", running)

        # 3. Every query, while the workers still run.
        panel_results = {q.expr: api_get(prometheus_port, "/api/v1/query", query=q.expr)
                         for q in dashboard_panel_queries()}
        alert_results = {rule["alert"]: api_get(prometheus_port, "/api/v1/query", query=rule["expr"])
                         for rule in alert_rules()}
        rules = api_get(prometheus_port, "/api/v1/rules")
        targets = api_get(prometheus_port, "/api/v1/targets")
    finally:
        # 4. Stop every process this fixture started, by its PID.
        for worker in running:
            stop_worker(worker)
        stop_prometheus(prometheus)
    return LiveRun(panel_results, alert_results, rules, targets, prometheus_log.read_text(errors="replace"))


def result_summary(body: dict) -> str:
    return json.dumps(body)[:500]


# -- panel queries ---------------------------------------------------------------------------


@pytest.mark.parametrize("query", dashboard_panel_queries(), ids=lambda q: q.test_id)
def test_panel_query_succeeds(live_run: LiveRun, query: PanelQuery):
    body = live_run.panel_results[query.expr]
    assert body["status"] == "success", result_summary(body)


@pytest.mark.parametrize("query", dashboard_panel_queries(), ids=lambda q: q.test_id)
def test_panel_query_returns_data(live_run: LiveRun, query: PanelQuery):
    body = live_run.panel_results[query.expr]
    assert body["data"]["result"], result_summary(body)


@pytest.mark.parametrize("query", dashboard_panel_queries(), ids=lambda q: q.test_id)
def test_panel_query_returns_number(live_run: LiveRun, query: PanelQuery):
    # Grafana draws NaN as a gap, so a panel whose every series is NaN shows nothing.
    body = live_run.panel_results[query.expr]
    values = [float(series["value"][1]) for series in body["data"]["result"]]
    assert any(not math.isnan(value) for value in values), result_summary(body)


# -- alert rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_expression_parses(live_run: LiveRun, rule: dict):
    body = live_run.alert_results[rule["alert"]]
    assert body["status"] == "success", result_summary(body)


def test_rules_api_lists_every_group(live_run: LiveRun):
    loaded = {group["name"] for group in live_run.rules["data"]["groups"]}
    assert loaded == set(alert_group_names())


def test_rules_api_lists_every_alert(live_run: LiveRun):
    loaded = {rule["name"] for group in live_run.rules["data"]["groups"] for rule in group["rules"]}
    assert loaded == {rule["alert"] for rule in alert_rules()}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_rule_evaluates_without_error(live_run: LiveRun, rule: dict):
    loaded = {r["name"]: r for group in live_run.rules["data"]["groups"] for r in group["rules"]}
    assert loaded[rule["alert"]]["health"] == "ok", loaded[rule["alert"]].get("lastError")


# -- Prometheus and its scrape targets ------------------------------------------------------


def test_prometheus_logs_no_error(live_run: LiveRun):
    errors = [line for line in live_run.prometheus_log.splitlines() if "level=error" in line]
    assert errors == []


@pytest.mark.parametrize("job", sorted(JOBS.values()))
def test_target_up(live_run: LiveRun, job: str):
    targets = [t for t in live_run.targets["data"]["activeTargets"] if t["labels"]["job"] == job]
    assert [t["health"] for t in targets] == ["up"], result_summary(live_run.targets)

"""Structure checks of docker-compose.yml and deploy/Dockerfile.

No Docker engine runs in the test environment, so these tests read the files: services,
images, variables and their defaults, published ports, mounted paths. `docker-compose
config` (Compose v1, no engine needed) validates the file when it is installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streamer.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
README = REPO / "README.md"
README_SECTION = "## Running the stack with Docker Compose"

# Mounted by the prometheus service but written in a separate change; checked only once
# they exist.

EXPECTED_IMAGES = {
    "kafka": "apache/kafka:",
    "prometheus": "prom/prometheus:",
    "grafana": "grafana/grafana:",
}
STREAMER_SERVICES = ("pretrain", "updater", "inference", "replay")

# ${NAME} or ${NAME:-default} or ${NAME-default}, as Compose interpolates them.
_VARIABLE = re.compile(r"\$\{(?P<name>[^}:?-]*)(?P<operator>:?[-?])?(?P<default>[^}]*)\}")


def _compose_text() -> str:
    # "$$" is Compose's escape for a literal "$" that reaches the container.
    return COMPOSE_FILE.read_text(encoding="utf-8").replace("$$", "\0")


def _variables() -> list[re.Match]:
    return list(_VARIABLE.finditer(_compose_text()))


def _compose() -> dict:
    """Parse docker-compose.yml with every variable replaced by its default."""
    text = _VARIABLE.sub(lambda m: m.group("default"), _compose_text()).replace("\0", "$")
    return yaml.safe_load(text)


def _readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    return text[start:] if end == -1 else text[start:end]


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


def _bind_sources(service: dict) -> list[str]:
    """Return the host paths of a service's bind mounts, relative to the repository."""
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith(("./", "../")):
            sources.append(source)
    return sources


def _settings_fields() -> set[str]:
    return {f"STREAMER_{field.name.upper()}" for field in dataclasses.fields(Settings) if field.name != "topics"}


def test_compose_services_present():
    services = _compose()["services"]

    assert set(services) == {"kafka", "pretrain", "updater", "inference", "replay", "prometheus", "grafana"}


@pytest.mark.parametrize("name", sorted(EXPECTED_IMAGES))
def test_compose_third_party_image(name):
    image = _compose()["services"][name]["image"]

    assert image.startswith(EXPECTED_IMAGES[name])


@pytest.mark.parametrize("name", STREAMER_SERVICES)
def test_compose_streamer_service_builds_dockerfile(name):
    service = _compose()["services"][name]

    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert service["build"]["context"] == "."


def test_compose_kafka_runs_kraft():
    environment = _environment(_compose()["services"]["kafka"])

    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert environment["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "CONTROLLER://" not in environment["KAFKA_ADVERTISED_LISTENERS"]


def test_compose_kafka_advertises_published_port():
    kafka = _compose()["services"]["kafka"]
    host_port = kafka["ports"][0].split(":")[1]

    assert f"HOST://localhost:{host_port}" in _environment(kafka)["KAFKA_ADVERTISED_LISTENERS"]


def test_compose_variables_have_defaults():
    without_default = [m.group(0) for m in _variables() if m.group("operator") != ":-" or not m.group("default")]

    assert without_default == []


def test_compose_no_unbraced_variables():
    unbraced = re.findall(r"\$(?!\{)\w+", _compose_text())

    assert unbraced == []


def test_compose_variables_documented_in_readme():
    section = _readme_section()
    undocumented = sorted({m.group("name") for m in _variables()} - set(re.findall(r"`(\w+)`", section)))

    assert undocumented == []


def test_compose_streamer_defaults_match_settings():
    """A STREAMER_* default in the compose file is the default of streamer itself."""
    defaults = {m.group("name"): m.group("default") for m in _variables() if m.group("name") in _settings_fields()}

    assert defaults, "no STREAMER_* setting is passed through a variable"
    for name, default in defaults.items():
        assert Settings.from_env({name: default}) == Settings(), f"{name} default {default!r} differs from Settings"


def test_compose_host_ports_bound_to_loopback():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short syntax HOST_IP:HOST_PORT:PORT, got {port!r}"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond 127.0.0.1"


def test_compose_inference_port_scalable():
    """Replicas of the inference worker get an ephemeral host port each."""
    assert _compose()["services"]["inference"]["ports"] == ["127.0.0.1::9467", "127.0.0.1::8467"]


@pytest.mark.parametrize(("name", "port"), [("updater", 8466), ("inference", 8467)])
def test_compose_worker_healthcheck_probes_liveness(name, port):
    probe = " ".join(_compose()["services"][name]["healthcheck"]["test"])

    assert f"http://127.0.0.1:{port}/health/live" in probe


def test_compose_inference_checkpoints_per_replica():
    inference = _compose()["services"]["inference"]
    data_dir = _environment(inference)["STREAMER_DATA_DIR"]

    assert data_dir in inference["volumes"]  # an anonymous volume: one per container


@pytest.mark.parametrize("name", ["updater", "inference"])
def test_compose_worker_metrics_bind_all(name):
    assert _environment(_compose()["services"][name])["STREAMER_METRICS_HOST"] == "0.0.0.0"


def test_compose_mounted_paths_exist():
    missing = []
    for service in _compose()["services"].values():
        for source in _bind_sources(service):
            if not (REPO / source).exists():
                missing.append(source)

    assert missing == []


def test_compose_prometheus_mounts_config_folder():
    sources = set(_bind_sources(_compose()["services"]["prometheus"]))

    assert sources == {"./deploy/prometheus"}


def test_compose_prometheus_folder_has_config_and_rules():
    assert (REPO / "deploy/prometheus/prometheus.yml").is_file()
    assert (REPO / "deploy/prometheus/alerts.yml").is_file()


def test_compose_replay_data_read_only():
    for name in ("pretrain", "replay"):
        handbook = [v for v in _compose()["services"][name]["volumes"] if v.endswith(":/handbook:ro")]
        assert len(handbook) == 1, f"{name} does not mount the handbook data read-only at /handbook"


def test_dockerfile_installs_cpu_torch_first():
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("RUN ")]
    torch_line = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    package_line = next(i for i, line in enumerate(lines) if re.match(r"RUN pip install \.\s*$", line))

    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert torch_line < package_line


def test_dockerfile_python_base():
    bases = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("FROM ")]

    assert bases == ["FROM python:3.11-slim"]


def test_dockerfile_entrypoint_streamer():
    entrypoints = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("ENTRYPOINT")]

    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0].removeprefix("ENTRYPOINT")) == ["streamer"]


def test_dockerfile_runs_as_non_root():
    users = [line.split()[1] for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("USER ")]

    assert users, "the image runs as root"
    assert users[-1] not in ("root", "0")


def test_compose_config_validates():
    assert shutil.which("docker-compose"), "docker-compose (Compose v1) not found: apt-get install docker-compose"
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr

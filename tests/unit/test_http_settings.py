"""The HTTP settings of streamer.settings: defaults, environment variables, port checks."""

from __future__ import annotations

import pytest

from streamer.errors import ConfigurationError
from streamer.settings import Settings


def test_http_host_defaults_to_loopback():
    assert Settings().http_host == "127.0.0.1"


def test_http_ports_default_per_worker():
    settings = Settings()
    assert (settings.updater_http_port, settings.inference_http_port) == (8466, 8467)


def test_http_settings_read_from_env():
    settings = Settings.from_env({"STREAMER_HTTP_HOST": "0.0.0.0", "STREAMER_UPDATER_HTTP_PORT": "0",
                                  "STREAMER_INFERENCE_HTTP_PORT": "9000"})
    assert settings.http_host == "0.0.0.0"
    assert settings.updater_http_port == 0
    assert settings.inference_http_port == 9000


@pytest.mark.parametrize("name", ["updater_http_port", "inference_http_port", "inference_metrics_port"])
@pytest.mark.parametrize("port", [-1, 65536])
def test_port_outside_range_rejected(name, port):
    with pytest.raises(ConfigurationError, match=f"{name} must be a TCP port from 0 to 65535, got {port}"):
        Settings(**{name: port})


def test_http_port_not_integer_rejected():
    with pytest.raises(ConfigurationError, match="STREAMER_INFERENCE_HTTP_PORT='http' is not a valid int"):
        Settings.from_env({"STREAMER_INFERENCE_HTTP_PORT": "http"})

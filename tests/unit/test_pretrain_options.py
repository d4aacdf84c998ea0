"""`streamer pretrain` rejects invalid or empty periods before reading any data."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.errors import ConfigurationError
from streamer.pretrain import PretrainConfig, pretrain


def _config(tmp_path: Path, start: str, end: str) -> PretrainConfig:
    # The data file does not exist: a valid period would fail later, on reading it.
    return PretrainConfig(paths=(tmp_path / "missing.csv.gz",), start=start, end=end, output=tmp_path / "s.pt")


@pytest.mark.parametrize(("start", "end", "name"), [
    ("abc", "2018-07-01", "--start"), ("2018-13-01", "2018-07-01", "--start"),
    ("2018-02-30", "2018-07-01", "--start"), ("2018-04-01", "2018-13-01", "--end"),
])
def test_pretrain_rejects_invalid_date(tmp_path: Path, start: str, end: str, name: str):
    with pytest.raises(ConfigurationError, match=f"{name} .* is not a valid date"):
        pretrain(_config(tmp_path, start, end))


def test_pretrain_rejects_empty_period(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="the period is empty"):
        pretrain(_config(tmp_path, "2018-07-01", "2018-04-01"))

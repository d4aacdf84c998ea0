"""`streamer pretrain`: train the source model offline on a period of the data.

The features come from the same `FeatureState` the workers use, fed in stream order with
labels arriving after the label delay, so the source model is trained on what the stream will show.
The last ``validation_days`` of the period are held out for the metrics in the checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .dataset import DAY_MS, day_start_ms, load_transactions, stream_features
from .errors import ConfigurationError
from .evaluation import average_precision, roc_auc
from .features import FEATURE_NAMES
from .model import FraudMLP, ModelCheckpoint, save_feature_state, save_model_checkpoint

logger = logging.getLogger(__name__)

# Bumped when what pretraining saves changes meaning, so cached source models are rebuilt.
PRETRAIN_FORMAT_VERSION = 2


@dataclass(frozen=True)
class PretrainConfig:
    """Options of `streamer pretrain`."""

    paths: tuple[Path, ...]
    start: str  # first day, ISO date, inclusive
    end: str  # last day, ISO date, exclusive
    output: Path
    label_delay_days: float = 7.0
    validation_days: int = 7
    epochs: int = 10  # validation AP 0.727 after 4 epochs, 0.746 after 10 (April-June, one run each)
    batch_size: int = 512
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = (64, 32)
    seed: int = 7


def pretrain(config: PretrainConfig) -> ModelCheckpoint:
    """Train and save the source model; return the checkpoint that was written."""
    for name in ("start", "end"):
        try:
            date.fromisoformat(getattr(config, name))
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"--{name} {getattr(config, name)!r} is not a valid date: use YYYY-MM-DD, for example 2018-04-01"
            ) from None
    if config.start >= config.end:
        raise ConfigurationError(f"the period is empty: start {config.start} is not before end {config.end}")
    torch.manual_seed(config.seed)
    # One thread: batches of 512 gain little from more, and the demo runs other processes beside it.
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = load_transactions(list(config.paths), config.start, config.end)
    if len(data["event_time_ms"]) == 0:
        raise ConfigurationError(f"no transactions between {config.start} and {config.end} in {list(config.paths)}")
    features, state = stream_features(data, label_delay_days=config.label_delay_days)
    logger.info("features computed rows=%d seconds=%.1f", len(features), time.perf_counter() - started)

    split = day_start_ms(config.end) - config.validation_days * DAY_MS
    train = data["event_time_ms"] < split
    if train.sum() == 0 or (~train).sum() == 0:
        raise ConfigurationError("the period is too short for its validation days; choose a longer period")
    x_train, y_train = features[train], data["fraud"][train]

    model = FraudMLP(len(FEATURE_NAMES), config.hidden)
    mean = torch.from_numpy(x_train.mean(axis=0))
    std = torch.from_numpy(x_train.std(axis=0))
    model.set_normalisation(mean, std)
    losses = _fit(model, x_train, y_train, config)

    scores = _predict(model, features[~train])
    labels = data["fraud"][~train]
    metrics = {
        "validation_auc": roc_auc(labels, scores),
        "validation_average_precision": average_precision(labels, scores),
        "final_epoch_loss": losses[-1],
        "train_examples": int(train.sum()),
        "validation_examples": int((~train).sum()),
        "seconds": time.perf_counter() - started,
    }
    checkpoint = ModelCheckpoint(
        model=model,
        feature_names=list(FEATURE_NAMES),
        metadata={
            "name": config.output.stem,
            "format_version": PRETRAIN_FORMAT_VERSION,
            "training_period": {"start": config.start, "end": config.end},
            "files": [str(Path(p).resolve()) for p in config.paths],
            "label_delay_days": config.label_delay_days,
            "metrics": metrics,
        },
    )
    checkpoint.metadata["feature_state"] = save_feature_state(config.output, state)
    checkpoint.sha256 = save_model_checkpoint(config.output, checkpoint)
    logger.info("source model saved path=%s metrics=%s", config.output, metrics)
    return checkpoint


def _fit(model: FraudMLP, x: np.ndarray, y: np.ndarray, config: PretrainConfig) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(y.astype(np.float32)).reshape(-1, 1)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(yt), generator=generator)
        total = 0.0
        for lo in range(0, len(order), config.batch_size):
            idx = order[lo:lo + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
        logger.info("pretrain epoch=%d loss=%.5f", epoch + 1, losses[-1])
    return losses


@torch.no_grad()
def _predict(model: FraudMLP, x: np.ndarray) -> np.ndarray:
    model.eval()
    return torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(x)))[:, 0]).numpy()

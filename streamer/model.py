"""The fraud model (a small MLP with built-in feature normalisation) and its checkpoint file.

A model checkpoint is two files. ``NAME.pt`` contains tensors and plain values only and is
loaded with ``torch.load(weights_only=True)``, so it cannot run code. ``NAME.json``
contains the metadata and the SHA-256 of ``NAME.pt``, which is checked before loading.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomicfile import write_atomically
from .errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "streamer-model/1"
# Guards the normalisation against constant features (std 0) in the training period.
MIN_FEATURE_STD = 1e-6


class FraudMLP(nn.Module):
    """MLP over raw feature vectors; normalisation is part of the model so exports are self-contained.

    ``forward`` returns logits; ``ScoreModule`` wraps it with a sigmoid for serving.
    """

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (64, 32), n_outputs: int = 1) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_sizes = tuple(hidden)
        self.n_outputs = n_outputs
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_outputs)

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=MIN_FEATURE_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.feature_mean) / self.feature_std
        return self.head(self.body(z))

    def architecture(self) -> dict:
        return {"n_features": self.n_features, "hidden": list(self.hidden_sizes), "n_outputs": self.n_outputs}


class ScoreModule(nn.Module):
    """Serving view of a model: raw features in, fraud probability of shape (batch, 1) out."""

    def __init__(self, model: FraudMLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x)[:, :1])


@dataclass
class ModelCheckpoint:
    """A saved model with what is needed to use and audit it."""

    model: FraudMLP
    feature_names: list[str]
    metadata: dict = field(default_factory=dict)  # training period, metrics, name
    sha256: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model_checkpoint(path: Path, checkpoint: ModelCheckpoint) -> str:
    """Write ``path`` (tensors) and ``path.with_suffix('.json')`` (metadata, SHA-256); return the SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture": checkpoint.model.architecture(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in checkpoint.model.state_dict().items()},
    }
    write_atomically(path, lambda file: torch.save(payload, file))
    sha = file_sha256(path)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "weights_file": path.name,
        "sha256": sha,
        "feature_names": list(checkpoint.feature_names),
        "architecture": checkpoint.model.architecture(),
        "metadata": checkpoint.metadata,
    }
    meta_bytes = json.dumps(meta, indent=2, sort_keys=True).encode()
    write_atomically(path.with_suffix(".json"), lambda file: file.write(meta_bytes))
    logger.info("saved model checkpoint path=%s sha256=%s", path, sha[:12])
    return sha


def save_feature_state(checkpoint_path: Path, state) -> dict:
    """Save the feature state at the end of the training period beside a checkpoint.

    The workers start from it, so that the first transactions of the stream see the same
    30-day history the source model was trained with. Returns the metadata entry
    ({"file", "sha256"}) to store in the checkpoint's metadata.
    """
    path = Path(checkpoint_path).with_suffix(".features.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **state.state_dict())
    write_atomically(path, lambda file: file.write(buffer.getvalue()))
    return {"file": path.name, "sha256": file_sha256(path)}


def load_feature_state(checkpoint_path: Path, checkpoint: ModelCheckpoint):
    """Load the feature state saved with a checkpoint, verified by SHA-256; None if it has none."""
    from .features import FeatureState

    entry = checkpoint.metadata.get("feature_state")
    if not entry:
        return None
    path = Path(checkpoint_path).with_name(entry["file"])
    if not path.exists() or file_sha256(path) != entry["sha256"]:
        raise CheckpointError(f"feature state {path} is missing or does not match its SHA-256; re-run `streamer pretrain`")
    with np.load(path, allow_pickle=False) as npz:
        return FeatureState.from_state_dict({k: npz[k] for k in npz.files})


def load_model_checkpoint(path: Path) -> ModelCheckpoint:
    """Load a checkpoint written by `save_model_checkpoint` after verifying its SHA-256."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        what = "model checkpoint" if not path.exists() else "metadata of model checkpoint"
        raise CheckpointError(
            f"{what} {path} not found (expected {path.name} and {meta_path.name} side by side); "
            "run `streamer pretrain` first"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"model metadata {meta_path} is not valid JSON: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if not path.exists():
        raise CheckpointError(f"model weights {path} not found")
    actual = file_sha256(path)
    if actual != meta.get("sha256"):
        raise CheckpointError(
            f"model weights {path} have SHA-256 {actual[:12]}…, metadata expects {str(meta.get('sha256'))[:12]}…; "
            "the file is corrupt or was replaced: re-run `streamer pretrain`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as exc:
        raise CheckpointError(
            f"model weights {path} failed to load with weights_only=True ({type(exc).__name__}): the file contains "
            "objects other than tensors and plain values, or is not a torch file; re-run `streamer pretrain`"
        ) from exc

    arch = payload["architecture"]
    model = FraudMLP(arch["n_features"], tuple(arch["hidden"]), arch["n_outputs"])
    model.load_state_dict(payload["state_dict"])
    return ModelCheckpoint(model=model, feature_names=list(meta["feature_names"]), metadata=meta["metadata"], sha256=actual)

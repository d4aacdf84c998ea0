"""Scoring with onnxruntime, and the verified swap of the served snapshot.

onnxruntime cannot replace the weights inside a live ``InferenceSession``, so each snapshot
gets a new session, built and checked beside the serving one, then swapped in by replacing
one reference. A scoring call reads that reference once, so a batch is always scored by
one complete model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from exporters import Manifest

from .errors import SnapshotError
from .features import FEATURE_NAMES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """A session and the manifest of the snapshot it was built from."""

    session: ort.InferenceSession
    manifest: Manifest
    input_name: str

    @property
    def version(self) -> int:
        return self.manifest.version


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # One thread each: a worker scores on one core, and small batches gain nothing from more.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def build_served_model(manifest: Manifest, onnx_bytes: bytes, probe: np.ndarray | None = None) -> ServedModel:
    """Create and check a session for a snapshot; raise SnapshotError naming what is wrong.

    It checks that the manifest's feature names equal this version's, that the graph has one
    float input of width len(FEATURE_NAMES), and that a probe batch gives one finite
    probability in [0, 1] per row.
    """
    if list(manifest.feature_names) != list(FEATURE_NAMES):
        raise SnapshotError(
            f"snapshot {manifest.model_name} v{manifest.version} expects features {manifest.feature_names}, "
            f"this worker computes {list(FEATURE_NAMES)}"
        )
    try:
        session = ort.InferenceSession(onnx_bytes, sess_options=_session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unrelated exception types for bad graphs
        raise SnapshotError(f"onnxruntime cannot load snapshot v{manifest.version}: {exc}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].shape[-1] != len(FEATURE_NAMES):
        shapes = [(i.name, i.shape) for i in inputs]
        raise SnapshotError(f"snapshot v{manifest.version} has inputs {shapes}, expected one of width {len(FEATURE_NAMES)}")
    served = ServedModel(session, manifest, inputs[0].name)
    if probe is None:
        probe = np.zeros((4, len(FEATURE_NAMES)), dtype=np.float32)
    scores = score(served, probe)
    if scores.shape != (len(probe),) or not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
        raise SnapshotError(f"snapshot v{manifest.version} gives invalid scores on the probe batch")
    return served


def score(served: ServedModel, features: np.ndarray) -> np.ndarray:
    """Fraud probabilities, float32 of shape (n,)."""
    out = served.session.run(None, {served.input_name: np.ascontiguousarray(features, dtype=np.float32)})[0]
    return out.reshape(-1)

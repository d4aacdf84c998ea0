"""ONNX export in a child process, isolated from the training thread.

torch's default (dynamo) ONNX exporter changes process-wide tracing state while it runs.
Run in a thread beside a training thread, it made a concurrent ``optimizer.zero_grad``
fail with ``KeyError: 'custom'`` inside torch.fx (torch 2.13.0, seen in about one demo run
in three). A child process has its own torch state and its own core.

The model crosses the process boundary as ``torch.save`` bytes of its architecture and
weights, read back with ``weights_only=True``; the result comes back as an
`exporters.ExportResult`.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from exporters import ExportResult, export_onnx

from .broker.process import die_with_parent
from .model import FraudMLP, ScoreModule


def serialise_model(model: FraudMLP) -> bytes:
    """Architecture and weights of a model as bytes that `export_serialised` reads safely."""
    buffer = io.BytesIO()
    torch.save({"architecture": model.architecture(), "state_dict": model.state_dict()}, buffer)
    return buffer.getvalue()


def export_serialised(model_bytes: bytes, probe: np.ndarray) -> ExportResult:
    """Rebuild the model from `serialise_model` bytes and export its serving form (runs in the child)."""
    torch.set_num_threads(1)
    payload = torch.load(io.BytesIO(model_bytes), map_location="cpu", weights_only=True)
    arch = payload["architecture"]
    model = FraudMLP(arch["n_features"], tuple(arch["hidden"]), arch["n_outputs"])
    model.load_state_dict(payload["state_dict"])
    return export_onnx(ScoreModule(model.eval()), probe)


def export_pool() -> ProcessPoolExecutor:
    """Create a pool of one long-lived export process, started with "spawn" so it has none of the parent's threads."""
    # The pool starts its process from the thread that submits first: the event loop's
    # thread, which lives as long as the worker, as the parent-death signal requires.
    return ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent, initargs=(os.getpid(),),
    )

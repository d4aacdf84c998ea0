"""Export a PyTorch scoring module to one self-contained ONNX file and check that it scores like PyTorch.

Call it from a worker thread: it uses no asyncio and blocks for about 0.65 s per small MLP
(about 3 s for the first export in a process), measured with torch 2.13 on 2 CPU cores.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from streamer.errors import SnapshotError

logger = logging.getLogger(__name__)

# Parity tolerance between onnxruntime and PyTorch on the same float32 input. Both compute
# in float32 (epsilon 1.2e-7), but their matrix-multiply kernels add in a different order,
# so a layer of n inputs may differ by a few n * epsilon. By that estimate MLPs of up to a
# few hundred units stay near 1e-6 (a 15-32-1 MLP measured 6e-8), so these bounds leave a
# margin of about 10. A wrong weight, a missing layer or a dropped normalisation moves
# scores by far more and still fails.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-4

_BATCH_DIM = "batch"
_EXPORT_FILE = "model.onnx"

# torch 2.13's dynamo exporter logs one warning per missing torchvision operator and
# raises a FutureWarning from its own pytree code on every export, and its optimizer
# (onnxscript, onnx_ir) logs about five INFO lines per export. None of it concerns an
# MLP, so it is dropped to keep the worker log readable.
_TORCH_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
_TORCH_PYTREE_WARNING = r".*isinstance\(treespec, LeafSpec\)"
_OPTIMIZER_LOGGERS = ("onnxscript", "onnx_ir")


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


_TORCHVISION_NOTICE_FILTER = _DropTorchvisionNotice()


def _silence_known_export_noise() -> None:
    # Repeated before every export because warnings.catch_warnings() elsewhere (pytest
    # uses it around each test) restores the filter list and drops this entry.
    # filterwarnings() replaces an identical entry, so the list does not grow.
    warnings.filterwarnings("ignore", message=_TORCH_PYTREE_WARNING, category=FutureWarning)
    registration_logger = logging.getLogger(_TORCH_REGISTRATION_LOGGER)
    if _TORCHVISION_NOTICE_FILTER not in registration_logger.filters:
        registration_logger.addFilter(_TORCHVISION_NOTICE_FILTER)
    # A level that the application set on these loggers is kept.
    for name in _OPTIMIZER_LOGGERS:
        optimizer_logger = logging.getLogger(name)
        if optimizer_logger.level == logging.NOTSET:
            optimizer_logger.setLevel(logging.WARNING)


@dataclass(frozen=True)
class ExportResult:
    """One exported and validated ONNX model.

    ``export_seconds`` is the wall time of the whole ``export_onnx`` call (export, check
    and parity run). ``max_abs_diff`` is the largest absolute difference between the
    onnxruntime and PyTorch outputs on the probe batch.
    """

    onnx_bytes: bytes = field(repr=False)
    sha256: str
    max_abs_diff: float
    export_seconds: float
    input_name: str
    output_name: str
    n_features: int
    opset: int


def export_onnx(
    model: torch.nn.Module,
    probe: np.ndarray,
    *,
    input_name: str = "features",
    output_name: str = "score",
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
) -> ExportResult:
    """Export ``model`` to ONNX and validate the result against PyTorch on ``probe``.

    ``model`` maps a float32 tensor of shape (batch, n_features) to scores of shape
    (batch, 1) or (batch,). It must already contain any normalisation and the final
    sigmoid. ``probe`` is a float array of shape (batch, n_features) with finite values,
    cast to float32. The caller's model is not changed, neither its weights nor its
    training mode.

    Steps:
      1. Deep-copy the model and switch the copy to eval mode.
      2. Reject the model if any parameter or buffer is not finite.
      3. Export with the dynamo exporter, with a dynamic batch dimension, to one file
         that contains the weights (no external data).
      4. Run ``onnx.checker.check_model`` with ``full_check=True``.
      5. Score ``probe`` with onnxruntime (CPU, one thread) and with PyTorch, reject
         non-finite outputs, and require |onnx - torch| <= atol + rtol * |torch| everywhere.

    Raises SnapshotError naming the step that failed.
    """
    started = time.perf_counter()
    probe = _validate_probe(probe)
    _silence_known_export_noise()

    # Step 1: copy and eval, so the caller's module and its training mode are untouched.
    module = copy.deepcopy(model).eval()

    # Step 2: a NaN or infinite weight would export fine and then score everything NaN.
    _raise_if_not_finite(module)

    # Step 3: export.
    onnx_bytes = _export_self_contained(module, probe, input_name, output_name)

    # Step 4: structural and type check of the whole graph.
    model_proto = _check_model(onnx_bytes, input_name, output_name)

    # Step 5: parity with PyTorch.
    expected = _score_with_torch(module, probe)
    actual = _score_with_onnxruntime(onnx_bytes, probe, input_name, output_name)
    max_abs_diff = _compare_outputs(expected, actual, atol, rtol)

    result = ExportResult(
        onnx_bytes=onnx_bytes,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        max_abs_diff=max_abs_diff,
        export_seconds=time.perf_counter() - started,
        input_name=input_name,
        output_name=output_name,
        n_features=probe.shape[1],
        opset=_default_opset(model_proto),
    )
    logger.info(
        "onnx export validated sha256=%s size_bytes=%d n_features=%d opset=%d max_abs_diff=%.3g seconds=%.3f",
        result.sha256[:12],
        len(onnx_bytes),
        result.n_features,
        result.opset,
        max_abs_diff,
        result.export_seconds,
    )
    return result


def _validate_probe(probe: np.ndarray) -> np.ndarray:
    if not isinstance(probe, np.ndarray) or probe.ndim != 2 or probe.shape[0] < 1 or probe.shape[1] < 1:
        shape = getattr(probe, "shape", None)
        raise SnapshotError(
            "invalid probe batch: "
            f"expected a 2-D array (batch >= 1, n_features >= 1), got shape {shape}"
        )
    if not np.issubdtype(probe.dtype, np.floating):
        raise SnapshotError(f"invalid probe batch: expected a float array, got dtype {probe.dtype}")
    if not np.isfinite(probe).all():
        raise SnapshotError("invalid probe batch: it contains NaN or infinite values; pass finite feature rows")
    return np.ascontiguousarray(probe, dtype=np.float32)


def _raise_if_not_finite(module: torch.nn.Module) -> None:
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    for name, tensor in tensors:
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise SnapshotError(
                f"model tensor {name!r} contains NaN or infinite values; the model diverged, "
                "so it is not exported (lower the learning rate or restore the last checkpoint)"
            )


def _export_self_contained(module: torch.nn.Module, probe: np.ndarray, input_name: str, output_name: str) -> bytes:
    example = torch.from_numpy(probe)
    with tempfile.TemporaryDirectory(prefix="streamer-onnx-") as tmp:
        path = Path(tmp) / _EXPORT_FILE
        try:
            torch.onnx.export(
                module,
                (example,),
                path,
                dynamo=True,
                external_data=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim(_BATCH_DIM)},),
                verbose=False,
                # Debug artifacts, if the exporter writes any, go to the temporary directory.
                artifacts_dir=tmp,
            )
        # The exporter raises many unrelated types (from torch.export, onnxscript and I/O),
        # and each means the same to the caller, which is that the model cannot be exported.
        except Exception as exc:
            raise SnapshotError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
        extra_files = sorted(entry.name for entry in Path(tmp).iterdir() if entry.name != _EXPORT_FILE)
        if extra_files:
            raise SnapshotError(
                f"torch.onnx.export wrote files beside the model {extra_files}; "
                "expected one self-contained file"
            )
        return path.read_bytes()


def _check_model(onnx_bytes: bytes, input_name: str, output_name: str) -> onnx.ModelProto:
    try:
        model_proto = onnx.load_model_from_string(onnx_bytes)
        onnx.checker.check_model(model_proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SnapshotError(f"onnx.checker rejected the exported model: {exc}") from exc
    for tensor in model_proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise SnapshotError(
                f"exported initializer {tensor.name!r} refers to external data; "
                "expected a self-contained file"
            )
    inputs = [value.name for value in model_proto.graph.input]
    outputs = [value.name for value in model_proto.graph.output]
    if inputs != [input_name] or outputs != [output_name]:
        raise SnapshotError(
            f"exported graph has inputs {inputs} and outputs {outputs}; expected [{input_name!r}] and [{output_name!r}]"
        )
    return model_proto


def _score_with_torch(module: torch.nn.Module, probe: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        scores = module(torch.from_numpy(probe))
    if not isinstance(scores, torch.Tensor):
        raise SnapshotError(
            f"model returned {type(scores).__name__}; "
            "expected a tensor of shape (batch, 1) or (batch,)"
        )
    shape = tuple(scores.shape)
    if shape not in ((probe.shape[0],), (probe.shape[0], 1)):
        raise SnapshotError(
            f"model returned shape {shape} for a batch of {probe.shape[0]}; "
            "expected (batch, 1) or (batch,)"
        )
    return scores.detach().numpy()


def _score_with_onnxruntime(onnx_bytes: bytes, probe: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        (scores,) = session.run([output_name], {input_name: probe})
    # onnxruntime raises its own pybind exception types, which have no public common base.
    except Exception as exc:
        raise SnapshotError(f"onnxruntime could not run the exported model: {type(exc).__name__}: {exc}") from exc
    return np.asarray(scores)


def _compare_outputs(expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> float:
    if not np.isfinite(expected).all():
        raise SnapshotError("PyTorch scores on the probe batch contain NaN or infinite values; the model is not usable")
    if not np.isfinite(actual).all():
        raise SnapshotError("onnxruntime scores on the probe batch contain NaN or infinite values")
    if actual.shape != expected.shape:
        raise SnapshotError(f"onnxruntime output shape {actual.shape} differs from PyTorch's {expected.shape}")
    abs_diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    allowed = atol + rtol * np.abs(expected.astype(np.float64))
    max_abs_diff = float(abs_diff.max())
    if not bool((abs_diff <= allowed).all()):
        worst = int(np.argmax(abs_diff - allowed))
        raise SnapshotError(
            f"onnxruntime scores differ from PyTorch's: max |diff| {max_abs_diff:.3g} exceeds "
            f"atol {atol:g} + rtol {rtol:g} * |torch| (worst at flat index {worst}); the export is wrong"
        )
    return max_abs_diff


def _default_opset(model_proto: onnx.ModelProto) -> int:
    for opset in model_proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise SnapshotError("exported model declares no default (ai.onnx) opset")

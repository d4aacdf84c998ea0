"""export_onnx against real torch.onnx.export, onnx.checker and onnxruntime sessions."""

from __future__ import annotations

import copy
import csv
import gzip
import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.onnx_export import PARITY_ATOL, PARITY_RTOL, ExportResult, export_onnx
from streamer.errors import SnapshotError

N_FEATURES = 15
DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


class ScoringMLP(torch.nn.Module):
    """Normalisation, Linear-ReLU-Dropout-Linear and a sigmoid in one module, as export_onnx expects."""

    def __init__(self, n_features: int = N_FEATURES, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.body = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body((features - self.mean) / self.std))


class ExportDivergentModel(torch.nn.Module):
    """Adds 0.01 to its scores only while being exported, so the ONNX graph differs from eager PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(N_FEATURES, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = self.linear(features)
        if torch.compiler.is_exporting():
            scores = scores + 0.01
        return scores


class TwoOutputModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(N_FEATURES, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def make_model(seed: int = 0) -> ScoringMLP:
    torch.manual_seed(seed)
    return ScoringMLP()


def make_batch(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)


def run_onnxruntime(onnx_bytes: bytes, features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (scores,) = session.run(["score"], {"features": features})
    return scores


def run_torch(model: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return reference(torch.from_numpy(features)).numpy()


def within_tolerance(actual: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.all(np.abs(actual - expected) <= PARITY_ATOL + PARITY_RTOL * np.abs(expected)))


@pytest.fixture(scope="module")
def model() -> ScoringMLP:
    return make_model()


@pytest.fixture(scope="module")
def exported(model: ScoringMLP) -> ExportResult:
    return export_onnx(model, make_batch(64, seed=1))


def test_export_parity_on_probe_batch(model: ScoringMLP, exported: ExportResult) -> None:
    probe = make_batch(64, seed=1)
    actual = run_onnxruntime(exported.onnx_bytes, probe)
    expected = run_torch(model, probe)
    assert actual.shape == (64, 1)
    assert within_tolerance(actual, expected)


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_export_parity_other_batch_size(model: ScoringMLP, exported: ExportResult, rows: int) -> None:
    features = make_batch(rows, seed=rows)
    actual = run_onnxruntime(exported.onnx_bytes, features)
    expected = run_torch(model, features)
    assert actual.shape == (rows, 1)
    assert within_tolerance(actual, expected)


def test_export_input_has_symbolic_batch_dimension(exported: ExportResult) -> None:
    model_proto = onnx.load_model_from_string(exported.onnx_bytes)
    batch_dim, feature_dim = model_proto.graph.input[0].type.tensor_type.shape.dim
    assert batch_dim.dim_param != ""
    assert feature_dim.dim_value == N_FEATURES


def test_export_result_fields(exported: ExportResult) -> None:
    assert exported.sha256 == hashlib.sha256(exported.onnx_bytes).hexdigest()
    assert exported.input_name == "features"
    assert exported.output_name == "score"
    assert exported.n_features == N_FEATURES
    assert exported.opset >= 18
    assert exported.export_seconds > 0
    assert 0 <= exported.max_abs_diff <= PARITY_ATOL


def test_export_file_is_self_contained(model: ScoringMLP, exported: ExportResult, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(exported.onnx_bytes)
    # onnx.load resolves external data next to the file, so it would fail if any were referenced.
    model_proto = onnx.load(path)
    initializers = model_proto.graph.initializer
    external = [tensor.name for tensor in initializers if onnx.external_data_helper.uses_external_data(tensor)]
    n_weights = sum(parameter.numel() for parameter in model.parameters())
    assert external == []
    assert list(tmp_path.iterdir()) == [path]
    assert len(exported.onnx_bytes) > 4 * n_weights


def test_export_writes_no_file_beside_the_model(model: ScoringMLP, monkeypatch: pytest.MonkeyPatch) -> None:
    listings: list[list[str]] = []
    real_export = torch.onnx.export

    def recording_export(*args, **kwargs):
        program = real_export(*args, **kwargs)
        export_directory = Path(args[2]).parent
        listings.append(sorted(entry.name for entry in export_directory.iterdir()))
        return program

    monkeypatch.setattr(torch.onnx, "export", recording_export)
    export_onnx(model, make_batch(8, seed=2))
    assert listings == [["model.onnx"]]


def test_export_rejects_nan_weight() -> None:
    model = make_model()
    with torch.no_grad():
        model.body[0].weight[3, 4] = float("nan")
    with pytest.raises(SnapshotError, match=r"body\.0\.weight.*NaN or infinite"):
        export_onnx(model, make_batch(8, seed=3))


def test_export_rejects_infinite_buffer() -> None:
    model = make_model()
    model.std[0] = float("inf")
    with pytest.raises(SnapshotError, match=r"'std'"):
        export_onnx(model, make_batch(8, seed=3))


def test_export_keeps_weights_and_training_mode() -> None:
    model = make_model(seed=5)
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    export_onnx(model, make_batch(16, seed=4))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert model.training
    assert all(module.training for module in model.modules())


def test_export_in_eval_mode_despite_dropout(exported: ExportResult) -> None:
    # Scores are deterministic only if dropout was off during export.
    features = make_batch(32, seed=6)
    first = run_onnxruntime(exported.onnx_bytes, features)
    second = run_onnxruntime(exported.onnx_bytes, features)
    assert np.array_equal(first, second)


def test_export_rejects_parity_mismatch() -> None:
    with pytest.raises(SnapshotError, match="differ from PyTorch"):
        export_onnx(ExportDivergentModel(), make_batch(8, seed=7))


def test_export_rejects_wrong_output_shape() -> None:
    with pytest.raises(SnapshotError, match=r"shape \(8, 2\)"):
        export_onnx(TwoOutputModel(), make_batch(8, seed=8))


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (np.zeros(N_FEATURES, dtype=np.float32), "2-D"),
        (np.zeros((0, N_FEATURES), dtype=np.float32), "2-D"),
        (np.zeros((4, N_FEATURES), dtype=np.int64), "float"),
        (np.full((4, N_FEATURES), np.nan, dtype=np.float32), "NaN"),
    ],
    ids=["one-dimensional", "empty", "integer", "nan"],
)
def test_export_rejects_invalid_probe(model: ScoringMLP, probe: np.ndarray, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        export_onnx(model, probe)


def test_export_custom_input_and_output_names(model: ScoringMLP) -> None:
    result = export_onnx(model, make_batch(8, seed=9), input_name="x", output_name="p")
    session = ort.InferenceSession(result.onnx_bytes, providers=["CPUExecutionProvider"])
    assert [value.name for value in session.get_inputs()] == ["x"]
    assert [value.name for value in session.get_outputs()] == ["p"]


def test_export_from_worker_thread(model: ScoringMLP) -> None:
    probe = make_batch(16, seed=10)
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(export_onnx, model, probe).result()
    assert within_tolerance(run_onnxruntime(result.onnx_bytes, probe), run_torch(model, probe))


def test_export_prints_nothing_to_console(model: ScoringMLP, capfd: pytest.CaptureFixture[str]) -> None:
    export_onnx(model, make_batch(8, seed=11))
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "torchvision" not in captured.err


def read_transaction_probe(rows: int) -> np.ndarray:
    """Return raw columns of the first transactions: amount, hour, weekday, night flag, customer, terminal."""
    path = DATA_DIR / "fraud-handbook" / "transactions-2018-04.csv.gz"
    with gzip.open(path, "rt", newline="") as handle:
        records = list(itertools.islice(csv.DictReader(handle), rows))
    features = []
    for record in records:
        event_time = datetime.fromisoformat(record["tx_datetime"])
        features.append(
            [
                float(record["tx_amount"]),
                event_time.hour,
                event_time.weekday(),
                float(event_time.hour < 6),
                float(record["customer_id"]),
                float(record["terminal_id"]),
            ]
        )
    return np.asarray(features, dtype=np.float32)


def test_export_parity_on_real_transactions() -> None:
    # Raw amounts and ids reach thousands, so this checks the exported normalisation too.
    probe = read_transaction_probe(512)
    torch.manual_seed(12)
    model = ScoringMLP(n_features=probe.shape[1])
    model.mean.copy_(torch.from_numpy(probe.mean(axis=0)))
    model.std.copy_(torch.from_numpy(probe.std(axis=0) + 1e-6))
    result = export_onnx(model, probe)
    actual = run_onnxruntime(result.onnx_bytes, probe)
    assert within_tolerance(actual, run_torch(model, probe))
    assert result.n_features == 6

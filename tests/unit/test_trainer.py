"""Unit tests of the micro-batch trainer: freezing, non-finite guards, learning, determinism, state."""

from __future__ import annotations

import copy
import io
import logging
import math

import numpy as np
import pytest
import torch

from streamer.model import FraudMLP
from streamer.trainer import MicroBatchTrainer, score_with
from streamer.transfer import build_target, lower_layer_names

N_FEATURES = 15
HIDDEN = (8, 4)
BATCH = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_source(seed: int = 0) -> FraudMLP:
    torch.manual_seed(seed)
    model = FraudMLP(N_FEATURES, HIDDEN)
    model.set_normalisation(torch.zeros(N_FEATURES), torch.full((N_FEATURES,), 2.0))
    return model


def make_trainer(seed: int = 0, **kwargs) -> MicroBatchTrainer:
    kwargs.setdefault("learning_rate", 1e-2)
    return MicroBatchTrainer(build_target(make_source(), seed=seed, reset_head=True), **kwargs)


def make_batches(count: int, seed: int = 1, size: int = BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """Build micro-batches of a separable toy problem: fraud when the first two features sum above 0."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.normal(size=(size, N_FEATURES)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int8)
        batches.append((x, y))
    return batches


def parameters_of(trainer: MicroBatchTrainer, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(trainer.model.named_parameters())
    return {name: params[name].detach().clone() for name in names}


def assert_tensors_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def assert_optimizer_states_equal(actual: dict, expected: dict) -> None:
    """Compare two optimiser state dicts tensor by tensor, and their parameter groups."""
    assert actual["param_groups"] == expected["param_groups"]
    assert set(actual["state"]) == set(expected["state"])
    for index, expected_state in expected["state"].items():
        assert set(actual["state"][index]) == set(expected_state), index
        for key, value in expected_state.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)


def bce(trainer: MicroBatchTrainer, x: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(trainer.score(x).astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# --- frozen lower layers ---------------------------------------------------------------------


def test_lower_layers_frozen_for_first_updates():
    trainer = make_trainer(freeze_updates=3)
    lower = lower_layer_names(trainer.model)
    lower_before = parameters_of(trainer, lower)
    head_before = parameters_of(trainer, ["head.weight", "head.bias"])

    for x, y in make_batches(3):
        result = trainer.step(x, y)
        assert result.applied
        assert_tensors_equal(parameters_of(trainer, lower), lower_before)

    head_after = parameters_of(trainer, ["head.weight", "head.bias"])
    assert not torch.equal(head_after["head.weight"], head_before["head.weight"])
    assert not torch.equal(head_after["head.bias"], head_before["head.bias"])


def test_lower_layers_change_after_freeze_updates():
    trainer = make_trainer(freeze_updates=3)
    lower = lower_layer_names(trainer.model)
    batches = make_batches(4)
    for x, y in batches[:3]:
        trainer.step(x, y)
    lower_frozen = parameters_of(trainer, lower)

    trainer.step(*batches[3])

    lower_after = parameters_of(trainer, lower)
    for name in lower:
        assert not torch.equal(lower_after[name], lower_frozen[name]), name


def test_skipped_step_does_not_count_towards_freeze():
    trainer = make_trainer(freeze_updates=1)
    lower = lower_layer_names(trainer.model)
    x, y = make_batches(1)[0]
    bad = x.copy()
    bad[0, 0] = np.nan
    lower_before = parameters_of(trainer, lower)

    trainer.step(bad, y)
    trainer.step(x, y)

    assert trainer.updates == 1
    assert_tensors_equal(parameters_of(trainer, lower), lower_before)


# --- non-finite micro-batches ------------------------------------------------------------


def trained_trainer(steps: int = 2, **kwargs) -> MicroBatchTrainer:
    trainer = make_trainer(**kwargs)
    for x, y in make_batches(steps, seed=7):
        trainer.step(x, y)
    return trainer


def test_nan_feature_skips_step(caplog):
    trainer = trained_trainer()
    model_before = copy.deepcopy(trainer.model.state_dict())
    optimizer_before = copy.deepcopy(trainer.optimizer.state_dict())
    x, y = make_batches(1)[0]
    x[3, 4] = np.nan

    with caplog.at_level(logging.WARNING, logger="streamer.trainer"):
        result = trainer.step(x, y)

    assert result.applied is False
    assert math.isnan(result.loss)
    assert result.examples == BATCH
    assert trainer.skipped == 1
    assert trainer.updates == 2
    assert "non-finite loss" in caplog.text
    assert_tensors_equal(trainer.model.state_dict(), model_before)
    assert_optimizer_states_equal(trainer.optimizer.state_dict(), optimizer_before)


def test_nan_feature_on_first_step_leaves_optimizer_empty():
    trainer = make_trainer()
    x, y = make_batches(1)[0]
    x[0, 0] = np.inf

    result = trainer.step(x, y)

    assert result.applied is False
    assert trainer.optimizer.state_dict()["state"] == {}


def test_nonfinite_gradient_with_finite_loss_skips_step(caplog):
    trainer = trained_trainer()
    model_before = copy.deepcopy(trainer.model.state_dict())
    optimizer_before = copy.deepcopy(trainer.optimizer.state_dict())
    # The hook changes only the backward pass, so the forward loss stays finite.
    hook = trainer.model.head.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    x, y = make_batches(1)[0]

    with caplog.at_level(logging.WARNING, logger="streamer.trainer"):
        result = trainer.step(x, y)
    hook.remove()

    assert result.applied is False
    assert trainer.skipped == 1
    assert trainer.updates == 2
    assert "non-finite gradient" in caplog.text
    assert_tensors_equal(trainer.model.state_dict(), model_before)
    assert_optimizer_states_equal(trainer.optimizer.state_dict(), optimizer_before)


def test_infinite_gradient_in_lower_layer_skips_step():
    trainer = trained_trainer()
    model_before = copy.deepcopy(trainer.model.state_dict())
    hook = trainer.model.body[0].bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    result = trainer.step(*make_batches(1)[0])
    hook.remove()

    assert result.applied is False
    assert_tensors_equal(trainer.model.state_dict(), model_before)


def test_step_after_skip_applies():
    trainer = trained_trainer()
    x, y = make_batches(1)[0]
    bad = x.copy()
    bad[0, 0] = np.nan
    trainer.step(bad, y)

    result = trainer.step(x, y)

    assert result.applied is True
    assert math.isfinite(result.loss)
    assert trainer.updates == 3
    assert trainer.weights_finite()


# --- learning and determinism ----------------------------------------------------------------


def test_training_reduces_loss_on_separable_problem():
    trainer = make_trainer(learning_rate=2e-2, l2sp_lambda=0.0)
    held_out_x, held_out_y = make_batches(1, seed=99, size=512)[0]
    before = bce(trainer, held_out_x, held_out_y)

    results = [trainer.step(x, y) for x, y in make_batches(80)]

    after = bce(trainer, held_out_x, held_out_y)
    accuracy = np.mean((trainer.score(held_out_x) > 0.5) == held_out_y)
    assert all(r.applied for r in results)
    assert after < 0.5 * before
    assert accuracy > 0.9


def test_seeded_runs_are_deterministic():
    runs = []
    for _ in range(2):
        trainer = make_trainer(seed=11, freeze_updates=2)
        losses = [trainer.step(x, y).loss for x, y in make_batches(6)]
        runs.append((losses, copy.deepcopy(trainer.model.state_dict())))

    assert runs[0][0] == runs[1][0]
    assert_tensors_equal(runs[0][1], runs[1][1])


def test_different_seeds_give_different_heads():
    first = make_trainer(seed=1)
    second = make_trainer(seed=2)

    assert not torch.equal(first.model.head.weight, second.model.head.weight)


# --- state round trip ----------------------------------------------------------------------


def test_state_round_trip_continues_like_uninterrupted_run():
    batches = make_batches(8)
    uninterrupted = make_trainer(freeze_updates=3)
    for x, y in batches:
        uninterrupted.step(x, y)

    first = make_trainer(freeze_updates=3)
    for x, y in batches[:2]:
        first.step(x, y)
    state = first.state_dict()
    resumed = make_trainer(seed=5, freeze_updates=3)
    resumed.load_state_dict(state)
    for x, y in batches[2:]:
        resumed.step(x, y)
        first.step(x, y)

    assert resumed.updates == uninterrupted.updates
    assert_tensors_equal(resumed.model.state_dict(), uninterrupted.model.state_dict())
    assert_optimizer_states_equal(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict())
    assert_tensors_equal(first.model.state_dict(), uninterrupted.model.state_dict())


def test_state_round_trip_through_weights_only_file():
    batches = make_batches(6)
    uninterrupted = make_trainer()
    for x, y in batches:
        uninterrupted.step(x, y)
    first = make_trainer()
    for x, y in batches[:3]:
        first.step(x, y)
    bad = batches[0][0].copy()
    bad[0, 0] = np.nan
    first.step(bad, batches[0][1])

    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_trainer(seed=5)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for x, y in batches[3:]:
        resumed.step(x, y)

    assert resumed.skipped == 1
    assert_tensors_equal(resumed.model.state_dict(), uninterrupted.model.state_dict())


def test_state_dict_is_a_snapshot():
    trainer = trained_trainer()
    state = trainer.state_dict()
    model_copy = copy.deepcopy(state["model"])
    optimizer_copy = copy.deepcopy(state["optimizer"])

    for x, y in make_batches(2, seed=3):
        trainer.step(x, y)

    assert_tensors_equal(state["model"], model_copy)
    assert_optimizer_states_equal(state["optimizer"], optimizer_copy)


def test_load_state_dict_restores_freeze():
    trainer = make_trainer(freeze_updates=3)
    state = trained_trainer(steps=1, freeze_updates=3).state_dict()

    trainer.load_state_dict(state)

    requires_grad = {name: p.requires_grad for name, p in trainer.model.named_parameters()}
    assert trainer.updates == 1
    assert requires_grad["body.0.weight"] is False
    assert requires_grad["head.weight"] is True


# --- inputs and scores -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_does_not_mutate_inputs(dtype):
    trainer = make_trainer()
    x, y = make_batches(1)[0]
    x = x.astype(dtype)
    x_before, y_before = x.copy(), y.copy()

    for _ in range(3):
        trainer.step(x, y)

    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


def test_score_does_not_mutate_inputs():
    trainer = make_trainer()
    x = make_batches(1)[0][0]
    x_before = x.copy()

    trainer.score(x)
    score_with(trainer.model, x)

    np.testing.assert_array_equal(x, x_before)


def test_score_returns_probabilities():
    trainer = make_trainer()
    x = make_batches(1)[0][0]

    scores = trainer.score(x)

    assert scores.shape == (BATCH,)
    assert scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))
    np.testing.assert_array_equal(scores, score_with(trainer.model, x))

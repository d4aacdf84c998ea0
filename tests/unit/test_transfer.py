"""Unit tests of the source-to-target transfer and of the L2-SP penalty and its gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.model import FraudMLP
from streamer.transfer import build_target, l2sp_penalty, lower_layer_names, set_lower_layers_frozen

N_FEATURES = 15
HIDDEN = (8, 4)
ALL_PARAMETERS = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias"]
HEAD_PARAMETERS = ["head.weight", "head.bias"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_source(seed: int = 0) -> FraudMLP:
    """Build a source model whose weights differ from any fresh initialisation, with real normalisation."""
    torch.manual_seed(seed)
    model = FraudMLP(N_FEATURES, HIDDEN)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    model.set_normalisation(torch.linspace(-2.0, 2.0, N_FEATURES), torch.linspace(0.5, 3.0, N_FEATURES))
    return model


def perturb(model: torch.nn.Module, scale: float = 0.1, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


# --- build_target ------------------------------------------------------------------------


def test_build_target_copies_matching_layers():
    source = make_source()

    result = build_target(source)

    assert result.transferred == ALL_PARAMETERS
    assert result.reinitialised == []
    target_params = dict(result.model.named_parameters())
    for name, param in source.named_parameters():
        assert torch.equal(target_params[name], param), name


def test_build_target_copies_normalisation_buffers():
    source = make_source()

    target = build_target(source).model

    assert torch.equal(target.feature_mean, source.feature_mean)
    assert torch.equal(target.feature_std, source.feature_std)


def test_build_target_gives_same_scores_as_source():
    source = make_source()
    x = torch.randn(32, N_FEATURES)

    target = build_target(source).model

    assert torch.equal(target(x), source(x))


def test_build_target_does_not_share_tensors():
    source = make_source()
    before = {name: param.detach().clone() for name, param in source.named_parameters()}

    result = build_target(source)
    perturb(result.model)

    for name, param in source.named_parameters():
        assert torch.equal(param, before[name]), name


def test_build_target_anchors_equal_source():
    source = make_source()

    anchors = build_target(source).source_parameters

    assert list(anchors) == ALL_PARAMETERS
    source_params = dict(source.named_parameters())
    for name, anchor in anchors.items():
        assert torch.equal(anchor, source_params[name]), name
        assert not anchor.requires_grad, name


def test_build_target_anchors_stay_fixed_while_target_changes():
    source = make_source()
    result = build_target(source)

    perturb(result.model)

    source_params = dict(source.named_parameters())
    for name, anchor in result.source_parameters.items():
        assert torch.equal(anchor, source_params[name]), name


def test_build_target_reinitialises_differing_head():
    source = make_source()

    result = build_target(source, n_outputs=2)

    assert result.reinitialised == HEAD_PARAMETERS
    assert result.transferred == ALL_PARAMETERS[:4]
    assert result.model.head.weight.shape == (2, HIDDEN[-1])
    assert result.model.n_outputs == 2
    assert set(result.source_parameters) == set(ALL_PARAMETERS[:4])


def test_build_target_differing_head_keeps_body():
    source = make_source()

    target = build_target(source, n_outputs=2).model

    assert torch.equal(target.body[0].weight, source.body[0].weight)
    assert torch.equal(target.body[2].weight, source.body[2].weight)


def test_build_target_reset_head_reinitialises_matching_head():
    source = make_source()

    result = build_target(source, reset_head=True)

    assert result.reinitialised == HEAD_PARAMETERS
    assert result.transferred == ALL_PARAMETERS[:4]
    assert not torch.equal(result.model.head.weight, source.head.weight)
    assert not torch.equal(result.model.head.bias, source.head.bias)
    assert "head.weight" not in result.source_parameters


def test_build_target_reinitialises_differing_hidden_layer():
    source = make_source()

    result = build_target(source, hidden=(8, 6))

    assert result.transferred == ["body.0.weight", "body.0.bias"]
    assert result.reinitialised == ["body.2.weight", "body.2.bias", "head.weight", "head.bias"]
    assert result.model.body[2].weight.shape == (6, 8)


def test_build_target_seed_fixes_reinitialisation():
    source = make_source()

    first = build_target(source, reset_head=True, seed=3).model
    second = build_target(source, reset_head=True, seed=3).model
    other = build_target(source, reset_head=True, seed=4).model

    assert torch.equal(first.head.weight, second.head.weight)
    assert not torch.equal(first.head.weight, other.head.weight)


# --- lower layers ----------------------------------------------------------------------------


def test_lower_layer_names_exclude_head():
    assert lower_layer_names(make_source()) == ALL_PARAMETERS[:4]


def test_set_lower_layers_frozen_toggles_requires_grad():
    model = make_source()

    set_lower_layers_frozen(model, True)
    frozen = {name: param.requires_grad for name, param in model.named_parameters()}
    set_lower_layers_frozen(model, False)
    unfrozen = {name: param.requires_grad for name, param in model.named_parameters()}

    assert frozen == {name: name in HEAD_PARAMETERS for name in ALL_PARAMETERS}
    assert all(unfrozen.values())


# --- L2-SP penalty -------------------------------------------------------------------------


def test_l2sp_is_zero_right_after_transfer():
    result = build_target(make_source())

    penalty = l2sp_penalty(result.model, result.source_parameters, strength=0.5)

    assert penalty.shape == ()
    assert penalty.item() == 0.0


def test_l2sp_value_equals_hand_sum():
    result = build_target(make_source())
    perturb(result.model)
    strength = 0.37

    penalty = l2sp_penalty(result.model, result.source_parameters, strength)

    params = dict(result.model.named_parameters())
    by_hand = 0.0
    for name, anchor in result.source_parameters.items():
        difference = params[name].detach().numpy().astype(np.float64) - anchor.numpy().astype(np.float64)
        by_hand += float(np.sum(difference * difference))
    assert penalty.item() > 0.0
    assert penalty.item() == pytest.approx(strength * by_hand, rel=1e-6)


def test_l2sp_scales_linearly_with_strength():
    result = build_target(make_source())
    perturb(result.model)

    one = l2sp_penalty(result.model, result.source_parameters, 1.0)
    three = l2sp_penalty(result.model, result.source_parameters, 3.0)

    assert three.item() == pytest.approx(3.0 * one.item(), rel=1e-6)


def test_l2sp_ignores_reinitialised_head():
    result = build_target(make_source(), n_outputs=2)
    before = l2sp_penalty(result.model, result.source_parameters, 1.0).item()

    with torch.no_grad():
        result.model.head.weight.add_(5.0)
    after = l2sp_penalty(result.model, result.source_parameters, 1.0).item()

    assert before == 0.0
    assert after == 0.0


def test_l2sp_gradient_equals_closed_form():
    result = build_target(make_source())
    perturb(result.model)
    strength = 0.25

    l2sp_penalty(result.model, result.source_parameters, strength).backward()

    for name, param in result.model.named_parameters():
        expected = 2.0 * strength * (param.detach() - result.source_parameters[name])
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_l2sp_gradient_skips_reinitialised_head():
    result = build_target(make_source(), n_outputs=2)
    perturb(result.model)

    l2sp_penalty(result.model, result.source_parameters, 1.0).backward()

    assert result.model.head.weight.grad is None
    assert result.model.body[0].weight.grad is not None


def make_float64_target() -> tuple[FraudMLP, dict[str, torch.Tensor]]:
    result = build_target(make_source())
    model = result.model.double()
    anchors = {name: anchor.double() for name, anchor in result.source_parameters.items()}
    perturb(model)
    return model, anchors


def test_l2sp_gradient_float64_equals_closed_form():
    model, anchors = make_float64_target()
    strength = 0.25

    l2sp_penalty(model, anchors, strength).backward()

    for name, param in model.named_parameters():
        expected = 2.0 * strength * (param.detach() - anchors[name])
        assert param.grad.dtype == torch.float64
        torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-15, msg=name)


def test_l2sp_gradient_equals_finite_differences():
    model, anchors = make_float64_target()
    strength = 0.25
    step = 1e-6

    l2sp_penalty(model, anchors, strength).backward()

    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.view(-1)
            numeric = torch.empty_like(flat)
            for i in range(flat.numel()):
                original = flat[i].item()
                flat[i] = original + step
                plus = l2sp_penalty(model, anchors, strength).item()
                flat[i] = original - step
                minus = l2sp_penalty(model, anchors, strength).item()
                flat[i] = original
                numeric[i] = (plus - minus) / (2 * step)
            torch.testing.assert_close(param.grad.view(-1), numeric, rtol=1e-6, atol=1e-8, msg=name)

"""Build a target model from a source model: copy matching layers, re-initialise a differing head.

The target keeps a frozen copy of the transferred source parameters for the L2-SP penalty
λ·‖θ − θ_source‖² (Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer
Learning with Convolutional Networks", ICML 2018), which keeps the target near what the
source learnt while it fine-tunes on new data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .model import FraudMLP

logger = logging.getLogger(__name__)


@dataclass
class TransferResult:
    """A target model and what was taken from its source."""

    model: FraudMLP
    transferred: list[str]  # parameter names copied from the source
    reinitialised: list[str]  # parameter names left at a fresh initialisation
    source_parameters: dict[str, torch.Tensor]  # frozen copies, anchors of L2-SP


def build_target(
    source: FraudMLP,
    *,
    n_outputs: int | None = None,
    hidden: tuple[int, ...] | None = None,
    reset_head: bool = False,
    seed: int = 0,
) -> TransferResult:
    """Create a target model, copying each source layer whose parameters all match in name and shape.

    The normalisation buffers always come from the source, because the target reads the same
    features. With ``reset_head`` the output layer is re-initialised even if it matches.
    """
    torch.manual_seed(seed)
    target = FraudMLP(
        source.n_features,
        hidden if hidden is not None else source.hidden_sizes,
        n_outputs if n_outputs is not None else source.n_outputs,
    )
    target.set_normalisation(source.feature_mean, source.feature_std)
    source_state = source.state_dict()
    # A layer transfers whole or not at all. A bias copied next to a fresh weight matrix (for example
    # the head after a hidden width change) would anchor L2-SP to a value that no longer means anything.
    differing_layers = {
        _layer_of(name)
        for name, param in target.named_parameters()
        if name not in source_state
        or source_state[name].shape != param.shape
        or (reset_head and name.startswith("head."))
    }
    transferred, reinitialised = [], []
    with torch.no_grad():
        for name, param in target.named_parameters():
            if _layer_of(name) in differing_layers:
                reinitialised.append(name)
            else:
                param.copy_(source_state[name])
                transferred.append(name)
    anchors = {name: source_state[name].detach().clone() for name in transferred}
    logger.info("built target model transferred=%s reinitialised=%s", transferred, reinitialised)
    return TransferResult(target, transferred, reinitialised, anchors)


def _layer_of(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


def l2sp_penalty(model: torch.nn.Module, anchors: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """Return strength · Σ ‖θ − θ_source‖² over the transferred parameters (a scalar tensor)."""
    params = dict(model.named_parameters())
    total = torch.zeros(())
    for name, anchor in anchors.items():
        total = total + torch.sum((params[name] - anchor) ** 2)
    return strength * total


def lower_layer_names(model: FraudMLP) -> list[str]:
    """Names of the parameters below the head: the layers frozen during the first updates."""
    return [name for name, _ in model.named_parameters() if not name.startswith("head.")]


def set_lower_layers_frozen(model: FraudMLP, frozen: bool) -> None:
    for name, param in model.named_parameters():
        if not name.startswith("head."):
            param.requires_grad_(not frozen)

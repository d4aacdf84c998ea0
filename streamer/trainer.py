"""Micro-batch fine-tuning of a target model, guarded against non-finite updates."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .model import FraudMLP
from .transfer import TransferResult, l2sp_penalty, set_lower_layers_frozen

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """Outcome of one micro-batch."""

    examples: int
    loss: float  # data loss plus L2-SP term; NaN when the step was skipped
    applied: bool  # False when the loss or a gradient was not finite
    seconds: float


class MicroBatchTrainer:
    """Adam on binary cross-entropy plus L2-SP; frozen lower layers for the first updates.

    Not thread-safe: one thread owns the trainer (the updater's pipeline thread).
    """

    def __init__(
        self,
        transfer: TransferResult,
        *,
        learning_rate: float = 1e-3,
        l2sp_lambda: float = 1e-3,
        freeze_updates: int = 0,
    ) -> None:
        self.model: FraudMLP = transfer.model
        self.anchors = transfer.source_parameters
        self.l2sp_lambda = l2sp_lambda
        self.freeze_updates = freeze_updates
        self.updates = 0  # applied micro-batches
        self.skipped = 0  # micro-batches rejected as non-finite
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self._loss = nn.BCEWithLogitsLoss()
        set_lower_layers_frozen(self.model, self.updates < self.freeze_updates)

    def step(self, features: np.ndarray, labels: np.ndarray) -> StepResult:
        """Train on one micro-batch; leave model and optimiser untouched if anything is not finite."""
        started = time.perf_counter()
        set_lower_layers_frozen(self.model, self.updates < self.freeze_updates)
        self.model.train()
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.float32)).reshape(-1, 1)

        # 1. Loss: data term plus the pull towards the source parameters.
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)[:, :1]
        loss = self._loss(logits, y)
        if self.l2sp_lambda > 0 and self.anchors:
            loss = loss + l2sp_penalty(self.model, self.anchors, self.l2sp_lambda)
        loss_value = float(loss.detach())
        if not np.isfinite(loss_value):
            return self._skip(len(y), started, "loss")

        # 2. Gradients, checked before the optimiser may touch its state.
        loss.backward()
        if not self._gradients_finite():
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(len(y), started, "gradient")

        # 3. Update.
        self.optimizer.step()
        self.updates += 1
        return StepResult(len(y), loss_value, True, time.perf_counter() - started)

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _skip(self, n: int, started: float, what: str) -> StepResult:
        self.skipped += 1
        logger.warning("skipped micro-batch examples=%d reason=non-finite %s skipped_total=%d", n, what, self.skipped)
        return StepResult(n, float("nan"), False, time.perf_counter() - started)

    @torch.no_grad()
    def score(self, features: np.ndarray) -> np.ndarray:
        """Fraud probabilities of the live model, float32 of shape (n,)."""
        self.model.eval()
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return torch.sigmoid(self.model(x)[:, 0]).numpy()

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values())

    def state_dict(self) -> dict:
        """Return a deep copy of the trainer state, which later steps leave unchanged."""
        # Module and optimiser state dicts hold the live tensors, which the next step updates in place.
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "updates": self.updates,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        # Optimizer.load_state_dict keeps the tensors it is given, so pass a copy that `state` does not share.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        set_lower_layers_frozen(self.model, self.updates < self.freeze_updates)


@torch.no_grad()
def score_with(model: FraudMLP, features: np.ndarray) -> np.ndarray:
    """Fraud probabilities of any model (for example the frozen source), float32 of shape (n,)."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return torch.sigmoid(model(x)[:, 0]).numpy()

"""Early stopping: stop training after ``patience`` evaluations in a row without a better metric.

Every rank sees the same (broadcast) evaluation results, so every rank reaches the same
decision at the same epoch: under DDP all processes stop together without extra communication.
"""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    """Counts evaluations since the best one.

    >>> stopper = EarlyStopping(patience=3)
    >>> reason = stopper.update(improved=False, best=0.41)  # None until 3 in a row did not improve
    """

    def __init__(self, patience: int | None, metric: str = "AP") -> None:
        self.patience = patience
        self.metric = metric
        self.stale = 0  # evaluations since the best one

    def update(self, improved: bool, best: float) -> str | None:
        """Count one evaluation; returns why to stop once ``patience`` evaluations brought no
        better ``metric`` than ``best``, else ``None`` (always ``None`` without a patience)."""
        self.stale = 0 if improved else self.stale + 1
        if not self.patience or self.stale < self.patience:
            return None
        return f"early stopping: {self.metric} did not improve on {best:.4f} in {self.patience} evaluation(s)"

    def state_dict(self) -> dict[str, Any]:
        return {"stale": self.stale}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.stale = int((state or {}).get("stale", 0))

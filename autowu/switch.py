"""When AutoWU's warmup ends, and at which LR: the decision rule over the GP tests' results.

Like PyTorch's ``ReduceLROnPlateau`` splits its decision into small named steps, this object holds only the
rule and its counters (its own ``state_dict``); the scheduler measures, the schedule computes LRs.

- ``patience`` passing tests in a row end the warmup (the paper: 3), and so does the warmup cap.
- ``hold``: after a passing test the LR stops growing while the confirming tests run, and the ramp resumes where
  it stopped if a test fails. On the exponential ramp each epoch multiplies the LR by about 1.78 (40 epochs),
  so the paper's three confirming epochs overshoot the first sighting of the minimum about 5x: on a real run
  that alone wrecked it (issue 10). Holding makes confirmation cost no overshoot.
- ``peak_fraction``: the post-switch LR is this fraction of the LR at the GP's predicted minimum. The minimum of
  the loss along a fast ramp is close to the edge of stability, and a cosine from there trails a tuned peak.
"""
from __future__ import annotations

from typing import Dict

RAMP, HOLD, SWITCH = "ramp", "hold", "switch"


class SwitchRule:
    def __init__(self, patience: int = 3, hold: bool = False, peak_fraction: float = 1.0):
        if int(patience) != patience or patience < 1:
            raise ValueError(f"AutoWU: patience must be a positive integer, got {patience!r}")
        if not 0 < peak_fraction <= 1:
            raise ValueError(f"AutoWU: peak_fraction must be in (0, 1], got {peak_fraction!r}")
        self.patience = int(patience)
        self.hold = bool(hold)
        self.peak_fraction = float(peak_fraction)
        self.passes_in_row = 0

    def update(self, passed: bool, at_cap: bool) -> str:
        """The action after a test: ``"switch"``, ``"hold"`` (keep the LR) or ``"ramp"`` (keep raising it)."""
        self.passes_in_row = self.passes_in_row + 1 if passed else 0
        if at_cap or self.passes_in_row >= self.patience:
            return SWITCH
        if self.hold and self.passes_in_row > 0:
            return HOLD
        return RAMP

    def peak_lr(self, argmin_lr: float) -> float:
        return argmin_lr * self.peak_fraction

    def state_dict(self) -> Dict:
        return {"passes_in_row": self.passes_in_row}

    def load_state_dict(self, state: Dict) -> None:
        self.passes_in_row = int(state["passes_in_row"])

"""When AutoWU's warmup ends, and at which LR: the decision rule over the GP tests' results.

Like PyTorch's ``ReduceLROnPlateau`` splits its decision into small named steps, this object holds the rule
and everything it has decided (its own ``state_dict``); the scheduler measures, ``autowu.schedule`` turns the
decisions into LRs.

- ``patience`` passing tests in a row end the warmup (the paper: 3), and so does the warmup cap.
- ``hold``: after a passing test the LR stops growing while the confirming tests run. On the exponential ramp
  each epoch multiplies the LR by about 1.78 (40 epochs), so the paper's three confirming epochs overshoot the
  first sighting of the minimum about 5x: on a real run that alone wrecked it. Holding makes confirmation cost
  no overshoot.
- ``resume_from_argmin``: when a hold ends in a failing test, the ramp starts again from the LR that the
  hold's first test predicted as the minimum (taken back on the ramp: a "rewind"), not from the held LR,
  which was already past it. Without it (the paper, or ``hold`` off) the ramp goes on from where it stopped.
- ``peak_highest_of_hold``: a switch that ends a hold takes the highest LR that any test of the hold predicted as
  the minimum, not the last test's. While the LR is held past the minimum the losses rise under it, and the GP,
  a function of the step, moves its minimum earlier (to a lower LR), and runs that switch lower end lower
  (``benchmarks/RESULTS.md``). Where the loss still falls under the held LR the confirming test's
  minimum is the higher one and is taken as before. Each is an LR of steps the run has already taken (the GP
  places its minimum among the steps seen).
- ``peak_fraction``: the post-switch LR is this fraction of the LR at the GP's predicted minimum.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

RAMP, HOLD, SWITCH = "ramp", "hold", "switch"


class SwitchRule:
    def __init__(self, patience: int = 3, hold: bool = False, peak_fraction: float = 1.0,
                 resume_from_argmin: bool = False, peak_highest_of_hold: bool = False):
        # The values are AutoWU's options, checked where they are declared (``autowu.options``).
        self.patience = int(patience)
        self.hold = bool(hold)
        self.peak_fraction = float(peak_fraction)
        self.resume_from_argmin = bool(resume_from_argmin)
        self.peak_highest_of_hold = bool(peak_highest_of_hold)
        self.passes_in_row = 0
        # The decisions the schedule is a function of (``autowu.schedule.Decisions``).
        self.holds: List[List[Optional[int]]] = []   # [first held step, first step ramping again or None]
        self.rewinds: List[List[float]] = []          # [step, ramp steps taken back]: a hold that failed
        self.paces: List[List[float]] = []            # [step, ramp steps a step advances from it on]
        self.switch_step: Optional[int] = None
        self.peak_lr: Optional[float] = None
        self.hold_argmin_lr: Optional[float] = None   # the minimum the current hold's first test predicted
        self.hold_highest_argmin_lr: Optional[float] = None   # the highest minimum its tests predicted so far

    def action(self, passed: bool, at_cap: bool) -> str:
        """Count the test and say what follows: ``"switch"``, ``"hold"`` (keep the LR) or ``"ramp"``."""
        self.passes_in_row = self.passes_in_row + 1 if passed else 0
        if at_cap or self.passes_in_row >= self.patience:
            return SWITCH
        if self.hold and self.passes_in_row > 0:
            return HOLD
        return RAMP

    @property
    def switched_by_cap(self) -> bool:
        """Whether the last switch came from the warmup cap rather than enough passing tests."""
        return self.passes_in_row < self.patience

    @property
    def holding(self) -> bool:
        return bool(self.holds) and self.holds[-1][1] is None

    def decide(self, passed: bool, at_cap: bool, step: int, argmin_lr: float, schedule) -> str:
        """Take the test at ``step`` into account and record what follows; return the action.

        ``argmin_lr`` is the LR at the minimum the test predicted; ``schedule`` (``autowu.schedule.Schedule``)
        places LRs on the ramp for a rewind.
        """
        action = self.action(passed, at_cap)
        ends_hold = self.holding
        if action == HOLD and not self.holding:
            self.holds.append([step, None])
            self.hold_argmin_lr = self.hold_highest_argmin_lr = argmin_lr
        elif action == HOLD:
            self.hold_highest_argmin_lr = _highest(self.hold_highest_argmin_lr, argmin_lr)
        elif action != HOLD and self.holding:
            self.holds[-1][1] = step
            if action == RAMP and self.resume_from_argmin:
                target = min(self.hold_argmin_lr, schedule.warmup_lr_at(step, self))
                back = schedule.ramp_position(step, self) - schedule.position_of(target)
                if back > 0:
                    self.rewinds.append([step, back])
        if action == SWITCH:
            self.switch_step = step
            if self.peak_highest_of_hold and ends_hold:
                argmin_lr = _highest(self.hold_highest_argmin_lr, argmin_lr)
            self.peak_lr = argmin_lr * self.peak_fraction
        return action

    def set_pace(self, step: int, pace: float) -> None:
        """From ``step`` on, each step advances the ramp by ``pace`` ramp steps (the default's quick start,
        ``autowu.flat_start``)."""
        self.paces.append([step, float(pace)])

    @property
    def pace(self) -> float:
        """The ramp's pace in force."""
        return self.paces[-1][1] if self.paces else 1.0

    def state_dict(self) -> Dict:
        return {"passes_in_row": self.passes_in_row, "holds": [list(h) for h in self.holds],
                "rewinds": [list(r) for r in self.rewinds], "paces": [list(p) for p in self.paces],
                "hold_argmin_lr": self.hold_argmin_lr,
                "hold_highest_argmin_lr": self.hold_highest_argmin_lr,
                "switch_step": self.switch_step, "peak_lr": self.peak_lr}

    def load_state_dict(self, state: Dict) -> None:
        self.passes_in_row = int(state["passes_in_row"])
        self.holds = [list(h) for h in state.get("holds", [])]
        self.rewinds = [list(r) for r in state.get("rewinds", [])]
        self.paces = [list(p) for p in state.get("paces", [])]
        self.hold_argmin_lr = state.get("hold_argmin_lr")
        # (Checkpoints from before the highest minimum was kept: their hold's first test's.)
        self.hold_highest_argmin_lr = state.get("hold_highest_argmin_lr", self.hold_argmin_lr)
        self.switch_step = state.get("switch_step")
        self.peak_lr = state.get("peak_lr")


def _highest(a: Optional[float], b: float) -> float:
    """The larger of two predicted minima, leaving out one that is missing or not finite (a failed fit)."""
    finite = [x for x in (a, b) if x is not None and math.isfinite(x)]
    return max(finite) if finite else b

"""AutoWU's LR as a pure function of the step and the decisions taken so far.

Like timm's ``_get_lr(t)``: the shape of the schedule (the warmup ramp, its inverse, the cooldown) is a small
frozen object, and the LR of any step is computed from it and from the switch rule's decisions (where the ramp
was held or taken back, the switch step and the peak LR; ``autowu.switch``). Nothing here needs an optimizer,
so shapes can be checked, plotted and reused (``autowu.synthetic``) on their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np

WARMUP_TYPES = ("exp", "linear")
COOLDOWN_TYPES = ("cosine", "half_cosine", "linear")


def cooldown_factor(progress: float, cooldown_type: str) -> float:
    """LR multiplier at ``progress`` in [0, 1] of the cooldown: 1 -> 0 for cosine and linear; 0.5 -> 0 for the
    paper's half_cosine (the second half of a cosine, which halves the LR when the cooldown begins)."""
    progress = min(max(progress, 0.0), 1.0)
    if cooldown_type == "linear":
        return 1.0 - progress
    if cooldown_type == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.5 + 0.5 * math.cos(0.5 * math.pi * (1.0 + progress))


class Decisions(Protocol):
    """What the schedule reads of the switch rule (``autowu.switch.SwitchRule`` has these)."""
    holds: Sequence[Sequence[Optional[int]]]   # [first held step, first step ramping again or None]
    rewinds: Sequence[Sequence[float]]         # [step, ramp steps taken back]
    # (optional) paces: [step, ramp steps a step advances from it on] (autowu.flat_start)
    switch_step: Optional[int]
    peak_lr: Optional[float]


@dataclass(frozen=True)
class Schedule:
    """The warmup ramp from ``min_lr`` (step 0) to ``max_lr`` (``max_warmup_steps``), then the cooldown to 0 at
    ``total_steps``: from the switch (``immediate_cooldown``) or from ``cooldown_start_step``."""
    min_lr: float
    max_lr: float
    max_warmup_steps: int
    total_steps: int
    cooldown_start_step: int     # where a cooldown that is not immediate begins
    warmup_type: str = "exp"
    immediate_cooldown: bool = False
    cooldown_type: str = "cosine"

    @classmethod
    def build(cls, total_steps: int, min_lr: float, max_lr: float, max_warmup_fraction: float,
              warmup_type: str, immediate_cooldown: bool, cooldown_type: str, cooldown_fraction: float) -> "Schedule":
        """The schedule of a run of ``total_steps``, with the cap and cooldown given as fractions of it (the
        paper's: the cooldown begins at the first step >= (1 - fraction) * total)."""
        return cls(min_lr=min_lr, max_lr=max_lr, max_warmup_steps=max(1, int(max_warmup_fraction * total_steps)),
                   total_steps=total_steps, warmup_type=warmup_type, immediate_cooldown=immediate_cooldown,
                   cooldown_type=cooldown_type,
                   cooldown_start_step=min(total_steps, math.ceil((1 - cooldown_fraction) * total_steps)))

    def warmup_lr(self, position: float) -> float:
        """The ramp's LR at (possibly fractional) ramp ``position``: ``min_lr`` at 0, ``max_lr`` at the cap (and
        beyond it: a ramp sped up ends there, ``AutoWU.at_cap``)."""
        fraction = position / self.max_warmup_steps
        fraction = np.minimum(fraction, 1.0) if isinstance(fraction, np.ndarray) else min(fraction, 1.0)
        if self.warmup_type == "exp":
            return self.min_lr * (self.max_lr / self.min_lr) ** fraction
        return self.min_lr + (self.max_lr - self.min_lr) * fraction

    def position_of(self, lr: float) -> float:
        """Where on the ramp the warmup LR is ``lr`` (the inverse of ``warmup_lr``)."""
        if self.warmup_type == "exp":
            return self.max_warmup_steps * math.log(lr / self.min_lr) / math.log(self.max_lr / self.min_lr)
        return self.max_warmup_steps * (lr - self.min_lr) / (self.max_lr - self.min_lr)

    @property
    def warmup_end_cap(self) -> int:
        """The last step the warmup may reach: the cap, or the cooldown's start if that comes first."""
        return min(self.max_warmup_steps, self.cooldown_start_step)

    def steps_per_growth(self, factor: float) -> float:
        """Ramp steps over which the exponential ramp multiplies the LR by ``factor``."""
        return self.max_warmup_steps * math.log(factor) / math.log(self.max_lr / self.min_lr)

    @staticmethod
    def ramp_position(step: float, decisions: Decisions) -> float:
        """Ramp steps advanced by ``step``: each step advances the ramp by the pace in force (1, or what
        ``decisions.paces`` set: the default's quick start, ``autowu.flat_start``), except the steps held; less
        the ramp steps taken back."""
        paces = getattr(decisions, "paces", ())
        if not paces:  # the ramp's own pace throughout: the steps less those held
            position = step
            for start, end in decisions.holds:
                if start < step:
                    position -= min(step, end if end is not None else step) - start
        else:
            position = Schedule._paced_steps(step, paces, decisions.holds)
        for start, back in decisions.rewinds:
            if start <= step:
                position -= back
        return position

    @staticmethod
    def _paced_steps(step: float, paces, holds) -> float:
        """The sum over steps [0, ``step``) outside the holds of the pace in force: added interval by interval
        from 0, so that every step of a hold gives the same number, bit for bit."""
        cuts = {0.0, float(step)}
        cuts.update(float(start) for start, _ in paces if 0 < start < step)
        for start, end in holds:
            cuts.update(float(t) for t in (start, end) if t is not None and 0 < t < step)
        cuts = sorted(cuts)
        position = 0.0
        for lo, hi in zip(cuts, cuts[1:]):
            if any(start <= lo and (end is None or lo < end) for start, end in holds):
                continue  # held
            pace = next((float(p) for start, p in reversed(paces) if start <= lo), 1.0)
            position += pace * (hi - lo)
        return position

    def warmup_lr_at(self, step: float, decisions: Decisions) -> float:
        """The warmup LR used at (possibly fractional) step index ``step``, holds and rewinds included."""
        return self.warmup_lr(self.ramp_position(step, decisions))

    def lr(self, step: int, decisions: Decisions) -> float:
        """The LR for step index ``step`` (0-based)."""
        if decisions.switch_step is None or step < decisions.switch_step:
            return self.warmup_lr_at(step, decisions)
        if step >= self.total_steps:
            return 0.0
        start = decisions.switch_step if self.immediate_cooldown else max(decisions.switch_step,
                                                                           self.cooldown_start_step)
        if step < start:
            return decisions.peak_lr
        return decisions.peak_lr * cooldown_factor((step - start) / max(1, self.total_steps - start),
                                                   self.cooldown_type)

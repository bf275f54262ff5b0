"""Synthetic training-loss curves with a known minimum, for tests, benchmarks and plots.

The shape is that of an LR range test under AutoWU's exponential warmup: flat while the LR is too small to
learn, falling once it is large enough, rising steeply once it is too large. As a function of
``u = log10(lr)``::

    loss(u) = start - drop * sigmoid((u - learn_at) / width) + blowup * exp((u - explode_at) / sharpness)

Spikes (a fraction of steps reporting ``spike_factor`` times the loss) and non-finite values can be added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .schedule import Schedule


@dataclass(frozen=True)
class LossCurve:
    start: float = 2.3
    drop: float = 1.6
    learn_at: float = -3.0       # log10 LR where learning takes off
    width: float = 0.35
    blowup: float = 0.05
    explode_at: float = -1.0     # log10 LR past which the loss climbs; 0 blowup gives no minimum at all
    sharpness: float = 0.25
    noise: float = 0.02          # Gaussian noise, standard deviation

    def mean_loss(self, lr: np.ndarray) -> np.ndarray:
        u = np.log10(np.asarray(lr, dtype=np.float64))
        return (self.start - self.drop / (1.0 + np.exp(-(u - self.learn_at) / self.width))
                + self.blowup * np.exp((u - self.explode_at) / self.sharpness))

    def best_lr(self, min_lr: float = 1e-5, max_lr: float = 1.0) -> float:
        """The LR of the noiseless curve's minimum in [min_lr, max_lr] (max_lr when it only falls)."""
        lrs = np.logspace(math.log10(min_lr), math.log10(max_lr), 20001)
        return float(lrs[int(np.argmin(self.mean_loss(lrs)))])

    def sample(self, lrs: np.ndarray, seed=0, spike_rate: float = 0.0, spike_factor: float = 5.0,
               nonfinite_rate: float = 0.0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        losses = self.mean_loss(lrs) + self.noise * rng.standard_normal(len(lrs))
        if spike_rate:
            spikes = rng.random(len(lrs)) < spike_rate
            losses[spikes] *= spike_factor
        if nonfinite_rate:
            bad = rng.random(len(lrs)) < nonfinite_rate
            losses[bad] = rng.choice([np.nan, np.inf], size=int(bad.sum()))
        return losses


def exponential_warmup_lrs(num_steps: int, warmup_steps: int, min_lr: float = 1e-5,
                           max_lr: float = 1.0) -> np.ndarray:
    """The LR each of the first ``num_steps`` steps trains at under AutoWU's exponential warmup."""
    ramp = Schedule(min_lr=min_lr, max_lr=max_lr, max_warmup_steps=warmup_steps, total_steps=num_steps,
                    cooldown_start_step=num_steps, warmup_type="exp")
    return ramp.warmup_lr(np.arange(num_steps))


def run_scheduler(scheduler, curve: LossCurve, seed: int = 0, spike_rate: float = 0.0,
                  nonfinite_rate: float = 0.0, stop_at: int = None) -> list:
    """Step ``scheduler`` with losses drawn from ``curve`` at the LR it sets; return the LRs it set.

    The loss of each step is drawn at the LR that step trained with, as in a real run. Stops after
    ``stop_at`` steps (default: the scheduler's total), so that a run can be cut and resumed.
    """
    lrs = []
    stop_at = scheduler.total_steps if stop_at is None else stop_at
    while scheduler.last_step < stop_at:
        lr = scheduler.get_last_lr()[0]
        lrs.append(lr)
        # Seeded by (seed, step): a run cut and resumed draws the same losses as one that was not.
        loss = curve.sample(np.array([lr]), seed=(seed, scheduler.last_step), spike_rate=spike_rate,
                            nonfinite_rate=nonfinite_rate)[0]
        scheduler.step(float(loss))
    return lrs

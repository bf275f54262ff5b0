"""Which losses the GP test should ignore: non-finite values and isolated spikes.

A loss spike (one bad batch, a loss-scale hiccup) is a single step far off its neighbours. The GP, with a
lengthscale of a fifth of the run, reads a few of them near the end as "the curve is rising", and the paper's
test then ends the warmup far too early (1% of steps at five times the loss ends it at LR ~2e-5).

The rule here judges a loss only once the losses after it are known: it is a spike when it lies more than
``threshold`` robust standard deviations beyond *both* the median of the ``half_window`` losses before it and
the median of the ``half_window`` losses after it. An isolated spike is off both sides and goes. A point on a
rising flank is not: the losses after it are higher than the ones before, and a noisy high point on the way up
lies above the level before it but not far above the level after it. The last ``half_window`` losses, which
have fewer after them, are judged against the level of the last ``half_window`` losses with twice the
threshold (and the first ones against the level of the first). A rule against a centred running median would
remove the noisy top of a real rise, the very evidence the test looks for (``tests/test_scheduler.py`` holds
such a recorded curve).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _blockwise_mad_sigma(residual: np.ndarray, block: int) -> np.ndarray:
    """1.4826 * median |residual| over consecutive blocks: a Gaussian sigma that follows a noise level
    changing through training, in O(n)."""
    num_blocks = max(1, len(residual) // block)
    edges = np.linspace(0, len(residual), num_blocks + 1).astype(int)
    sigma = np.empty_like(residual)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sigma[lo:hi] = 1.4826 * np.median(np.abs(residual[lo:hi]))
    return sigma


def usable_losses(losses: np.ndarray, threshold: float = 6.0, half_window: int = 15, scale_block: int = 200,
                  relative_floor: float = 0.005) -> np.ndarray:
    """Mask of losses to fit: finite, and (when ``threshold`` is set) not a spike by the rule above.

    ``relative_floor`` keeps an almost noiseless curve from flagging ordinary steps: deviations under that
    fraction of the loss are never spikes.
    """
    finite = np.isfinite(losses)
    if threshold is None or finite.sum() < 2 * half_window + 1:
        return finite
    values = losses[finite]
    n, h = len(values), half_window
    windows = sliding_window_view(values, h)          # windows[j] = values[j:j + h]
    medians = np.median(windows, axis=1)
    judged = np.arange(n)
    # Before: the h losses that precede; for the first h losses, the level of the first h.
    before = medians[np.maximum(judged - h, 0)]
    # After: the h losses that follow; for the last h losses, which have fewer, the level of the last h
    # losses (on a rise that level has risen too, so the top of a noisy rise stays; an isolated spike at the
    # end of a flat stretch does not).
    after = medians[np.minimum(judged + 1, n - h)]
    # The noise scale: deviations from the mean of the two sides, by blocks (the noise grows as the LR does).
    residual = values[judged] - 0.5 * (before + after)
    sigma = _blockwise_mad_sigma(residual, scale_block)
    sigma = np.maximum(sigma, relative_floor * np.abs(0.5 * (before + after)) + 1e-12)
    # The last h losses are judged against their own level only, so twice as strictly: a spike of a bad batch
    # is many times the loss and still goes, the top of a noisy rise stays.
    limit = threshold * sigma * np.where(judged >= n - h, 2.0, 1.0)
    above = values[judged] - np.maximum(before, after) > limit
    below = np.minimum(before, after) - values[judged] > limit
    keep = np.ones(n, dtype=bool)
    keep[judged[above | below]] = False
    mask = np.zeros_like(finite)
    mask[np.flatnonzero(finite)[keep]] = True
    return mask

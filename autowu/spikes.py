"""Which losses the GP test should ignore: non-finite values and isolated spikes.

A loss spike (one bad batch, a loss-scale hiccup) is a single step far above its neighbours. The GP, with a
lengthscale of a fifth of the run, reads a few of them near the end as "the curve is rising" and the paper's
test then ends the warmup far too early (1% of steps at five times the loss ends it at LR ~2e-5). A spike is
judged against a running median of its neighbours and a running median absolute deviation, so a loss that
rises and stays risen (the divergence the test exists to find) is followed by the median and kept.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _running_median(values: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    padded = np.pad(values, half, mode="reflect") if len(values) > half else np.pad(values, half, mode="edge")
    return np.median(sliding_window_view(padded, window), axis=1)


def _blockwise_mad_sigma(residual: np.ndarray, block: int) -> np.ndarray:
    """1.4826 * median |residual| over consecutive blocks: a Gaussian sigma that follows a noise level
    changing through training, in O(n)."""
    num_blocks = max(1, len(residual) // block)
    edges = np.linspace(0, len(residual), num_blocks + 1).astype(int)
    sigma = np.empty_like(residual)
    for lo, hi in zip(edges[:-1], edges[1:]):
        sigma[lo:hi] = 1.4826 * np.median(np.abs(residual[lo:hi]))
    return sigma


def usable_losses(losses: np.ndarray, threshold: float = 6.0, window: int = 31,
                  scale_block: int = 200, relative_floor: float = 0.005) -> np.ndarray:
    """Mask of losses to fit: finite, and (when ``threshold`` is set) no more than ``threshold`` robust
    standard deviations from the running median of the ``window`` finite losses around them.

    ``relative_floor`` keeps an almost noiseless curve from flagging ordinary steps: deviations under that
    fraction of the loss are never spikes.
    """
    finite = np.isfinite(losses)
    if threshold is None or finite.sum() < window:
        return finite
    values = losses[finite]
    residual = values - _running_median(values, window)
    sigma = _blockwise_mad_sigma(residual, scale_block)
    sigma = np.maximum(sigma, relative_floor * np.abs(values - residual) + 1e-12)
    keep = np.abs(residual) <= threshold * sigma
    mask = np.zeros_like(finite)
    mask[np.flatnonzero(finite)[keep]] = True
    return mask

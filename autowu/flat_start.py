"""Whether the training loss has begun to respond to the warmup's LR: the default mode's quick start.

The exponential ramp spends as many steps on each decade of LR, and begins five decades below the top. Where an
LR far below the useful range leaves the loss where it started, those steps decide nothing; on a short run
(a large batch for few epochs: 240 steps, a ramp of 48) they are most of the ramp, and the ramp reaches the
useful decades too fast for the loss to show where its minimum is (SGD at 16x its batch reached the cap at LR 1.0
with the loss still falling, and diverged; ``benchmarks/RESULTS.md``). While the loss has not moved, the ramp
runs faster (``flat_ramp_speedup``); from the first test at which it has moved, the rest of the ramp is spread
over the steps left to the cap, so the steps the quick start saved go to the decades that decide. All this only
where the ramp is fast: one that climbs a decade in ``MIN_STEPS_PER_DECADE`` steps or more ramps as before.

The same judgement gates the test (``pass_once_moved``): AutoWU looks for the bottom of a curve that falls, then
rises; while the loss has neither fallen nor risen, a passing test has found the "minimum" of the noise about its
start. One such pair of passes, on AdamP with BatchNorm at LR 1.8e-5 (steps 33 and 66; 11-step means of the loss
2.45, 2.37, 2.38, 2.43, 2.38, 2.38), ended a run's warmup there: 80.4% top-1 against 97.9% for its other seeds.
A loss that rises from the start has moved: a run that diverges before it learns still switches back to before.

"Moved" needs no unit: the mean of the last ``window`` usable losses differs from the mean of the first
``window`` by more than ``z`` standard errors, the noise taken from the successive differences (robust: the
median absolute difference), which a trend barely touches, and by more than ``MIN_RELATIVE_MOVE`` of the first
window's level. The second condition keeps a drift that is real but slight from counting: at LRs far below the
useful ones SGD moved a cross-entropy of 2.306 by 0.2% within 10 steps, significant against noise of 0.1%, where
the ramp still has three decades to climb. A fall or a rise counts: a loss that rises has responded too.
"""
from __future__ import annotations

import math

import numpy as np

MOVED_Z = 3.0
NOT_YET_KNOWN = 2   # how the loss has moved, where too few losses say (beside -1 fallen, +1 risen, 0 not)
MIN_RELATIVE_MOVE = 0.005
MIN_WINDOW = 4
# The quick start runs only on a ramp that climbs a decade of LR in fewer steps than this. The loss answers an LR
# with a lag of the optimizer's memory (some 10 steps at momentum 0.9): at 10 steps a decade the loss seen at an
# LR is that of an LR up to 10x lower, and SGD's ramp at 16x its batch reached the cap before the loss turned.
# Once the loss has moved, the quick start spreads the rest of the ramp over the steps left to the cap: slowed
# only to 20 steps a decade, or to 30, SGD at 16x still reached the top of its ramp before the loss turned in some
# seeds. A ramp as slow as this is left as it is: SGD for 90 epochs climbs a decade in 40 steps and switched at
# 0.15-0.35 (the grid's best 0.3); slowed to about 70, at 0.11-0.13 and 0.6 point lower; sped up through its flat
# start and then at its own pace, one seed in 20 switched at 0.6 and diverged.
MIN_STEPS_PER_DECADE = 30.0


def loss_shift(losses: np.ndarray, usable: np.ndarray, window: int, z: float = MOVED_Z,
               min_relative: float = MIN_RELATIVE_MOVE) -> int:
    """-1 (fallen) or +1 (risen) where the mean of the last ``window`` usable losses lies more than ``z`` standard
    errors and more than ``min_relative`` of the first window's level from the mean of the first ``window``;
    0 otherwise, and while there are fewer than two windows of usable losses (not yet known)."""
    kept = np.asarray(losses, dtype=np.float64)[np.asarray(usable, dtype=bool)]
    window = max(int(window), MIN_WINDOW)
    if len(kept) < 2 * window:
        return 0
    sigma = 1.4826 * float(np.median(np.abs(np.diff(kept)))) / math.sqrt(2.0)
    first = float(kept[:window].mean())
    shift = float(kept[-window:].mean()) - first
    if abs(shift) > z * sigma * math.sqrt(2.0 / window) and abs(shift) > min_relative * abs(first):
        return -1 if shift < 0 else 1
    return 0


def not_yet_known(losses: np.ndarray, usable: np.ndarray, window: int) -> bool:
    """Whether there are too few usable losses to judge (``loss_shift`` then says 0)."""
    return int(np.asarray(usable, dtype=bool).sum()) < 2 * max(int(window), MIN_WINDOW)

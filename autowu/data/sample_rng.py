"""Random numbers for augmentation, drawn from (seed, epoch, sample index, draw) alone.

FFCV 1.0.2's crop and flip draw from numba's per-thread generators, seeded by nothing: two runs with the same
seed see different crops, and a resumed run differs from its unbroken self. Here every draw is a hash of where
it is used (splitmix64, a counter-based generator): the same sample in the same epoch gets the same crop, flip
and lighting on any rank, thread or run, and after a resume. The epoch reaches the compiled FFCV operations
through ``EpochCell``, a one-number array the loader sets before each epoch: numba freezes the values a closure
captures, so the operations capture the cell's address and read through it.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Draw numbers, one range per augmentation, so that no two use the same stream.
CROP_DRAWS = 0          # up to 2 x 10 tries + 2 (FFCV's 10 tries of scale and ratio, then the position)
FLIP_DRAW = 64
LIGHTING_DRAWS = 96     # 3 normals, 2 uniforms each

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_EPOCH_KEY = np.uint64(0xD6E8FEB86659FD93)
_INDEX_KEY = np.uint64(0xA0761D6478BD642F)
_DRAW_KEY = np.uint64(0xE7037ED1A0B428DB)


@numba.njit(cache=False)
def _splitmix64(x):
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=False)
def uniform(seed, epoch, index, draw):
    """A float in [0, 1) that depends on its four arguments only."""
    key = _splitmix64(np.uint64(seed))
    key = _splitmix64(key ^ (np.uint64(epoch) * _EPOCH_KEY))
    key = _splitmix64(key ^ (np.uint64(index) * _INDEX_KEY))
    key = _splitmix64(key ^ (np.uint64(draw) * _DRAW_KEY))
    return np.float64(key >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=False)
def normal(seed, epoch, index, draw):
    """A standard normal (Box-Muller) from draws ``2 * draw`` and ``2 * draw + 1``."""
    u1 = 1.0 - uniform(seed, epoch, index, 2 * draw)  # (0, 1]: log is finite
    u2 = uniform(seed, epoch, index, 2 * draw + 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@intrinsic
def _as_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@numba.njit(cache=False)
def read_cell(address):
    """The int64 stored at ``address`` (an ``EpochCell``), read at run time, not frozen at compile time."""
    return numba.carray(_as_pointer(address), 1, np.int64)[0]


class EpochCell:
    """The epoch the compiled augmentations draw for. Operations keep a reference, so the memory lives."""

    def __init__(self, epoch: int = 0):
        self.value = np.array([epoch], dtype=np.int64)

    @property
    def address(self) -> int:
        return int(self.value.ctypes.data)

    def set(self, epoch: int) -> None:
        self.value[0] = epoch

    def get(self) -> int:
        return int(self.value[0])

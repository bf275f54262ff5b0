"""Horizontal flip and PCA lighting noise (AlexNet's, in the paper's recipe) as FFCV operations, seeded per sample.

Lighting: each image gets ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, alphastd)`` per channel, added to every
pixel, unrounded and unclipped as in the paper's code. The paper adds it to [0, 1] images; here to [0, 255]
ones (x255), before normalisation. All draws come from (seed, epoch, sample index) (``sample_rng``), so the CPU
and GPU paths, and a resumed run, compute the same augmentation:

- CPU: ``FlipLightingNormalize``, uint8 -> float32: flip, then ``x * inv_std + bias`` with the lighting offset
  folded into each image's bias; the training loader runs it inside the decoder's loop, on each image right
  after its resize (``SeededRandomResizedCropDecoder(tail=...)``, the same functions).
- GPU: ``SeededHorizontalFlip`` on uint8, FFCV's normalisation on the device, and the lighting added there as
  a per-image bias in normalised units (``LightingBias``, a 3-number output drawn on the host from the label
  field's pipeline and shipped with the batch; ``TrainLoader`` adds it). No extra pass over uint8 pixels on the
  CPU, which is the loader's bottleneck for ResNet-50, and no rounding of offsets of 0.1-3 levels.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numba
import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from .sample_rng import FLIP_DRAW, LIGHTING_DRAWS, EpochCell, normal, read_cell, uniform

IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]])


def _require_decoded_images(operation: Operation, state: State) -> None:
    if state.dtype != np.uint8 or len(state.shape) != 3:
        raise ValueError(f"{type(operation).__name__} expects uint8 HWC images from a decoder, got {state.dtype} "
                         f"{state.shape}: put it before ToTensor and normalisation")


def _check_probabilities(name: str, alphastd: float, flip_prob: float = 0.5) -> None:
    if alphastd < 0 or not 0 <= flip_prob <= 1:
        raise ValueError(f"{name}: need alphastd >= 0 and 0 <= flip_prob <= 1, got {alphastd}, {flip_prob}")


def lighting_offsets(alphas: np.ndarray, eigval: np.ndarray = IMAGENET_EIGVAL,
                     eigvec: np.ndarray = IMAGENET_EIGVEC) -> np.ndarray:
    """Per-image RGB offsets in uint8 units from per-image ``alphas`` (n x 3)."""
    return 255.0 * (alphas * eigval) @ eigvec.T


@numba.njit(cache=False)
def draw_alphas(seed, epoch, sample, alphastd):
    """One sample's lighting alphas, ``N(0, alphastd)`` per PCA component, from (seed, epoch, sample)."""
    alphas = np.empty(3)
    for c in range(3):
        alphas[c] = alphastd * normal(seed, epoch, sample, LIGHTING_DRAWS + c)
    return alphas


def sample_alphas(seed: int, epoch: int, indices, alphastd: float) -> np.ndarray:
    """The lighting alphas (n x 3) the operations draw for these samples."""
    return np.array([draw_alphas(seed, epoch, int(i), alphastd) for i in indices]).reshape(len(indices), 3)


def sample_flips(seed: int, epoch: int, indices, flip_prob: float) -> np.ndarray:
    """Which of these samples the operations flip."""
    return np.array([uniform(seed, epoch, int(i), FLIP_DRAW) < flip_prob for i in indices], dtype=bool)


def flip_lighting_normalize_reference(images: np.ndarray, flips: np.ndarray, alphas: np.ndarray,
                                      mean: np.ndarray, std: np.ndarray, eigval: np.ndarray = IMAGENET_EIGVAL,
                                      eigvec: np.ndarray = IMAGENET_EIGVEC) -> np.ndarray:
    """Plain numpy: what ``FlipLightingNormalize`` computes (no rounding, no clipping, as the paper)."""
    out = images.astype(np.float64)
    out[flips] = out[flips][:, :, ::-1]
    out += lighting_offsets(alphas, eigval, eigvec)[:, None, None, :]
    return ((out - mean) / std).astype(np.float32)


@numba.njit(cache=False)
def image_bias(seed, epoch, sample, flip_prob, alphastd, eigval, scaled_eigvec_t, mean, inv_std):
    """One sample's flip and its normalisation bias with the lighting folded in:
    (x + offset - mean) / std = x * inv_std + bias."""
    flip = uniform(seed, epoch, sample, FLIP_DRAW) < flip_prob
    alphas = draw_alphas(seed, epoch, sample, alphastd)
    return flip, (((alphas * eigval) @ scaled_eigvec_t - mean) * inv_std).astype(np.float32)


@numba.njit(cache=False)
def flip_lighting_normalize_image(image, dst, flip, inv_std, bias):
    """uint8 HWC -> float32 HWC: flipped if ``flip``, then ``x * inv_std + bias`` per channel."""
    height, width = image.shape[0], image.shape[1]
    b0, b1, b2 = bias[0], bias[1], bias[2]
    for y in range(height):
        for x in range(width):
            sx = width - 1 - x if flip else x
            dst[y, x, 0] = image[y, sx, 0] * inv_std[0] + b0
            dst[y, x, 1] = image[y, sx, 1] * inv_std[1] + b1
            dst[y, x, 2] = image[y, sx, 2] * inv_std[2] + b2


class _Seeded(Operation):
    """An operation whose draws come from (seed, the loader's epoch, sample index)."""

    def __init__(self, seed: int = 0, epoch_cell: Optional[EpochCell] = None):
        super().__init__()
        self.seed = int(seed)
        self.epoch_cell = epoch_cell if epoch_cell is not None else EpochCell()


class FlipLightingNormalize(_Seeded):
    """The CPU path's fused tail: horizontal flip, PCA lighting and normalisation in one pass, uint8 -> float32.

    On a CPU every extra pass over the batch costs: separately, FFCV's flip, a lighting pass and FFCV's
    ``NormalizeImage`` run at ~1,100 images/s on 2 cores; fused, at ~1,400 (benchmarks/RESULTS.md).
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, flip_prob: float = 0.5, alphastd: float = 0.1,
                 eigval: np.ndarray = IMAGENET_EIGVAL, eigvec: np.ndarray = IMAGENET_EIGVEC, seed: int = 0,
                 epoch_cell: Optional[EpochCell] = None):
        super().__init__(seed, epoch_cell)
        _check_probabilities("FlipLightingNormalize", alphastd, flip_prob)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.flip_prob = float(flip_prob)
        self.alphastd = float(alphastd)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)

    def constants(self) -> Tuple:
        """What ``image_bias`` needs besides the sample: for this op and for a decoder that runs it fused."""
        return (self.flip_prob, self.alphastd, self.eigval.copy(), 255.0 * self.eigvec.T.copy(), self.mean.copy(),
                (1.0 / self.std).astype(np.float32))

    def generate_code(self) -> Callable:
        parallel_range = Compiler.get_iterator()
        flip_prob, alphastd, eigval, scaled_eigvec_t, mean, inv_std = self.constants()
        seed, cell = self.seed, self.epoch_cell.address

        def flip_lighting_normalize(images, dst, indices):
            epoch = read_cell(cell)
            for i in parallel_range(images.shape[0]):
                flip, bias = image_bias(seed, epoch, indices[i], flip_prob, alphastd, eigval, scaled_eigvec_t, mean,
                                        inv_std)
                flip_lighting_normalize_image(images[i], dst[i], flip, inv_std, bias)
            return dst

        flip_lighting_normalize.is_parallel = True
        flip_lighting_normalize.with_indices = True
        return flip_lighting_normalize

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        _require_decoded_images(self, previous_state)
        new_state = replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32))
        return new_state, AllocationQuery(previous_state.shape, np.dtype(np.float32))


class SeededHorizontalFlip(_Seeded):
    """FFCV's ``RandomHorizontalFlip`` on uint8 HWC images, each sample's coin from (seed, epoch, index)."""

    def __init__(self, flip_prob: float = 0.5, seed: int = 0, epoch_cell: Optional[EpochCell] = None):
        super().__init__(seed, epoch_cell)
        _check_probabilities("SeededHorizontalFlip", 0.0, flip_prob)
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        parallel_range = Compiler.get_iterator()
        flip_prob, seed, cell = self.flip_prob, self.seed, self.epoch_cell.address

        def flip(images, dst, indices):
            epoch = read_cell(cell)
            for i in parallel_range(images.shape[0]):
                if uniform(seed, epoch, indices[i], FLIP_DRAW) < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        _require_decoded_images(self, previous_state)
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class LightingBias(_Seeded):
    """Each image's lighting offset in normalised units, ``offset / std`` (n x 3 float32), from any per-sample
    field (the label's pipeline): the device adds it to the normalised batch, ``TrainLoader`` does so."""

    def __init__(self, std: np.ndarray, alphastd: float = 0.1, eigval: np.ndarray = IMAGENET_EIGVAL,
                 eigvec: np.ndarray = IMAGENET_EIGVEC, seed: int = 0, epoch_cell: Optional[EpochCell] = None):
        super().__init__(seed, epoch_cell)
        _check_probabilities("LightingBias", alphastd)
        self.std = np.asarray(std, dtype=np.float64)
        self.alphastd = float(alphastd)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)

    def generate_code(self) -> Callable:
        alphastd, eigval = self.alphastd, self.eigval.copy()
        scaled_eigvec_t = (255.0 * self.eigvec.T) / self.std[None, :]
        seed, cell = self.seed, self.epoch_cell.address

        def lighting_bias(labels, dst, indices):
            epoch = read_cell(cell)
            for i in range(labels.shape[0]):
                alphas = draw_alphas(seed, epoch, indices[i], alphastd)
                dst[i] = ((alphas * eigval) @ scaled_eigvec_t).astype(np.float32)
            return dst

        lighting_bias.with_indices = True
        return lighting_bias

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        new_state = replace(previous_state, jit_mode=True, shape=(3,), dtype=np.dtype(np.float32))
        return new_state, AllocationQuery((3,), np.dtype(np.float32))

"""PCA lighting noise (AlexNet's, in the paper's recipe) as an FFCV operation compiled with numba.

Each image gets ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, alphastd)`` per channel, added to every pixel.
The paper adds it to [0, 1] images; here it runs on the decoded uint8 HWC images before normalisation (x255,
rounded, clipped), so the rest of the pipeline is ffcv-imagenet's, including GPU normalisation to fp16.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]])


def _require_decoded_images(operation: Operation, state: State) -> None:
    if state.dtype != np.uint8 or len(state.shape) != 3:
        raise ValueError(f"{type(operation).__name__} expects uint8 HWC images from a decoder, got {state.dtype} "
                         f"{state.shape}: put it before ToTensor and normalisation")


def lighting_offsets(alphas: np.ndarray, eigval: np.ndarray = IMAGENET_EIGVAL,
                     eigvec: np.ndarray = IMAGENET_EIGVEC) -> np.ndarray:
    """Per-image RGB offsets in uint8 units from per-image ``alphas`` (n x 3)."""
    return 255.0 * (alphas * eigval) @ eigvec.T


def lighting_reference(images: np.ndarray, alphas: np.ndarray, eigval: np.ndarray = IMAGENET_EIGVAL,
                       eigvec: np.ndarray = IMAGENET_EIGVEC) -> np.ndarray:
    """Plain numpy: what the operation computes for a batch (n x H x W x 3 uint8) and its alphas."""
    offsets = lighting_offsets(alphas, eigval, eigvec)[:, None, None, :]
    return np.clip(np.rint(images.astype(np.float64) + offsets), 0, 255).astype(np.uint8)


class Lighting(Operation):
    """FFCV operation: PCA lighting noise on uint8 HWC images (CPU side, before ``ToTensor``).

    ``seed``: when given, each batch's alphas come from ``seed`` and the batch's first sample index, so the
    same batch gets the same noise (as FFCV's Mixup seeds itself); by default they are fresh every batch.
    """

    def __init__(self, alphastd: float = 0.1, eigval: np.ndarray = IMAGENET_EIGVAL,
                 eigvec: np.ndarray = IMAGENET_EIGVEC, seed: Optional[int] = None):
        super().__init__()
        if alphastd < 0:
            raise ValueError(f"Lighting: alphastd must be >= 0, got {alphastd}")
        self.alphastd = float(alphastd)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)
        self.seed = seed

    def generate_code(self) -> Callable:
        parallel_range = Compiler.get_iterator()
        alphastd = self.alphastd
        scaled_eigvec_t = 255.0 * self.eigvec.T.copy()  # offsets = (alpha * eigval) @ (255 eigvec^T)
        eigval = self.eigval.copy()
        seeded = self.seed is not None
        seed = 0 if self.seed is None else int(self.seed)

        def lighting(images, dst, indices):
            num_images = images.shape[0]
            if seeded:
                np.random.seed(seed + indices[0])
            alphas = np.random.normal(0.0, alphastd, (num_images, 3))
            offsets = (alphas * eigval) @ scaled_eigvec_t
            height, width = images.shape[1], images.shape[2]
            for i in parallel_range(num_images):
                for c in range(3):
                    offset = offsets[i, c]
                    for y in range(height):
                        for x in range(width):
                            value = np.rint(images[i, y, x, c] + offset)
                            dst[i, y, x, c] = min(max(value, 0.0), 255.0)
            return dst

        lighting.is_parallel = True
        lighting.with_indices = True
        return lighting

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        _require_decoded_images(self, previous_state)
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


def flip_lighting_normalize_reference(images: np.ndarray, flips: np.ndarray, alphas: np.ndarray,
                                      mean: np.ndarray, std: np.ndarray, eigval: np.ndarray = IMAGENET_EIGVAL,
                                      eigvec: np.ndarray = IMAGENET_EIGVEC) -> np.ndarray:
    """Plain numpy: what ``FlipLightingNormalize`` computes (no rounding, no clipping, as the paper)."""
    out = images.astype(np.float64)
    out[flips] = out[flips][:, :, ::-1]
    out += lighting_offsets(alphas, eigval, eigvec)[:, None, None, :]
    return ((out - mean) / std).astype(np.float32)


class FlipLightingNormalize(Operation):
    """The CPU path's fused tail: horizontal flip, PCA lighting and normalisation in one pass, uint8 -> float32.

    On a CPU every extra pass over the batch costs: separately, FFCV's flip, ``Lighting`` and FFCV's
    ``NormalizeImage`` run at ~1,100 images/s on 2 cores; fused, at ~1,400 (benchmarks/RESULTS.md). On a GPU
    the pipeline keeps ``Lighting`` on uint8 and normalises on the device.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, flip_prob: float = 0.5, alphastd: float = 0.1,
                 eigval: np.ndarray = IMAGENET_EIGVAL, eigvec: np.ndarray = IMAGENET_EIGVEC,
                 seed: Optional[int] = None):
        super().__init__()
        if alphastd < 0 or not 0 <= flip_prob <= 1:
            raise ValueError(f"FlipLightingNormalize: need alphastd >= 0 and 0 <= flip_prob <= 1, "
                             f"got {alphastd}, {flip_prob}")
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.flip_prob = float(flip_prob)
        self.alphastd = float(alphastd)
        self.eigval = np.asarray(eigval, dtype=np.float64)
        self.eigvec = np.asarray(eigvec, dtype=np.float64)
        self.seed = seed

    def generate_code(self) -> Callable:
        parallel_range = Compiler.get_iterator()
        alphastd, flip_prob = self.alphastd, self.flip_prob
        scaled_eigvec_t = 255.0 * self.eigvec.T.copy()
        eigval = self.eigval.copy()
        inv_std = (1.0 / self.std).astype(np.float32)
        mean = self.mean.copy()
        seeded = self.seed is not None
        seed = 0 if self.seed is None else int(self.seed)

        def flip_lighting_normalize(images, dst, indices):
            num_images = images.shape[0]
            if seeded:
                np.random.seed(seed + indices[0])
            alphas = np.random.normal(0.0, alphastd, (num_images, 3))
            flips = np.random.rand(num_images) < flip_prob
            # (x + offset - mean) / std = x * inv_std + bias, with the lighting offset folded into the bias
            bias = (((alphas * eigval) @ scaled_eigvec_t - mean) * inv_std).astype(np.float32)
            height, width = images.shape[1], images.shape[2]
            for i in parallel_range(num_images):
                flip = flips[i]
                b0, b1, b2 = bias[i, 0], bias[i, 1], bias[i, 2]
                for y in range(height):
                    for x in range(width):
                        sx = width - 1 - x if flip else x
                        dst[i, y, x, 0] = images[i, y, sx, 0] * inv_std[0] + b0
                        dst[i, y, x, 1] = images[i, y, sx, 1] * inv_std[1] + b1
                        dst[i, y, x, 2] = images[i, y, sx, 2] * inv_std[2] + b2
            return dst

        flip_lighting_normalize.is_parallel = True
        flip_lighting_normalize.with_indices = True
        return flip_lighting_normalize

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        _require_decoded_images(self, previous_state)
        new_state = replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32))
        return new_state, AllocationQuery(previous_state.shape, np.dtype(np.float32))

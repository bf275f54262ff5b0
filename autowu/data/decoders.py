"""FFCV's random-resized-crop decoder, seeded per sample and with a faster resize.

Crops: FFCV 1.0.2 draws them from numba's unseeded per-thread generators; here each crop comes from
(seed, epoch, sample index) (``sample_rng``), FFCV's procedure otherwise (10 tries of scale and log-ratio, then
the centre fallback).

Resize: FFCV resizes every crop with OpenCV's INTER_AREA, even for ratios near 1: on a CPU about as long as
decoding the JPEG. ``autowu/data/_fast_resize.cpp`` (built by setup.py against the same OpenCV)
resizes with INTER_LINEAR while the crop is under twice the output size either way (bilinear then reads every
source pixel's neighbourhood: nothing to average away) and with INTER_AREA beyond. If the extension was not
built, FFCV's resize is used.
"""
from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import replace
from typing import Callable, Optional, Tuple

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from .lighting import flip_lighting_normalize_image, image_bias
from .sample_rng import CROP_DRAWS, EpochCell, read_cell, uniform


def _load_fast_resize():
    # AUTOWU_FAST_RESIZE: a library built elsewhere (the GPU check kit's, next to the OpenCV it bundles).
    found = [os.environ["AUTOWU_FAST_RESIZE"]] if os.environ.get("AUTOWU_FAST_RESIZE") else glob.glob(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fast_resize*.so"))
    if not found:
        return None
    function = ctypes.CDLL(found[0]).autowu_resize_crop
    function.argtypes = [ctypes.c_int64] * 10
    function.restype = None
    return function


_FAST_RESIZE = _load_fast_resize()
HAVE_FAST_RESIZE = _FAST_RESIZE is not None


def fast_resize_crop(source, start_row, end_row, start_col, end_col, destination):
    """``ffcv.libffcv.resize_crop``'s signature; bilinear under 2x, area beyond (see the module's text)."""
    _FAST_RESIZE(source.ctypes.data, source.shape[0], source.shape[1], start_row, end_row, start_col, end_col,
                 destination.ctypes.data, destination.shape[0], destination.shape[1])


@numba.njit(cache=False)
def seeded_random_crop(height, width, scale, ratio, seed, epoch, index):
    """FFCV's ``get_random_crop`` (torchvision's RandomResizedCrop), its draws from (seed, epoch, index)."""
    height, width = np.int64(height), np.int64(width)
    area = height * width
    log_ratio = np.log(ratio)
    for attempt in range(10):
        u_scale = uniform(seed, epoch, index, CROP_DRAWS + 2 * attempt)
        u_ratio = uniform(seed, epoch, index, CROP_DRAWS + 2 * attempt + 1)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(seed, epoch, index, CROP_DRAWS + 20) * (height - h + 1))
            j = int(uniform(seed, epoch, index, CROP_DRAWS + 21) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


class SeededRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """``RandomResizedCropRGBImageDecoder`` whose crops come from (seed, epoch, sample index), with
    ``fast_resize_crop`` when it was built. ``epoch_cell`` is the loader's (``TrainLoader`` sets it).

    ``tail``: a ``FlipLightingNormalize`` to run on each image right after its resize, while the image is in
    the cache, in the same parallel loop (the output is then float32): one pass over the batch and one
    barrier fewer than the operation on its own, with the same arithmetic.
    """

    def __init__(self, output_size: Tuple[int, int], scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0,
                 epoch_cell: Optional[EpochCell] = None, tail=None):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = int(seed)
        self.epoch_cell = epoch_cell if epoch_cell is not None else EpochCell()
        self.tail = tail

    def declare_state_and_memory(self, previous_state):
        state, (images, temp) = super().declare_state_and_memory(previous_state)
        if self.tail is None:  # (the decoded JPEG, the resized crop: the output)
            return state, (temp, images)
        float32 = np.dtype(np.float32)
        # (the decoded JPEG, the resized uint8 crop, the float32 output)
        return replace(state, dtype=float32), (temp, images, AllocationQuery(images.shape, float32))

    def generate_code(self) -> Callable:
        # FFCV's decode loop (ffcv/fields/rgb_image.py, ResizedCropRGBImageDecoder), crop and resize swapped.
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(fast_resize_crop if HAVE_FAST_RESIZE else resize_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        seed, cell = self.seed, self.epoch_cell.address
        finish, tail_cell = _tail_code(self.tail), (self.tail or self).epoch_cell.address

        @numba.njit(inline="always")
        def decode_one(field, image_data, temp_buffer, sample, epoch, destination):
            height = np.uint32(field["height"])
            width = np.uint32(field["width"])
            if field["mode"] == jpg:
                imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
            else:
                image = image_data.reshape(height, width, 3)
            i, j, h, w = seeded_random_crop(height, width, scale, ratio, seed, epoch, sample)
            resize_crop_c(image, i, i + h, j, j + w, destination)

        def decode(batch_indices, my_storage, metadata, storage_state):
            # without a tail the resized crops are the output (my_storage[1] is my_storage[-1])
            temp_storage, resized, destination = my_storage[0], my_storage[1], my_storage[-1]
            epoch, tail_epoch = read_cell(cell), read_cell(tail_cell)
            # Images take 2-3x longer to decode one than another: threads take them one at a time (numba's
            # default splits the batch in equal halves up front, and the batch waits for the slower half).
            chunk = numba.set_parallel_chunksize(1)
            for dst_ix in my_range(len(batch_indices)):
                sample = batch_indices[dst_ix]
                field = metadata[sample]
                decode_one(field, mem_read(field["data_ptr"], storage_state), temp_storage[dst_ix], sample, epoch,
                           resized[dst_ix])
                finish(resized[dst_ix], destination[dst_ix], sample, tail_epoch)
            numba.set_parallel_chunksize(chunk)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


@numba.njit(inline="always")
def _no_tail(image, destination, sample, epoch):
    pass


def _tail_code(tail) -> Callable:
    """What the decoder does to each resized crop: nothing, or ``tail`` (a ``FlipLightingNormalize``) into the
    float32 output, with the operation's own functions and constants."""
    if tail is None:
        return _no_tail
    flip_prob, alphastd, eigval, scaled_eigvec_t, mean, inv_std = tail.constants()
    seed = tail.seed

    @numba.njit(inline="always")
    def finish(image, destination, sample, epoch):
        flip, bias = image_bias(seed, epoch, sample, flip_prob, alphastd, eigval, scaled_eigvec_t, mean, inv_std)
        flip_lighting_normalize_image(image, destination, flip, inv_std, bias)
    return finish

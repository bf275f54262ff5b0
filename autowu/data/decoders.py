"""FFCV's random-resized-crop decoder with a faster resize.

FFCV 1.0.2 resizes every crop with OpenCV's INTER_AREA, ~0.6-1 ms an image on this CPU even for ratios near 1:
as much as decoding the JPEG. ``autowu/data/_fast_resize.cpp`` (built by setup.py against the same OpenCV)
resizes with INTER_LINEAR while the crop is under twice the output size either way (bilinear then reads every
source pixel's neighbourhood: nothing to average away) and with INTER_AREA beyond. Same crops, same
arguments, same output as FFCV's decoder otherwise. If the extension was not built, FFCV's resize is used.
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode
from ffcv.pipeline.compiler import Compiler


def _load_fast_resize():
    found = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fast_resize*.so"))
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


class FastRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """``RandomResizedCropRGBImageDecoder`` (same arguments) with ``fast_resize_crop``."""

    def generate_code(self) -> Callable:
        if not HAVE_FAST_RESIZE:
            return super().generate_code()
        # FFCV's decode loop (ffcv/fields/rgb_image.py, ResizedCropRGBImageDecoder), with the resize swapped.
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(fast_resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

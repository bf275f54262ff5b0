"""FFCV train and validation loaders for the engine.

Train: random-resized crop, horizontal flip, PCA lighting noise, normalisation; val: center crop at 224/256.
Every random augmentation is drawn from (seed, epoch, sample index) (``sample_rng``): two runs with one seed see
the same batches, and a resumed run sees its unbroken self's.
On a GPU the output is ffcv-imagenet's: uint8 to the device, channels-last, normalised there to fp16 (FFCV's GPU
``NormalizeImage``, which needs cupy: ``pip install autowu[gpu]``), plus each image's lighting as a bias added
on the device. On a CPU everything numpy-side runs before ``ToTensor()``: FFCV 1.0.2 loops forever on a jitted,
non-jitted, jitted chain (issue #396), so normalisation must come before the tensor conversion there.

Each data-parallel rank reads its own shard (FFCV's distributed mode wraps torch's DistributedSampler).
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import environment
from ..errors import ConfigError, MissingFileError, UserError
from .config import TrainLoaderConfig, ValLoaderConfig
from .decoders import SeededRandomResizedCropDecoder
from .lighting import FlipLightingNormalize, LightingBias, SeededHorizontalFlip
from .sample_rng import EpochCell

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def beton_info(path: str) -> dict:
    """Number of samples, fields and largest image side of a beton; one clear error if it is not usable."""
    if not os.path.isfile(path):
        raise MissingFileError(f"beton not found: {path} (write one with: python launch/write_betons.py "
                                f"--data_root <folder with train/ and val/> --out_dir <dir>)")
    from ffcv.reader import Reader
    try:
        reader = Reader(path)
    except Exception as err:
        raise MissingFileError(f"{path} is not a readable FFCV beton: {type(err).__name__}: {err}") from None
    names = list(reader.field_names)
    missing = {"image", "label"} - set(names)
    if missing:
        raise UserError(f"beton {path} lacks fields {sorted(missing)} (has {names}); write it with "
                         "launch/write_betons.py")
    image_meta = reader.metadata[f"f{names.index('image')}"]
    return {"num_samples": int(reader.num_samples), "fields": names,
            "max_side": int(max(image_meta["width"].max(), image_meta["height"].max())),
            "min_side": int(min(image_meta["width"].min(), image_meta["height"].min()))}


def loader_workers(requested: Optional[int], local_world_size: Optional[int] = None) -> int:
    """Worker threads for one rank's FFCV loader.

    FFCV runs its pipeline in numba threads and calls ``numba.set_num_threads(num_workers)``, which raises above
    numba's thread limit; and on an 8-GPU node, 8 ranks x 12 threads oversubscribe the cores. ``None`` takes
    the cores this process may use divided by the ranks on this node (DeepSpeed's launcher sets ``LOCAL_SIZE``,
    torchrun ``LOCAL_WORLD_SIZE``); an explicit number wins, but not above numba's limit.
    """
    import numba
    limit = numba.config.NUMBA_NUM_THREADS
    if requested is not None:
        if not 1 <= requested <= limit:
            raise ConfigError(f"num_workers {requested}: FFCV sets that many numba threads, and numba allows "
                             f"1 to {limit} here (NUMBA_NUM_THREADS); lower it or leave it unset (automatic)")
        return requested
    local = local_world_size or environment.local_world_size()
    return max(1, min(limit, environment.usable_cores() // max(1, local)))


def warn_if_page_cache_too_small(path: str, os_cache: bool, ranks_on_node: int = 1) -> Optional[str]:
    """``os_cache=True`` with a random order reads the whole beton through the page cache: a node needs the
    beton's size in memory or every epoch goes back to the disk at random. Says so (once, at start-up)."""
    if not os_cache or not hasattr(os, "sysconf"):
        return None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = os.path.getsize(path)
    if size <= memory:
        return None
    message = (f"{path} is {size / 2**30:.1f} GiB but this node has {memory / 2**30:.1f} GiB of memory: with "
               "os_cache=true and a random order every epoch will read it from disk at random; copy the betons "
               "to a faster local disk, write them with a smaller max_resolution, or set train.os_cache false "
               "(FFCV's own per-process memory manager instead of the page cache)")
    import warnings
    warnings.warn(message)
    return message


def _distributed_world(distributed: bool) -> int:
    if not distributed:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a distributed FFCV Loader needs the process group first: call "
                           "deepspeed.init_distributed() (or torch.distributed.init_process_group) before it")
    return dist.get_world_size()


def _check_batches(path: str, info: dict, batch_size: int, world: int, drop_last: bool) -> None:
    per_rank = info["num_samples"] // world
    if drop_last and per_rank < batch_size:
        raise UserError(f"beton {path} has {info['num_samples']} images: {per_rank} per rank on {world} ranks, "
                         f"fewer than one batch of {batch_size}; lower the batch size or use more data")


def _label_pipeline(device: torch.device) -> List:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    pipeline = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline


def _image_tail(device: torch.device, dtype) -> List:
    """Normalisation, tensor conversion and device transfer, in the order each device needs."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage
    if device.type == "cuda":
        return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16 if dtype is None else dtype)]
    return [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32 if dtype is None else dtype),
            ToTensor(), ToTorchImage()]


class _ReusedBuffers:
    """Mixed into FFCV's ``Loader``: the pipeline's buffers are allocated once, not at every epoch.

    FFCV 1.0.2's ``EpochIterator`` allocates every batch slot's buffers anew each epoch (a slot's JPEG scratch
    alone is the batch times the largest image), and their pages are then faulted in again all through the
    epoch: the CPU loader ran at 69-70% of the decode limit, 88-92% with the buffers kept
    (benchmarks/RESULTS.md). Kept buffers must not be written by two epochs at once, so an epoch left
    unfinished is closed (its thread joined) before the next starts, and on a GPU the device is synchronised
    first (the last batches may still be read by queued kernels; FFCV's per-slot events do not outlive an epoch).
    """

    def __init__(self, *args, **kwargs):
        self._epoch_iterator = None
        super().__init__(*args, **kwargs)
        allocate, kept = self.graph.allocate_memory, {}

        def allocate_once(batch_size, slots):
            if (batch_size, slots) not in kept:
                kept[(batch_size, slots)] = allocate(batch_size, slots)
            return kept[(batch_size, slots)]
        self.graph.allocate_memory = allocate_once

    def _before_epoch(self) -> None:
        previous = self._epoch_iterator
        if previous is not None and previous.is_alive():
            # An epoch left unfinished: its thread still decodes ahead, into the buffers the next one will use.
            previous.close()
            previous.join()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __iter__(self):
        self._before_epoch()
        self._epoch_iterator = super().__iter__()
        return self._epoch_iterator


class _TrainLoader(_ReusedBuffers):
    """Mixed into FFCV's ``Loader`` (built lazily, ffcv is optional): sets the augmentations' epoch before each
    epoch and, when the lighting travels as a per-image bias, adds it to the normalised batch."""

    def __init__(self, *args, epoch_cell: EpochCell, adds_lighting_bias: bool, **kwargs):
        self.epoch_cell, self.adds_lighting_bias = epoch_cell, adds_lighting_bias
        self._skip_batches = 0
        super().__init__(*args, **kwargs)

    def skip_next(self, batches: int) -> None:
        """Start the next epoch after its first ``batches`` batches (a run resumed mid-epoch): the same order,
        the remaining batches only, none of the skipped ones decoded. Augmentations are drawn per sample index,
        so the remaining batches are exactly the unbroken epoch's."""
        self._skip_batches = int(batches)

    def next_traversal_order(self):
        order = super().next_traversal_order()
        skip, self._skip_batches = self._skip_batches, 0
        return order[skip * self.batch_size:]

    def _before_epoch(self) -> None:
        super()._before_epoch()  # the previous epoch's thread, which reads the epoch cell, is done first
        self.epoch_cell.set(self.next_epoch)

    def __iter__(self):
        batches = super().__iter__()
        if not self.adds_lighting_bias:
            return batches
        return self._add_lighting(batches)

    @staticmethod
    def _add_lighting(batches):
        for images, labels, bias in batches:
            images.add_(bias.to(images.dtype).view(-1, 3, 1, 1))
            yield images, labels


def _train_loader_class():
    from ffcv.loader import Loader
    return type("TrainLoader", (_TrainLoader, Loader), {})


def _val_loader_class():
    from ffcv.loader import Loader
    return type("ValLoader", (_ReusedBuffers, Loader), {})


def train_loader(path: str, config: TrainLoaderConfig, batch_size: int, device="cpu", distributed: bool = False,
                 seed: int = 0, epoch: int = 0, dtype=None, indices=None,
                 lighting_on_batch: Optional[bool] = None):
    """The training loader, ``batch_size`` images a rank (the launcher's: DeepSpeed's
    ``train_micro_batch_size_per_gpu``, its one owner). ``epoch`` sets where the sample order and the augmentations start (a resumed run
    passes its epoch; FFCV does not checkpoint it). ``seed`` seeds both. ``lighting_on_batch``: add the
    lighting to the normalised batch as a per-image bias (the GPU path; default on CUDA and for non-float32
    output) instead of the CPU's fused flip-lighting-normalise pass; both compute the same augmentation."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    device = torch.device(device)
    info = beton_info(path)
    world = _distributed_world(distributed)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"train loader: batch_size must be a positive integer, got {batch_size!r}")
    _check_batches(path, info, batch_size, world, config.drop_last)
    if config.order == "quasi_random" and distributed:
        raise ConfigError("train.order quasi_random does not work with distributed loading in FFCV 1.0.2; "
                         "use random")
    if lighting_on_batch is None:
        lighting_on_batch = device.type == "cuda" or dtype not in (None, np.float32)
    cell = EpochCell(epoch)
    # CPU: flip, lighting and normalisation fused into the decoder's loop, on each image while it is in the
    # cache (one pass over the batch fewer); then the tensor conversion.
    tail = None if lighting_on_batch else FlipLightingNormalize(
        IMAGENET_MEAN, IMAGENET_STD, flip_prob=0.5 if config.flip else 0.0, alphastd=config.lighting_alphastd,
        seed=seed, epoch_cell=cell)
    image = [SeededRandomResizedCropDecoder((config.resolution, config.resolution), scale=tuple(config.scale),
                                            ratio=tuple(config.ratio), seed=seed, epoch_cell=cell, tail=tail)]
    pipelines = {"image": image, "label": _label_pipeline(device)}
    adds_lighting_bias = lighting_on_batch and config.lighting_alphastd > 0
    if lighting_on_batch:
        if config.flip:
            image.append(SeededHorizontalFlip(0.5, seed=seed, epoch_cell=cell))
        image += _image_tail(device, dtype)
        if adds_lighting_bias:
            bias = [LightingBias(IMAGENET_STD, config.lighting_alphastd, seed=seed, epoch_cell=cell), ToTensor()]
            if device.type == "cuda":
                bias.append(ToDevice(device, non_blocking=True))
            pipelines["lighting"] = PipelineSpec("label", decoder=IntDecoder(), transforms=bias)
    else:
        image += [ToTensor(), ToTorchImage()]
    order = OrderOption.QUASI_RANDOM if config.order == "quasi_random" else OrderOption.RANDOM
    warn_if_page_cache_too_small(path, config.os_cache)
    loader = _train_loader_class()(path, epoch_cell=cell, adds_lighting_bias=adds_lighting_bias,
                                   batch_size=batch_size, num_workers=loader_workers(config.num_workers),
                                   os_cache=config.os_cache, order=order, distributed=distributed, seed=seed,
                                   drop_last=config.drop_last, batches_ahead=config.batches_ahead,
                                   indices=indices, pipelines=pipelines)
    loader.next_epoch = epoch
    return loader


def val_loader(path: str, config: ValLoaderConfig, device="cpu", distributed: bool = False, dtype=None,
               indices=None):
    """The validation loader: sequential, every image (a distributed run pads to a multiple of the ranks)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder
    from ffcv.loader import OrderOption

    device = torch.device(device)
    info = beton_info(path)
    world = _distributed_world(distributed)
    _check_batches(path, info, 1, world, drop_last=False)
    image = [CenterCropRGBImageDecoder((config.resolution, config.resolution), ratio=config.crop_ratio)]
    image += _image_tail(device, dtype)
    return _val_loader_class()(path, batch_size=config.batch_size, num_workers=loader_workers(config.num_workers),
                               os_cache=config.os_cache, order=OrderOption.SEQUENTIAL, distributed=distributed,
                               drop_last=False, batches_ahead=config.batches_ahead, indices=indices,
                               pipelines={"image": image, "label": _label_pipeline(device)})

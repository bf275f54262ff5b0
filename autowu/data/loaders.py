"""FFCV train and validation loaders for the engine.

Train: random-resized crop, horizontal flip, PCA lighting noise, normalisation; val: center crop at 224/256.
On a GPU the output is ffcv-imagenet's: uint8 to the device, channels-last, normalised there to fp16 (FFCV's GPU
``NormalizeImage``, which needs cupy: ``pip install autowu[gpu]``). On a CPU everything numpy-side runs before
``ToTensor()``: FFCV 1.0.2 loops forever on a jitted, non-jitted, jitted chain (issue #396), so normalisation
must come before the tensor conversion there.

Each data-parallel rank reads its own shard (FFCV's distributed mode wraps torch's DistributedSampler).
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import TrainLoaderConfig, ValLoaderConfig
from .decoders import FastRandomResizedCropDecoder
from .lighting import FlipLightingNormalize, Lighting

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


def beton_info(path: str) -> dict:
    """Number of samples, fields and largest image side of a beton; one clear error if it is not usable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"beton not found: {path} (write one with: python launch/write_betons.py "
                                f"--data_root <folder with train/ and val/> --out_dir <dir>)")
    from ffcv.reader import Reader
    try:
        reader = Reader(path)
    except Exception as err:
        raise ValueError(f"{path} is not a readable FFCV beton: {type(err).__name__}: {err}") from None
    names = list(reader.field_names)
    missing = {"image", "label"} - set(names)
    if missing:
        raise ValueError(f"beton {path} lacks fields {sorted(missing)} (has {names}); write it with "
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
            raise ValueError(f"num_workers {requested}: FFCV sets that many numba threads, and numba allows "
                             f"1 to {limit} here (NUMBA_NUM_THREADS); lower it or leave it unset (automatic)")
        return requested
    local = local_world_size or int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(limit, cores // max(1, local)))


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
        raise ValueError(f"beton {path} has {info['num_samples']} images: {per_rank} per rank on {world} ranks, "
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


def train_loader(path: str, config: TrainLoaderConfig, device="cpu", distributed: bool = False,
                 seed: int = 0, epoch: int = 0, lighting_seed: Optional[int] = None, dtype=None,
                 indices=None):
    """The training loader. ``epoch`` sets where the sample order starts (a resumed run passes its epoch;
    FFCV does not checkpoint it)."""
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    device = torch.device(device)
    info = beton_info(path)
    world = _distributed_world(distributed)
    if config.batch_size is None:
        raise ValueError("train loader: train.batch_size is not set (the launcher sets it to DeepSpeed's "
                         "train_micro_batch_size_per_gpu; set it yourself when using the loader on its own)")
    _check_batches(path, info, config.batch_size, world, config.drop_last)
    if config.order == "quasi_random" and distributed:
        raise ValueError("train.order quasi_random does not work with distributed loading in FFCV 1.0.2; "
                         "use random")
    image = [FastRandomResizedCropDecoder((config.resolution, config.resolution), scale=tuple(config.scale),
                                              ratio=tuple(config.ratio))]
    if device.type == "cuda" or dtype not in (None, np.float32):
        if config.flip:
            image.append(RandomHorizontalFlip())
        if config.lighting_alphastd > 0:
            image.append(Lighting(config.lighting_alphastd, seed=lighting_seed))
        image += _image_tail(device, dtype)
    else:  # CPU: one fused pass for flip, lighting and normalisation, then the tensor conversion
        image += [FlipLightingNormalize(IMAGENET_MEAN, IMAGENET_STD, flip_prob=0.5 if config.flip else 0.0,
                                        alphastd=config.lighting_alphastd, seed=lighting_seed),
                  ToTensor(), ToTorchImage()]
    order = OrderOption.QUASI_RANDOM if config.order == "quasi_random" else OrderOption.RANDOM
    warn_if_page_cache_too_small(path, config.os_cache)
    loader = Loader(path, batch_size=config.batch_size, num_workers=loader_workers(config.num_workers),
                    os_cache=config.os_cache,
                    order=order, distributed=distributed, seed=seed, drop_last=config.drop_last,
                    batches_ahead=config.batches_ahead, indices=indices,
                    pipelines={"image": image, "label": _label_pipeline(device)})
    loader.next_epoch = epoch
    return loader


def val_loader(path: str, config: ValLoaderConfig, device="cpu", distributed: bool = False, dtype=None,
               indices=None):
    """The validation loader: sequential, every image (a distributed run pads to a multiple of the ranks)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    device = torch.device(device)
    info = beton_info(path)
    world = _distributed_world(distributed)
    _check_batches(path, info, 1, world, drop_last=False)
    image = [CenterCropRGBImageDecoder((config.resolution, config.resolution), ratio=config.crop_ratio)]
    image += _image_tail(device, dtype)
    return Loader(path, batch_size=config.batch_size, num_workers=loader_workers(config.num_workers),
                  os_cache=config.os_cache, order=OrderOption.SEQUENTIAL, distributed=distributed, drop_last=False,
                  batches_ahead=config.batches_ahead, indices=indices,
                  pipelines={"image": image, "label": _label_pipeline(device)})

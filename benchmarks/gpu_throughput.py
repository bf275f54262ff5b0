"""ResNet-50 throughput on one GPU at its training resolution, all in one run, with the ratios that matter:

- ``loader``: FFCV's training loader alone (``ffcv_configs/rn50_imagenet.json``: random-resized crop to 224,
  flip, lighting as a per-image bias on the device, fp16, channels_last), images/s;
- ``train``: FFCV + DeepSpeed fp16 ZeRO-1 with ZeroAdamP and AutoWU (``ds_configs/resnet50_4k.json`` at one
  GPU's 256 images), images/s;
- ``model_only``: the same engine on synthetic on-device tensors (the model's ceiling);
- ``torchvision``: torchvision's ImageFolder + DataLoader on the same JPEGs and cores (RandomResizedCrop, flip,
  ToTensor, Normalize: the usual recipe), images/s, for the ratio to FFCV;
- ``zero_adamp_share``: the client optimizer's (ZeroAdamP's) time inside the ``model_only`` steps (CUDA events
  around its ``step``) and its share of them;
- ``channels_last``: whether ZeRO left the convolution weights channels_last, and what NCHW weights under
  channels_last activations cost per step against channels_last ones (fp16 forward + backward, no DeepSpeed).

The JPEGs are generated at ImageNet-like sizes (sides 250-500, quality 90, 72 KiB mean; ImageNet's are about
110 KiB: smooth colour fields plus noise) and written as betons with the ResNet-50 settings (proportion mode,
longest side 500, compress 0.5).
``--device cpu`` is the dry run: the same code on a few images and a tiny model, no CUDA call.

    python benchmarks/gpu_throughput.py --out $OUT/throughput.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import time

import numpy as np
import torch

from autowu.data import DataConfig, train_loader, write_betons
from autowu.data.loaders import IMAGENET_MEAN, IMAGENET_STD, loader_workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jpeg(job):
    import cv2
    path, seed = job
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(250, 501)), int(rng.integers(300, 501))
    field = rng.integers(0, 256, (6, 6, 3)).astype(np.float32)
    image = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 18, image.shape).astype(np.float32)
    cv2.imwrite(path, np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])


def make_jpegs(root: str, count: int, classes: int, workers: int) -> dict:
    jobs = []
    for split, n in (("train", count), ("val", max(classes, count // 25))):
        for i in range(n):
            folder = os.path.join(root, split, f"c{i % classes:03d}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{i:06d}.JPEG"), 2 * i + (split == "val")))
    with multiprocessing.Pool(workers) as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    train = [p for p, _ in jobs if f"{os.sep}train{os.sep}" in p]
    return {"train_images": len(train), "mean_jpeg_kib": float(np.mean([os.path.getsize(p) for p in train]) / 1024)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batches(batches, device, count_epochs: int, step=None) -> dict:
    """Images/s over ``count_epochs`` passes of an iterable factory, after one untimed pass (JIT, cuDNN)."""
    def one_pass():
        images = 0
        for x, y in batches():
            if step is not None:
                step(x, y)
            images += len(y)
        return images
    one_pass()
    _sync(device)
    started = time.perf_counter()
    images = sum(one_pass() for _ in range(count_epochs))
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def build_engine(model_name: str, device, batch: int, steps_per_epoch: int, epochs: int):
    import deepspeed
    import timm
    import autowu.deepspeed as autowu_ds
    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    config = json.load(open(os.path.join(REPO, "ds_configs", "resnet50_4k.json")))
    for key in ("train", "tensorboard", "csv_monitor"):
        config.pop(key)
    config.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch)
    if device.type != "cuda":
        config["fp16"]["enabled"] = False  # the dry run: fp16 engines need a GPU (or a patched CPU accelerator)
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000).to(device).to(memory_format=torch.channels_last)
    engine, _, _, scheduler = autowu_ds.initialize(model=model, config=config, steps_per_epoch=steps_per_epoch,
                                                   total_epochs=epochs)
    return engine, scheduler


class OptimizerTimes:
    """The client optimizer's (ZeroAdamP's) time inside each engine step, from CUDA events around its ``step``:
    no host synchronisation in the loop; the events are read once, after it."""

    def __init__(self, device):
        self.device, self.pairs = device, []

    def wrap(self, step):
        def timed_step(*args, **kwargs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = step(*args, **kwargs)
                end.record()
                self.pairs.append((start, end))
            else:
                started = time.perf_counter()
                out = step(*args, **kwargs)
                self.pairs.append(time.perf_counter() - started)
            return out
        return timed_step

    def report(self, steps: int, seconds: float) -> dict:
        _sync(self.device)
        ms = [p[0].elapsed_time(p[1]) if isinstance(p, tuple) else p * 1e3 for p in self.pairs[-steps:]]
        return {"steps": len(ms), "median_ms": float(np.median(ms)), "min_ms": float(np.min(ms)),
                "max_ms": float(np.max(ms)), "share_of_step": float(np.sum(ms) / 1e3 / seconds)}


def time_client_optimizer(engine, device) -> OptimizerTimes:
    """Wrap the ZeRO optimizer's client optimizer (ZeroAdamP on the fp32 partition) with a timer."""
    client = engine.optimizer.optimizer
    times = OptimizerTimes(device)
    client.step = times.wrap(client.step)
    return times


def conv_weights_channels_last(module) -> dict:
    convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    return {"conv_weights_3x3_or_larger": len(convs),
            "channels_last": sum(w.is_contiguous(memory_format=torch.channels_last) for w in convs)}


def channels_last_cost(model_name: str, device, batch: int, resolution: int, steps: int) -> dict:
    """fp16 forward + backward with channels_last activations: weights channels_last against NCHW (as ZeRO's
    flat-buffer views leave them)."""
    import timm
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    result = {}
    for layout in ("channels_last", "nchw"):
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=1000).to(device, dtype).to(
            memory_format=torch.channels_last)
        if layout == "nchw":
            for p in model.parameters():
                p.data = p.data.contiguous()
        for i in range(steps + 3):
            if i == 3:
                _sync(device)
                started = time.perf_counter()
            model(x).float().sum().backward()
        _sync(device)
        result[f"{layout}_ms_per_step"] = (time.perf_counter() - started) / steps * 1e3
    result["nchw_weights_cost"] = result["nchw_ms_per_step"] / result["channels_last_ms_per_step"] - 1
    return result


def torchvision_loader(folder: str, batch: int, workers: int, resolution: int, device):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    transform = T.Compose([T.RandomResizedCrop(resolution), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN / 255, IMAGENET_STD / 255)])
    dataset = ImageFolder(folder, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=True)

    def batches():
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return batches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--work_dir", default=None, help="where the JPEGs and betons go (default: next to --out)")
    parser.add_argument("--device", default="cuda", help="cpu: the dry run (few images, a tiny model)")
    parser.add_argument("--images", type=int, default=None, help="train JPEGs (default 6,400; dry run 96)")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes for each figure")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA device (use --device cpu for the dry run)")
    dry = device.type != "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batch = 32 if dry else 256
    count = args.images or (96 if dry else 6400)
    model_name = "test_resnet" if dry else "resnet50"
    cores = len(os.sched_getaffinity(0))
    work = args.work_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "throughput_data")
    data = DataConfig.from_json(os.path.join(REPO, "ffcv_configs", "rn50_imagenet.json"))
    resolution = data.train.resolution
    results = {"cores": cores, "torch": torch.__version__, "model": model_name, "batch": batch,
               "resolution": resolution}
    started = time.perf_counter()

    # The JPEGs and betons first: their worker processes fork before CUDA is initialised in this one.
    results["jpegs"] = make_jpegs(os.path.join(work, "jpegs"), count, min(100, count // 4), cores)
    write_config = dataclasses.replace(data.write, num_workers=cores)
    write_betons(os.path.join(work, "jpegs"), os.path.join(work, "betons"), write_config, progress=False)
    results["device"] = torch.cuda.get_device_name() if not dry else "cpu (dry run)"
    beton = os.path.join(work, "betons", "train.beton")
    results["beton_mib"] = os.path.getsize(beton) / 2**20
    train_config = data.train
    results["loader_threads"] = loader_workers(train_config.num_workers)
    loader = train_loader(beton, train_config, batch, device=device, seed=0)
    steps_per_epoch = len(loader)

    results["loader"] = time_batches(lambda: loader, device, args.epochs)

    # A long run: the LR stays near its start, so no fp16 overflow skips steps (a skipped step is cheaper).
    engine, scheduler = build_engine(model_name, device, batch, steps_per_epoch, 1000)
    results["channels_last"] = {"after_deepspeed_initialize": conv_weights_channels_last(engine.module)}
    dtype = next(engine.module.parameters()).dtype
    criterion = torch.nn.CrossEntropyLoss()

    def train_step(x, y):
        engine.backward(criterion(engine(x.to(dtype)).float(), y))
        engine.step()

    results["train"] = time_batches(lambda: loader, device, args.epochs, train_step)
    synthetic_x = torch.randn(batch, 3, resolution, resolution, device=device).to(dtype).contiguous(
        memory_format=torch.channels_last)
    synthetic_y = torch.randint(0, 1000, (batch,), device=device)
    synthetic = lambda: ((synthetic_x, synthetic_y) for _ in range(steps_per_epoch))  # noqa: E731
    optimizer_times = time_client_optimizer(engine, device)
    results["model_only"] = time_batches(synthetic, device, args.epochs, train_step)
    results["zero_adamp_share"] = optimizer_times.report(steps_per_epoch * args.epochs,
                                                         results["model_only"]["seconds"])
    results["autowu"] = {"steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                         "phase": scheduler.phase, "lr": engine.get_lr()[0]}

    results["torchvision"] = time_batches(
        torchvision_loader(os.path.join(work, "jpegs", "train"), batch, cores, resolution, device), device,
        args.epochs)
    results["channels_last"].update(channels_last_cost(model_name, device, batch, resolution,
                                                       steps=3 if dry else 20))
    rate = {k: results[k]["images_per_s"] for k in ("loader", "train", "model_only", "torchvision")}
    results["ratios"] = {"train_over_model_only": rate["train"] / rate["model_only"],
                         "loader_over_train": rate["loader"] / rate["train"],
                         "ffcv_loader_over_torchvision": rate["loader"] / rate["torchvision"],
                         "train_over_torchvision_loader": rate["train"] / rate["torchvision"]}
    results["seconds"] = time.perf_counter() - started
    assert all(math.isfinite(v) for v in rate.values())
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

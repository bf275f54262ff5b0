"""Train-loader throughput: FFCV (autowu.data.train_loader) against torchvision ImageFolder + DataLoader, and
against the decode limit.

Same JPEGs (generated, 300-500 px, ImageNet-like sizes scaled down), same transforms (random-resized crop,
horizontal flip, PCA lighting noise, normalisation to float32), same batch size and number of workers, in one
run on one machine. Each loader gets a warm-up epoch first (FFCV: numba compilation; torchvision: page cache).

The limit: the same stored images (the beton's bytes, JPEG or raw as written) decoded by FFCV's libjpeg-turbo
call and cropped and resized by the same resize, on the same number of threads, with nothing else: no pipeline,
no batching, no flip, lighting or normalisation, no tensors. FFCV's rate as a fraction of it says how much the
loader adds to the work that cannot be avoided.

    .venv/bin/python benchmarks/bench_loader.py [--images 800] [--workers 2] [--resolution 176]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from autowu.data import TrainLoaderConfig, WriteConfig, train_loader, write_betons
from autowu.data.lighting import IMAGENET_EIGVAL, IMAGENET_EIGVEC


def make_jpegs(root, count, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(count if split == "train" else 20):
            folder = os.path.join(root, split, f"class_{i % 10}")
            os.makedirs(folder, exist_ok=True)
            h, w = rng.integers(300, 501, 2)
            # Smooth shapes (upsampled noise) plus fine grain: ~85 KB a file at quality 90, about ImageNet's
            # bytes per pixel (its JPEGs average ~110 KB at ~500 x 375). Pure smooth images decode too fast.
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(small).resize((int(w), int(h)), Image.BICUBIC), dtype=np.float32)
            grain = rng.normal(0.0, 16.0, smooth.shape)
            image = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
            image.save(os.path.join(folder, f"{i:05d}.JPEG"), quality=90)


class TorchLighting:
    """The same PCA lighting noise on a [0, 1] tensor, as the paper's (timm-style) pipeline applies it."""

    def __init__(self, alphastd=0.1):
        self.alphastd = alphastd
        self.eigval = torch.tensor(IMAGENET_EIGVAL, dtype=torch.float32)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC, dtype=torch.float32)

    def __call__(self, img):
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.view(3, 1, 1)


def decode_limit(path, resolution, scale, ratio, threads, epochs):
    """Images a second of decode + crop + resize alone over the beton's stored images (see the module's text)."""
    import numba
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    from ffcv.libffcv import resize_crop

    from autowu.data.decoders import HAVE_FAST_RESIZE, fast_resize_crop, seeded_random_crop
    # Compiled as FFCV's Compiler.compile does for its pipelines; the resize the loader's decoder chooses.
    resize = numba.njit(fast_resize_crop if HAVE_FAST_RESIZE else resize_crop)
    decode_jpeg = numba.njit(imdecode)
    reader = Reader(path)
    fields = reader.metadata["f0"]
    table = np.sort(reader.alloc_table, order="ptr")
    where = np.searchsorted(table["ptr"], fields["data_ptr"])
    sizes = table["size"][where].astype(np.int64)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    jpg = IMAGE_MODES["jpg"]
    modes, heights, widths = (fields[k].astype(np.int64) for k in ("mode", "height", "width"))
    ptrs = fields["data_ptr"].astype(np.int64)
    out = np.empty((len(fields), resolution, resolution, 3), dtype=np.uint8)
    scale, ratio = np.array(scale), np.array(ratio)

    @numba.njit(parallel=True, nogil=True)
    def run(epoch):
        for k in numba.prange(len(ptrs)):
            h, w = heights[k], widths[k]
            source = data[ptrs[k]:ptrs[k] + sizes[k]]
            if modes[k] == jpg:
                image = np.empty((h, w, 3), dtype=np.uint8)
                decode_jpeg(source, image, h, w, h, w, 0, 0, 1, 1, False, False)
            else:
                image = source[:h * w * 3].reshape(h, w, 3)
            i, j, ch, cw = seeded_random_crop(h, w, scale, ratio, 0, epoch, k)
            resize(image, i, i + ch, j, j + cw, out[k])

    numba.set_num_threads(threads)
    run(0)  # compilation
    rates = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        run(epoch)
        rates.append(len(ptrs) / (time.perf_counter() - start))
    return rates


def time_epochs(loader, epochs, parts=None):
    """Images a second of each epoch; with ``parts`` (a list), each epoch's (seconds to its first batch, images a
    second after it) are appended: the epoch's start against its steady state."""
    rates = []
    for _ in range(epochs):
        start, count, first = time.perf_counter(), 0, None
        for images, labels in loader:
            if first is None:
                first = time.perf_counter()
                first_count = len(labels)
            count += len(labels)
        end = time.perf_counter()
        rates.append(count / (end - start))
        if parts is not None:
            parts.append((first - start, (count - first_count) / (end - first)))
    return rates


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=176)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(tmp, args.images)
        write_betons(tmp, os.path.join(tmp, "betons"), WriteConfig(num_workers=args.workers), progress=False)
        config = TrainLoaderConfig(resolution=args.resolution,
                                   num_workers=args.workers, batches_ahead=3)
        beton = os.path.join(tmp, "betons", "train.beton")
        limit_rates = decode_limit(beton, args.resolution, config.scale, config.ratio, args.workers, args.epochs)
        ffcv = train_loader(beton, config, args.batch_size)
        time_epochs(ffcv, 1)  # numba compilation
        ffcv_parts = []
        ffcv_rates = time_epochs(ffcv, args.epochs, ffcv_parts)

        transform = T.Compose([T.RandomResizedCrop(args.resolution), T.RandomHorizontalFlip(), T.ToTensor(),
                               TorchLighting(0.1), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        tv = torch.utils.data.DataLoader(ImageFolder(os.path.join(tmp, "train"), transform),
                                         batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         drop_last=True, persistent_workers=True)
        time_epochs(tv, 1)
        tv_rates = time_epochs(tv, args.epochs)

    ffcv_best, tv_best = max(ffcv_rates), max(tv_rates)
    print(f"images={args.images} workers={args.workers} batch={args.batch_size} res={args.resolution} "
          f"cores={os.cpu_count()}")
    print(f"ffcv        images/s per epoch: {', '.join(f'{r:.0f}' for r in ffcv_rates)}  (best {ffcv_best:.0f})")
    print(f"torchvision images/s per epoch: {', '.join(f'{r:.0f}' for r in tv_rates)}  (best {tv_best:.0f})")
    limit_best = max(limit_rates)
    print(f"decode limit images/s per epoch: {', '.join(f'{r:.0f}' for r in limit_rates)}  (best {limit_best:.0f})")
    print(f"ratio (best/best): {ffcv_best / tv_best:.2f}x torchvision; {ffcv_best / limit_best:.0%} of the decode limit")
    steady = max(rate for _, rate in ffcv_parts)
    print(f"ffcv epoch start (to the first batch) s: {', '.join(f'{t:.3f}' for t, _ in ffcv_parts)}; after it "
          f"images/s: {', '.join(f'{r:.0f}' for _, r in ffcv_parts)} (best {steady:.0f}: {steady / limit_best:.0%} "
          "of the decode limit)")


if __name__ == "__main__":
    main()

"""Train-loader throughput: FFCV (autowu.data.train_loader) against torchvision ImageFolder + DataLoader.

Same JPEGs (generated, 300-500 px, ImageNet-like sizes scaled down), same transforms (random-resized crop,
horizontal flip, PCA lighting noise, normalisation to float32), same batch size and number of workers, in one
run on one machine. Each loader gets a warm-up epoch first (FFCV: numba compilation; torchvision: page cache).

    .venv/bin/python benchmarks/bench_loader.py [--images 800] [--workers 2] [--resolution 176]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autowu.data import TrainLoaderConfig, WriteConfig, train_loader, write_betons  # noqa: E402
from autowu.data.lighting import IMAGENET_EIGVAL, IMAGENET_EIGVEC  # noqa: E402


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


def time_epochs(loader, epochs):
    rates = []
    for _ in range(epochs):
        start, count = time.perf_counter(), 0
        for images, labels in loader:
            count += len(labels)
        rates.append(count / (time.perf_counter() - start))
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
        ffcv = train_loader(os.path.join(tmp, "betons", "train.beton"), config, args.batch_size)
        time_epochs(ffcv, 1)  # numba compilation
        ffcv_rates = time_epochs(ffcv, args.epochs)

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
    print(f"ratio (best/best): {ffcv_best / tv_best:.2f}x")


if __name__ == "__main__":
    main()

"""ImageNet-style folders (``<split>/<class>/<image>``, torchvision's ImageFolder layout), checked before writing.

ImageNet's train set has odd files: CMYK JPEGs, grayscale JPEGs, a PNG named ``.JPEG``. They are decoded by
what they are, not by their name, and converted to RGB. A file that cannot be decoded to the end (truncated,
not an image) is skipped, counted and reported here, before any beton is written, so that a write does not
crash hours in.
"""
from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import MissingFileError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_FORMAT_OF_EXTENSION = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
                        ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}


@dataclass
class FolderScan:
    """The images of one split that can be written, and what happened to the others."""
    root: str
    classes: List[str]
    samples: List[Tuple[str, int]]                     # (path, class index) of usable images
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (path, reason)
    converted: Dict[str, int] = field(default_factory=dict)        # e.g. {"CMYK->RGB": 22, "PNG named .jpeg": 1}

    def summary(self) -> Dict:
        return {"root": self.root, "classes": len(self.classes), "images": len(self.samples),
                "skipped": len(self.skipped), "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped],
                "converted": dict(self.converted)}


def list_image_folder(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes (sorted folder names, as ImageFolder) and (path, class index) of every image file."""
    if not os.path.isdir(root):
        raise MissingFileError(f"image folder not found: {root} (expected <split>/<class>/<image> layout)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise UserError(f"image folder {root} has no class folders (expected {root}/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), index))
    if not samples:
        raise UserError(f"image folder {root} has {len(classes)} class folders but no images "
                         f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def open_rgb(path: str, draft: bool = False) -> Tuple[Image.Image, List[str]]:
    """Decode an image fully and return it as RGB, with notes on what had to be converted.

    ``draft`` decodes JPEGs at 1/8 scale: every byte is still read and entropy-decoded (a truncated file
    still fails), at a fraction of the cost. For checking, not for writing.
    """
    notes = []
    with Image.open(path) as img:
        expected = _FORMAT_OF_EXTENSION.get(os.path.splitext(path)[1].lower())
        if expected and img.format and img.format != expected:
            notes.append(f"{img.format} named {os.path.splitext(path)[1].lower()}")
        if draft and img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        if img.mode != "RGB":
            notes.append(f"{img.mode}->RGB")
            rgb = img.convert("RGB")
        else:
            rgb = img.copy()
    return rgb, notes


def _default_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)


def _check_one(path: str) -> Tuple[Optional[str], List[str]]:
    try:
        _, notes = open_rgb(path, draft=True)
        return None, notes
    except Exception as err:  # any failure to decode means the file cannot be written
        return f"{type(err).__name__}: {err}", []


def scan_image_folder(root: str, num_workers: int = 0, progress: bool = True) -> FolderScan:
    """List and check every image of a split; unreadable ones are skipped and reported, never raised."""
    classes, samples = list_image_folder(root)
    paths = [p for p, _ in samples]
    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    bar = tqdm(total=len(paths), desc=f"checking {os.path.basename(os.path.normpath(root))}",
               unit="img", disable=not progress)
    if workers > 1 and len(paths) > 200:
        # The workers take the default signal actions (a handler inherited from the parent, such as a launcher's
        # stop handler, would keep them alive through a signal that should end them), and the pool ends by closing:
        # its workers exit on their own, no SIGTERM is sent to them.
        pool = Pool(workers, initializer=_default_signals)
        try:
            checks = []
            for item in pool.imap(_check_one, paths, chunksize=64):
                checks.append(item)
                bar.update()
            pool.close()
            pool.join()
        finally:
            pool.terminate()
    else:
        checks = []
        for p in paths:
            checks.append(_check_one(p))
            bar.update()
    bar.close()
    usable, skipped, converted = [], [], Counter()
    for (path, label), (error, notes) in zip(samples, checks):
        if error:
            skipped.append((path, error))
        else:
            usable.append((path, label))
            converted.update(notes)
    if not usable:
        raise UserError(f"image folder {root}: none of its {len(samples)} images could be decoded")
    return FolderScan(root=root, classes=classes, samples=usable, skipped=skipped, converted=dict(converted))


class RGBImageDataset:
    """Indexable (image, label) pairs for FFCV's writer: PIL RGB images decoded by their content."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image, _ = open_rgb(path)
        # FFCV's writer encodes this sample right after this call, in this process, and its 'proportion' mode
        # draws np.random.rand() to store it as JPEG or raw. Seeded by the index, that choice is the sample's
        # own: one folder gives the same beton content on every node and in every run (not the same file
        # layout: the writer's processes take chunks in any order).
        np.random.seed(index)
        return image, label

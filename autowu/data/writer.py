"""Write ``train.beton`` and ``val.beton`` from an ImageNet-style folder with FFCV's DatasetWriter."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from ..errors import UserError

from .config import WriteConfig
from .folders import FolderScan, RGBImageDataset, scan_image_folder

SPLITS = ("train", "val")


def write_beton(scan: FolderScan, path: str, config: WriteConfig) -> None:
    """Write the checked images of one split to ``path`` (fields ``image`` and ``label``)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=config.write_mode, max_resolution=config.max_resolution,
                               compress_probability=config.compress_probability,
                               jpeg_quality=config.jpeg_quality),
        "label": IntField(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"  # a crash or Ctrl-C never leaves a half-written file under the real name
    writer = DatasetWriter(partial, fields, num_workers=config.num_workers)
    writer.from_indexed_dataset(RGBImageDataset(scan.samples), chunksize=config.chunk_size)
    os.replace(partial, path)


def write_betons(root: str, out_dir: str, config: Optional[WriteConfig] = None, splits=SPLITS,
                 progress: bool = True) -> Dict:
    """``root/<split>/<class>/*`` -> ``out_dir/<split>.beton`` for each split, plus ``write_report.json``.

    Every split is checked before anything is written; the report lists skipped files and conversions.
    """
    config = config or WriteConfig()
    scans = {split: scan_image_folder(os.path.join(root, split), num_workers=config.num_workers,
                                      progress=progress) for split in splits}
    class_lists = {split: scan.classes for split, scan in scans.items()}
    if len({tuple(c) for c in class_lists.values()}) > 1:
        counts = ", ".join(f"{s}: {len(c)}" for s, c in class_lists.items())
        raise UserError(f"the splits of {root} have different class folders ({counts}); labels would disagree")
    report = {"root": os.path.abspath(root), "config": config.__dict__, "splits": {}}
    for split, scan in scans.items():
        beton = os.path.join(out_dir, f"{split}.beton")
        write_beton(scan, beton, config)
        report["splits"][split] = dict(scan.summary(), beton=os.path.abspath(beton))
        if progress:
            converted = ", ".join(f"{n} {k}" for k, n in scan.converted.items()) or "none"
            print(f"[write] {split}: {len(scan.samples)} images in {len(scan.classes)} classes -> {beton}; "
                  f"skipped {len(scan.skipped)} unreadable; converted: {converted}")
            for path, reason in scan.skipped[:10]:
                print(f"[write]   skipped {path}: {reason}")
    report["classes"] = scans[splits[0]].classes
    with open(os.path.join(out_dir, "write_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report

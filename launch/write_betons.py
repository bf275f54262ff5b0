"""Write FFCV betons from an ImageNet-style folder.

    python launch/write_betons.py --data_root /data/imagenet --out_dir /data/betons \
        --config ffcv_configs/rn50_imagenet.json

``--data_root`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (torchvision ImageFolder layout).
Every image is checked first; unreadable files are skipped and listed in ``<out_dir>/write_report.json``.
``--digits`` builds the small real digits dataset under ``--data_root`` first (the CPU default's data).
"""
import argparse

from autowu.data import DataConfig, write_betons
from autowu.data.digits import build_digits_folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", required=True, help="folder with train/ and val/ class folders")
    parser.add_argument("--out_dir", required=True, help="where train.beton and val.beton go")
    parser.add_argument("--config", default="ffcv_configs/rn50_imagenet.json", help="data config (its 'write')")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits to write")
    parser.add_argument("--digits", action="store_true", help="first build scikit-learn's digits as JPEG folders")
    args = parser.parse_args(argv)
    config = DataConfig.from_json(args.config)
    if args.digits:
        build_digits_folder(args.data_root)
    write_betons(args.data_root, args.out_dir, config.write, splits=tuple(args.splits.split(",")))


if __name__ == "__main__":
    main()

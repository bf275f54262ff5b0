"""The data side: ImageNet-style folders -> FFCV betons -> train/val loaders with PCA lighting noise."""
from .config import DataConfig, TrainLoaderConfig, ValLoaderConfig, WriteConfig
from .loaders import beton_info, train_loader, val_loader
from .writer import write_betons

__all__ = ["DataConfig", "WriteConfig", "TrainLoaderConfig", "ValLoaderConfig", "write_betons",
           "train_loader", "val_loader", "beton_info"]

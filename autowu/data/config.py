"""Data configs (``ffcv_configs/*.json``): how betons are written and how the loaders read them.

Each field declares its type and default together, and a key nothing declares raises: a misspelt option must
never be silently ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

from ..errors import ConfigError
from ..jsonfile import read_json
from ..settings import from_mapping, unknown_keys_error

T = TypeVar("T")


@dataclass(frozen=True)
class WriteConfig:
    """FFCV ``RGBImageField`` settings; the defaults are ffcv-imagenet's ResNet-50 betons."""
    write_mode: str = "proportion"      # raw | smart | jpg | proportion
    max_resolution: int = 500           # longest side, px
    compress_probability: float = 0.5   # share of images stored as JPEG in proportion mode
    jpeg_quality: int = 90
    num_workers: int = -1               # -1: every core
    chunk_size: int = 100

    def __post_init__(self):
        _check_choice("write.write_mode", self.write_mode, ("raw", "smart", "jpg", "proportion"))
        _check_range("write.max_resolution", self.max_resolution, 8, 10_000)
        _check_range("write.compress_probability", self.compress_probability, 0.0, 1.0)
        _check_range("write.jpeg_quality", self.jpeg_quality, 1, 100)
        if self.num_workers != -1:
            _check_range("write.num_workers (-1: every core)", self.num_workers, 1, 4096)
        _check_range("write.chunk_size", self.chunk_size, 1, 1 << 20)


@dataclass(frozen=True)
class TrainLoaderConfig:
    """How the training loader reads; its batch size a rank is DeepSpeed's ``train_micro_batch_size_per_gpu``
    (the one place it is set), passed to ``train_loader`` beside this config."""
    resolution: int = 224
    num_workers: Optional[int] = None   # None: the cores this process may use / ranks on the node (loaders.py)
    scale: Tuple[float, float] = (0.08, 1.0)   # random-resized-crop area range
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    lighting_alphastd: float = 0.1      # PCA lighting noise; 0 turns it off
    order: str = "random"               # random | quasi_random (not with distributed)
    os_cache: bool = True
    drop_last: bool = True
    batches_ahead: int = 3

    def __post_init__(self):
        _check_range("train.resolution", self.resolution, 8, 4096)
        _check_range("train.lighting_alphastd", self.lighting_alphastd, 0.0, 10.0)
        _check_workers("train.num_workers", self.num_workers)
        _check_range("train.batches_ahead", self.batches_ahead, 1, 64)
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"train.scale: need 0 < low <= high <= 1 (areas of the image), got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"train.ratio: need 0 < low <= high (aspect ratios), got {list(self.ratio)}")
        _check_choice("train.order", self.order, ("random", "quasi_random"))


@dataclass(frozen=True)
class ValLoaderConfig:
    resolution: int = 224
    crop_ratio: float = 224 / 256       # center crop of the shorter side
    batch_size: int = 256
    num_workers: Optional[int] = None   # None: as for train
    os_cache: bool = True
    batches_ahead: int = 3

    def __post_init__(self):
        _check_range("val.resolution", self.resolution, 8, 4096)
        _check_range("val.crop_ratio", self.crop_ratio, 0.05, 1.0)
        _check_range("val.batch_size", self.batch_size, 1, 1 << 20)
        _check_workers("val.num_workers", self.num_workers)
        _check_range("val.batches_ahead", self.batches_ahead, 1, 64)


@dataclass(frozen=True)
class DataConfig:
    write: WriteConfig = field(default_factory=WriteConfig)
    train: TrainLoaderConfig = field(default_factory=TrainLoaderConfig)
    val: ValLoaderConfig = field(default_factory=ValLoaderConfig)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "DataConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a data config is a JSON object with write, train and val sections")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names - {"description"}
        if unknown:
            raise unknown_keys_error(source, unknown, names)
        if not isinstance(raw.get("description", ""), str):
            raise ConfigError(f"{source}: description must be a string (a note for people), got {raw['description']!r}")
        return cls(**{f.name: _build(f.default_factory, raw.get(f.name, {}), f"{source}: {f.name}")
                      for f in dataclasses.fields(cls)})

    @classmethod
    def from_json(cls, path: str) -> "DataConfig":
        raw = read_json(path, "data config")
        return cls.from_dict(raw, source=path)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _build(section_cls: Type[T], values: Dict[str, Any], where: str) -> T:
    if section_cls is TrainLoaderConfig and isinstance(values, dict) and "batch_size" in values:
        raise ConfigError(f"{where}: batch_size is not a data setting: the per-rank batch is the DeepSpeed "
                         "config's train_micro_batch_size_per_gpu; remove it here")
    return from_mapping(section_cls, values, where)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}: invalid value {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _check_workers(name, value):
    if value is not None:
        _check_range(f"{name} (null: the cores this rank may use)", value, 1, 4096)


def _check_range(name, value, low, high):
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value!r} is outside [{low}, {high}]")

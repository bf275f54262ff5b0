"""The run settings of ``launch/train.py``: the ``"train"`` block of a DeepSpeed JSON config in ``ds_configs/``.

DeepSpeed's own keys (batch sizes, fp16, ZeRO, the optimizer and scheduler blocks) stay where DeepSpeed users
look for them; what DeepSpeed has no place for (the model, the epochs, the data) lives in ``"train"``, which the
launcher takes out (``split_config``) before the rest is resolved (``autowu.ds_config.resolve``). Each setting
lives in one place (``autowu.settings``: type, default and help together); unknown keys raise.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..data.config import DataConfig
from ..ds_config import ResolvedConfig, load_config, resolve
from ..errors import ConfigError, UserError
from ..settings import from_mapping, setting

# The repository: where data configs named in "train.data_config" and the embedded data live.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class RunSettings:
    """The ``"train"`` block. Fields marked ``cli`` are also ``--name`` options of the launcher, which win."""
    model: str = setting("resnet50", "a timm model name", cli=True)
    epochs: int = setting(90, "epochs to train", cli=True)
    seed: int = setting(0, "seeds the model's initialisation, the data order, the augmentation and AutoWU's "
                           "subsampling", cli=True)
    num_classes: Optional[int] = setting(None, "classes; null: from the beton's labels")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing (the paper: 0.1 for EfficientNet)")
    sync_bn: bool = setting(False, "SyncBatchNorm across ranks (the paper: EfficientNet; GPU runs only)")
    channels_last: bool = setting(True, "channels_last activations (GPU runs only)")
    data_config: str = setting("ffcv_configs/rn50_imagenet.json", "the data config, relative to the repository")
    default_data: Optional[str] = setting(None, "\"digits\": build the embedded dataset when no --data_dir is given")
    checkpoint_every: int = setting(5, "epochs between checkpoints (and always at the end)")
    log_every: int = setting(20, "optimizer steps between loss readings for the log (a host sync each)")
    stop_check_every: int = setting(5, "optimizer steps between the ranks' checks for a stop signal (SIGTERM, "
                                       "SIGUSR1, SIGINT; one small all-reduce and a host sync each)")

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.default_data not in (None, "digits"):
            raise ConfigError(f"train.default_data: invalid {self.default_data!r}; allowed: null, 'digits'")
        if min(self.checkpoint_every, self.log_every, self.stop_check_every) < 1:
            raise ConfigError("train.checkpoint_every, train.log_every and train.stop_check_every must be >= 1")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"train.num_classes must be >= 2 or null, got {self.num_classes}")

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str) -> "RunSettings":
        if isinstance(raw, dict) and "optimizer" in raw:
            raise ConfigError(f"{source}: \"train.optimizer\" has moved to the config's top-level \"optimizer\" "
                             "block, where DeepSpeed reads it: {\"type\": \"AdamP\", \"params\": {...}}")
        return from_mapping(cls, raw, f"{source}: train")


def split_config(path: str) -> Tuple[Dict[str, Any], RunSettings]:
    """A ``ds_configs/`` file -> (DeepSpeed's part, the run settings)."""
    config = load_config(path)
    run = RunSettings.from_dict(config.pop("train", {}), source=path)
    _check_model_name(run, path)
    if "optimizer" not in config:
        raise ConfigError(f"{path}: needs an \"optimizer\" block, e.g. the paper's {{\"type\": \"AdamP\", \"params\": "
                          "{\"weight_decay\": 0.1, \"delta\": 0.1, \"wd_ratio\": 0.1}} (AutoWU sets the LR)")
    return config, run


def _check_model_name(run: RunSettings, source: str) -> None:
    """timm knows the model (asked by name: nothing is built)."""
    import difflib

    import timm
    if not timm.is_model(run.model):
        close = difflib.get_close_matches(run.model, timm.list_models(), n=3, cutoff=0.6)
        raise ConfigError(f"{source}: train.model {run.model!r} is not a timm model" +
                          (f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"))


def data_config_of(run: RunSettings) -> DataConfig:
    """The data config the run names (``train.data_config``, relative to the repository)."""
    try:
        return DataConfig.from_json(os.path.join(REPO, run.data_config))
    except UserError as err:
        raise type(err)(f"train.data_config: {err}") from None


def check_config(path: str, world_size: int) -> Tuple[ResolvedConfig, RunSettings, DataConfig]:
    """Everything the launcher checks of a ``ds_configs/`` file before it builds anything, on ``world_size``
    ranks: its ``"train"`` block, the DeepSpeed part (``autowu.ds_config.resolve``) and the data config it names.
    (The launcher calls the same three, with its own edits to the DeepSpeed part between them.)"""
    config, run = split_config(path)
    resolved = resolve(config, source=path, total_epochs=run.epochs, seed=run.seed, world_size=world_size)
    return resolved, run, data_config_of(run)


def warmup_cosine_rerun(config: Dict[str, Any], peak_lr: float) -> Dict[str, Any]:
    """``config`` (a whole ``ds_configs/`` file, "train" block included) with AutoWU's search replaced by what it
    found: DeepSpeed's WarmupCosineLR to ``peak_lr``, a linear warmup over the "auto" 5% of the run and a cosine
    to 0 (filled in by ``autowu.ds_config``), the shape of the scheduler benchmark's grid: the recipe trained
    again without the search (how it compares: ``benchmarks/RESULTS.md``)."""
    if not peak_lr > 0:
        raise ConfigError(f"warmup_cosine_rerun: a peak LR > 0 is needed, got {peak_lr!r}")
    rerun = copy.deepcopy(config)
    optimizer = rerun.get("optimizer") or {}
    rerun["optimizer"] = {**optimizer, "params": {**optimizer.get("params", {}), "lr": float(peak_lr)}}
    rerun["scheduler"] = {"type": "WarmupCosineLR",
                          "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_min_ratio": 0.0,
                                     "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    return rerun

"""AutoWU's options, declared once: type, default and help of each, the two modes as presets, the checks.

``AutoWUOptions`` is a frozen dataclass. Options marked "the mode's" take their value from the mode's preset
(``PRESETS``) unless given: ``mode="paper"`` is the paper's code exactly; ``mode="default"`` changes the ramp, the
confirmation, the post-switch LR after a hold, the spike handling and the rollback (``docs/scheduler.md``).
The same object comes from Python (``AutoWU(optimizer, steps, epochs, patience=3)`` or ``options=``) and from a
JSON object (``AutoWUOptions.from_dict``: unknown keys, wrong types and bad values are one ``ConfigError`` naming
the key). A checkpoint keeps ``as_dict()`` and refuses to resume under other options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from .errors import ConfigError
from .gp import GPTestSettings
from .schedule import COOLDOWN_TYPES, WARMUP_TYPES
from .settings import checked_mapping, setting, unknown_keys_error

MODES = ("default", "paper")
GP_BACKENDS = ("fast", "gpytorch")


class _FromMode:
    """The default of an option that its mode's preset sets."""

    def __repr__(self) -> str:
        return "the mode's"


FROM_MODE: Any = _FromMode()

# What each mode sets unless the caller sets it.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {"max_warmup_fraction": 0.5, "patience": 3, "spike_threshold": None, "hold": False,
              "peak_fraction": 1.0, "max_lr_growth_per_test": None, "resume_from_argmin": False,
              "min_epochs_before_test": 0.0, "peak_highest_of_hold": False, "rollback": False,
              "scale_free": False, "flat_ramp_speedup": 1.0, "pass_once_moved": False},
    "default": {"max_warmup_fraction": 0.2, "patience": 2, "spike_threshold": 6.0, "hold": True,
                "peak_fraction": 1.0, "max_lr_growth_per_test": 1.8, "resume_from_argmin": True,
                "min_epochs_before_test": 0.0, "peak_highest_of_hold": True, "rollback": True,
                "scale_free": True, "flat_ramp_speedup": 2.0, "pass_once_moved": True},
}


@dataclass(frozen=True)
class AutoWUOptions:
    mode: str = setting("default", "\"default\" or \"paper\": the preset of every option marked \"the mode's\"")
    min_lr: float = setting(1e-5, "the warmup's first LR")
    max_lr: float = setting(1.0, "the LR the warmup would reach at its cap")
    max_warmup_fraction: float = setting(FROM_MODE, "the warmup cap, a fraction of all steps (the mode's: 0.2; "
                                                    "the paper 0.5)")
    warmup_type: str = setting("exp", "\"exp\" (the paper's) or \"linear\"")
    immediate_cooldown: bool = setting(False, "cosine from the switch to 0; otherwise constant, then the cooldown")
    cooldown_type: str = setting("cosine", "\"cosine\", \"half_cosine\" (the paper's code's variant) or "
                                           "\"linear\"")
    cooldown_fraction: float = setting(0.2, "the last fraction of the run spent in cooldown, without "
                                            "immediate_cooldown")
    patience: int = setting(FROM_MODE, "passing GP tests in a row that end the warmup (the mode's: 2; the paper 3)")
    spike_threshold: Optional[float] = setting(FROM_MODE, "losses this many robust standard deviations beyond "
                                                          "both neighbouring levels are left out of the GP fit; "
                                                          "null keeps every finite loss (the paper)")
    gp_settings: GPTestSettings = setting(GPTestSettings(), "the GP test's settings (the paper's by default)")
    gp_backend: str = setting("fast", "\"fast\" (weight-space numpy) or \"gpytorch\" (the paper's computation)")
    seed: int = setting(0, "seeds the GP's subsampling; every rank must use the same")
    hold: bool = setting(FROM_MODE, "keep the LR while a passing test is being confirmed (the paper: no)")
    peak_fraction: float = setting(FROM_MODE, "the post-switch LR as a fraction of the LR at the predicted minimum")
    max_lr_growth_per_test: Optional[float] = setting(FROM_MODE, "test often enough that the exponential ramp grows "
                                                                 "the LR at most this much between two tests "
                                                                 "(never less than once an epoch); null, the "
                                                                 "paper: once an epoch")
    resume_from_argmin: bool = setting(FROM_MODE, "when a hold ends in a failing test, ramp again from the LR at "
                                                  "the minimum its first test predicted")
    min_epochs_before_test: float = setting(FROM_MODE, "no GP test before this many epochs of losses")
    peak_highest_of_hold: bool = setting(FROM_MODE, "a switch that ends a hold takes the highest LR any test of "
                                                    "the hold predicted as the minimum")
    rollback: bool = setting(FROM_MODE, "at the switch, put back the training state of the last GP test at or "
                                        "below the peak (autowu.rollback)")
    rollback_keep: Optional[int] = setting(FROM_MODE, "snapshots held at most (host memory; 6: a peak 1.8^6 = 34x "
                                                      "below the LR at the switch); only where the switch rolls "
                                                      "back")
    scale_free: bool = setting(FROM_MODE, "the GP test sees the losses in units fixed by their level at the first "
                                          "test, so that its decisions do not depend on the loss's units (the "
                                          "paper: the losses as they are)")
    flat_ramp_speedup: float = setting(FROM_MODE, "on a ramp of fewer than 30 steps a decade of LR: this many "
                                                  "times its pace while the loss has not moved from where it "
                                                  "started, then the rest spread over the steps left "
                                                  "(autowu.flat_start; the mode's: 2; 1, the paper: off)")
    pass_once_moved: bool = setting(FROM_MODE, "a test passes only once the loss has moved (fallen or risen) from "
                                               "where it started (autowu.flat_start; the paper: from the first test)")

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        given_keep = self.rollback_keep not in (FROM_MODE, None)
        preset = PRESETS[self.mode]
        for name, value in preset.items():
            if getattr(self, name) is FROM_MODE:
                object.__setattr__(self, name, value)
        if not given_keep:
            object.__setattr__(self, "rollback_keep", 6 if self.rollback else None)
        _choice("warmup_type", self.warmup_type, WARMUP_TYPES)
        _choice("cooldown_type", self.cooldown_type, COOLDOWN_TYPES)
        _choice("gp_backend", self.gp_backend, GP_BACKENDS)
        if not 0 < self.min_lr < self.max_lr:
            raise ConfigError(f"AutoWU: need 0 < min_lr < max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")
        if not 0 < self.max_warmup_fraction <= 1:
            raise ConfigError(f"AutoWU: max_warmup_fraction must be in (0, 1], got {self.max_warmup_fraction}")
        if not 0 <= self.cooldown_fraction <= 1:
            raise ConfigError(f"AutoWU: cooldown_fraction must be in [0, 1], got {self.cooldown_fraction}")
        if not self.immediate_cooldown and self.cooldown_fraction >= 1:
            raise ConfigError("AutoWU: cooldown_fraction 1 without immediate_cooldown starts the cooldown at the "
                              "first step and leaves no warmup; use a fraction below 1, or immediate_cooldown")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ConfigError(f"AutoWU: patience must be a positive integer, got {self.patience!r}")
        if self.spike_threshold is not None and not self.spike_threshold > 0:
            raise ConfigError(f"AutoWU: spike_threshold must be > 0 or null, got {self.spike_threshold!r}")
        if not 0 < self.peak_fraction <= 1:
            raise ConfigError(f"AutoWU: peak_fraction must be in (0, 1], got {self.peak_fraction!r}")
        growth = self.max_lr_growth_per_test
        if growth is not None and not growth > 1:
            raise ConfigError(f"AutoWU: max_lr_growth_per_test must be > 1 or null, got {growth!r}")
        speedup = self.flat_ramp_speedup
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup >= 1:
            raise ConfigError(f"AutoWU: flat_ramp_speedup must be >= 1 (1: off), got {speedup!r}")
        if isinstance(self.min_epochs_before_test, bool) or not self.min_epochs_before_test >= 0:
            raise ConfigError(f"AutoWU: min_epochs_before_test must be >= 0, got {self.min_epochs_before_test!r}")
        if not isinstance(self.gp_settings, GPTestSettings):
            raise ConfigError(f"AutoWU: gp_settings must be an autowu.GPTestSettings (from JSON: an object of its "
                              f"fields), got {type(self.gp_settings).__name__}")
        keep = self.rollback_keep
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"AutoWU: rollback_keep must be a positive integer, got {keep!r}")
        if given_keep and not self.rollback:
            raise ConfigError("AutoWU: rollback_keep is used only where the switch rolls back (the default mode, "
                              "or rollback true)")

    @classmethod
    def build(cls, **options) -> "AutoWUOptions":
        """From keyword arguments, refusing a name that is not an option (with the nearest one)."""
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise unknown_keys_error("AutoWU", unknown, [f.name for f in dataclasses.fields(cls)], list_known=False)
        return cls(**options)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "scheduler AutoWU params") -> "AutoWUOptions":
        """From a JSON object: unknown keys, wrong types and bad values are one ``ConfigError`` naming the key."""
        checked = checked_mapping(cls, values, where)
        try:
            return cls(**checked)
        except ConfigError as err:
            raise ConfigError(f"{where}: {str(err).removeprefix('AutoWU: ')}") from None

    def as_dict(self) -> Dict[str, Any]:
        """Every option as plain data (the GP settings as an object of their fields)."""
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"AutoWU: invalid {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")

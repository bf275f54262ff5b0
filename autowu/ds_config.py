"""What a DeepSpeed config asks of autowu, resolved once: ``resolve(config) -> ResolvedConfig``.

The config side of the DeepSpeed integration and nothing else: no process group, no engine, nothing patched
(``import autowu.deepspeed`` registers AutoWU and AdamP with DeepSpeed; reading a config here does not, which is
why this module is not inside that package: a package runs its ``__init__`` on any import of a submodule).

``resolve`` checks a config once: DeepSpeed's top-level keys (DeepSpeed ignores a misspelt one), the values of the
blocks autowu reads, AutoWU's options, AdamP's arguments, DeepSpeed's own parse of the rest, and the set-ups where
AutoWU or AdamP cannot do what the config asks. It returns one frozen object: the dict handed to DeepSpeed,
AutoWU's options and step counts, AdamP's arguments, the batch and the accumulation. The engine seam
(``autowu.deepspeed.seam``) recognises a resolved config and does not check it again. Every refusal is one
``ConfigError`` naming the key and what works instead.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import typing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, Optional, Union

from .errors import ConfigError
from .jsonfile import read_json
from .options import AutoWUOptions
from .settings import check_types, shown, unknown_keys_error

SCHEDULER_TYPE = "AutoWU"
OPTIMIZER_TYPE = "AdamP"
# What programs that build the engine fill in for "auto" (Hugging Face's Trainer and Accelerate): the run's
# optimizer steps. AutoWU turns it into epochs with steps_per_epoch.
FRAMEWORK_TOTAL_STEPS = "total_num_steps"
# AutoWU's step counts in its params block, beside its options.
_STEP_COUNTS = ("steps_per_epoch", "total_epochs", FRAMEWORK_TOTAL_STEPS)
# The fixed warmup of a reference schedule set to "auto": the same share of the run as the scheduler
# benchmark's peak-LR grid (benchmarks/bench_schedules.py).
AUTO_WARMUP_FRACTION = 0.05
# timm optimizers whose update depends on each parameter's shape: on ZeRO's flat 1-D partitions they silently
# become something else (AdamP/SGDP lose the projection, LAMB/LARS the trust ratio, Adafactor its factoring).
_SHAPE_DEPENDENT_TIMM_OPTIMIZERS = ("AdamP", "SGDP", "Lamb", "Lars", "Adafactor", "AdafactorBigVision")


def load_config(config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A DeepSpeed config as a new dict, from a dict or a JSON file, with one clear error for a bad file."""
    if isinstance(config, dict):
        return copy.deepcopy(dict(config))
    loaded = read_json(config, "DeepSpeed config")
    if not isinstance(loaded, dict):
        raise ConfigError(f"DeepSpeed config {os.fspath(config)} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


# ---------------------------------------------------------------------------------------------- DeepSpeed's keys
class _KeyRecorder(dict):
    """A config dict that records every top-level key DeepSpeed's config parser asks for."""
    asked: set

    def _ask(self, key):
        self.asked.add(key)
        return key

    def __getitem__(self, key):
        return super().__getitem__(self._ask(key))

    def get(self, key, *default):
        return super().get(self._ask(key), *default)

    def __contains__(self, key):
        return super().__contains__(self._ask(key))

    def keys(self):
        recorder = self

        class Keys:
            def __contains__(self, key):
                return dict.__contains__(recorder, recorder._ask(key))

            def __iter__(self):
                return iter(dict.keys(recorder))

        return Keys()


def _one_rank(world_size: int = 1) -> SimpleNamespace:
    """An ``mpu`` for DeepSpeed's config parser: parsing then needs no process group."""
    return SimpleNamespace(get_data_parallel_world_size=lambda: world_size)


@functools.lru_cache(maxsize=1)
def deepspeed_config_keys() -> frozenset:
    """DeepSpeed's top-level config keys, from DeepSpeed itself: every key its config parser
    (``DeepSpeedConfig``) asks a config for, and the key names of ``deepspeed.runtime.constants``.

    Asking the installed version (rather than keeping a copied list) follows its upgrades.
    """
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _KeyRecorder({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1})
    recorder.asked = set()
    DeepSpeedConfig(recorder, mpu=_one_rank())
    if len(recorder.asked) < 30 or "zero_optimization" not in recorder.asked:
        raise RuntimeError(f"autowu: DeepSpeed {_deepspeed_version()}'s config parser no longer reads the config "
                           "key by key as autowu.ds_config.deepspeed_config_keys expects; update it")
    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    # Read by deepspeed.initialize itself, not by the parser (Ulysses sequence parallelism's mesh)
    initialize_reads = {"sequence_parallel_size", "data_parallel_size"}
    return frozenset(recorder.asked | names | initialize_reads)


def _deepspeed_version() -> str:
    import deepspeed
    return deepspeed.__version__


def check_config_keys(config: Dict[str, Any], source: str = "DeepSpeed config") -> None:
    """Refuse top-level keys DeepSpeed does not know, naming the nearest known one."""
    unknown = set(config) - deepspeed_config_keys()
    if unknown:
        raise unknown_keys_error(source, unknown, deepspeed_config_keys(), list_known=False,
                                 why=f"DeepSpeed {_deepspeed_version()} would ignore "
                                     f"{'them' if len(unknown) > 1 else 'it'} without a word")


# ---------------------------------------------------------------------------------------------- what a config selects
def _block(config: Dict[str, Any], key: str) -> Dict[str, Any]:
    """A config block that must be an object, or {} where it is absent."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"DeepSpeed config: \"{key}\" must be an object, got {shown(value)}")
    return value


def zero_stage(config: Dict[str, Any]) -> int:
    if isinstance(config.get("zero_optimization"), bool):  # DeepSpeed's deprecated form: true is stage 1
        return int(config["zero_optimization"])
    stage = _block(config, "zero_optimization").get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {shown(stage)}")
    return stage


def half_precision(config: Dict[str, Any]) -> Optional[str]:
    """The config's enabled 16-bit mode ("fp16", "bf16" or DeepSpeed's alias "bfloat16"), or None."""
    enabled = []
    for key in ("fp16", "bf16", "bfloat16"):
        flag = _block(config, key).get("enabled", False)
        if flag not in (True, False, "auto"):
            raise ConfigError(f"DeepSpeed config: {key}.enabled must be true or false, got {shown(flag)}")
        if flag is True:
            enabled.append(key)
    if len(enabled) > 1:
        raise ConfigError(f"DeepSpeed config: {' and '.join(enabled)} are both enabled; enable one")
    return enabled[0] if enabled else None


def _type_of(config: Dict[str, Any], key: str) -> Optional[str]:
    block = _block(config, key)
    kind = block.get("type")
    if block and not isinstance(kind, str):
        raise ConfigError(f"DeepSpeed config: {key}.type must be a string (the {key}'s name), got {shown(kind)}")
    return kind


def selects_autowu(config: Dict[str, Any]) -> bool:
    return _type_of(config, "scheduler") == SCHEDULER_TYPE


def selects_adamp(config: Dict[str, Any]) -> bool:
    return str(_type_of(config, "optimizer") or "").lower() == OPTIMIZER_TYPE.lower()


def asks_for_rollback(config: Dict[str, Any]) -> bool:
    """Whether the scheduler params ask for the rollback themselves (not the mode's default)."""
    return selects_autowu(config) and bool((_block(config, "scheduler").get("params") or {}).get("rollback"))


def rollback_unsupported(config: Dict[str, Any]) -> Optional[str]:
    """Why the engine a config builds cannot roll back, or None. Rollback puts back what the client optimizer
    steps and rebuilds the model's copy from it: ZeRO-1/2's partitions, or the module itself in fp32 without
    ZeRO. ZeRO-3 and DeepSpeed's 16-bit optimizers without ZeRO keep their master weights elsewhere."""
    stage, half = zero_stage(config), half_precision(config)
    if stage >= 3:
        return f"ZeRO stage {stage}"
    if stage == 0 and half:
        return f"{half} without ZeRO"
    return None


# ---------------------------------------------------------------------------------------------- the resolved config
class _DeepSpeedDict(dict):
    """The dict handed to DeepSpeed, carrying the resolution it came from (DeepSpeed keeps the very object as
    ``DeepSpeedConfig._param_dict``, where the engine seam finds it). A copy is a plain dict: Accelerate and
    Hugging Face copy a config and then fill in its "auto" values, and that copy must be resolved anew."""
    resolution: "ResolvedConfig"

    def __copy__(self):
        return dict(self)

    def __deepcopy__(self, memo):
        return copy.deepcopy(dict(self), memo)


@dataclass(frozen=True)
class ResolvedConfig:
    """A DeepSpeed config, checked, with what it asks of autowu."""
    deepspeed: Dict[str, Any]              # the dict to hand to DeepSpeed
    source: str
    autowu: Optional[AutoWUOptions] = None          # None: the config selects another scheduler
    steps_per_epoch: Optional[int] = None           # the run's step counts, AutoWU's (None: not known yet)
    total_epochs: Optional[int] = None
    adamp: Optional[Dict[str, Any]] = None          # ZeroAdamP's keyword arguments; None: another optimizer
    zero_stage: int = 0
    precision: Optional[str] = None                 # "fp16", "bf16" (or "bfloat16"); None: fp32
    micro_batch: Optional[int] = None               # known where resolve was given the world size
    accumulation: Optional[int] = None

    @staticmethod
    def of(config: Any) -> Optional["ResolvedConfig"]:
        """The resolution a dict handed to DeepSpeed came from, if it is that very dict."""
        resolution = getattr(config, "resolution", None)
        return resolution if isinstance(config, _DeepSpeedDict) and resolution.deepspeed is config else None

    def autowu_arguments(self) -> Dict[str, Any]:
        """``AutoWU``'s keyword arguments (all but the optimizer); one error if a step count is still missing."""
        missing = [name for name in ("steps_per_epoch", "total_epochs") if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"{self.source}: scheduler AutoWU needs {' and '.join(missing)} (optimizer steps an "
                              "epoch; epochs): put them in the scheduler params (or total_num_steps for "
                              "total_epochs, as Hugging Face's Trainer and Accelerate fill in for \"auto\"), or "
                              "pass them to autowu.deepspeed.initialize")
        return {"steps_per_epoch": self.steps_per_epoch, "total_epochs": self.total_epochs, "options": self.autowu}

    def with_steps_per_epoch(self, steps_per_epoch: int) -> "ResolvedConfig":
        """Once the data gives the optimizer steps of an epoch: AutoWU's count (a disagreeing one in the JSON is
        refused), and the "auto" step counts of DeepSpeed's WarmupCosineLR / WarmupDecayLR (every optimizer step
        of the run; the first 5% of them for the warmup)."""
        if self.total_epochs is None:
            raise ConfigError(f"{self.source}: the run's epochs are not known (resolve(..., total_epochs=))")
        if self.autowu is not None and self.steps_per_epoch not in (None, steps_per_epoch):
            raise ConfigError(f"{self.source}: scheduler AutoWU: params.steps_per_epoch {self.steps_per_epoch} "
                              f"disagrees with {steps_per_epoch} from the data and epochs; remove it from the "
                              "scheduler params")
        config = _DeepSpeedDict(copy.deepcopy(dict(self.deepspeed)))
        total_steps = steps_per_epoch * self.total_epochs
        if self.autowu is None:
            _fill_schedule_steps(config, total_steps, self.source)
        resolved = dataclasses.replace(self, deepspeed=config, steps_per_epoch=steps_per_epoch)
        config.resolution = resolved
        return resolved


# DeepSpeed's top-level scalars that its parser reads without checking (a string in "steps_per_print" fails at the
# first print, a 0 divides by zero): (accepts, what to write). Others are checked by the type of DeepSpeed's default.
_SCALARS = {
    "steps_per_print": (lambda v: v is None or (_number(v) and v >= 1), "a number >= 1 (Hugging Face's Trainer "
                                                                       "writes infinity: never)"),
    "gradient_clipping": (lambda v: _number(v) and v >= 0, "a number >= 0 (0: no clipping)"),
    "gradient_predivide_factor": (lambda v: _number(v) and v > 0, "a number > 0"),
    "gradient_accumulation_steps": (lambda v: v in (None, "auto") or _whole(v, 1), "a positive whole number"),
}
# Keys of the optimizer and scheduler blocks DeepSpeed reads (anything else it ignores without a word).
_BLOCK_KEYS = {"optimizer": ("type", "params", "legacy_fusion"), "scheduler": ("type", "params")}


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(config: Dict[str, Any], source: str) -> None:
    """The values DeepSpeed takes on trust: top-level scalars, and the optimizer and scheduler blocks' keys and
    names (an unknown name fails only once the engine is built)."""
    import torch
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    defaults = {getattr(constants, name[:-len("_DEFAULT")]): value for name, value in vars(constants).items()
                if name.endswith("_DEFAULT") and isinstance(getattr(constants, name[:-len("_DEFAULT")], None), str)}
    for key, value in config.items():
        if key in _SCALARS:
            accepts, expected = _SCALARS[key]
            if not accepts(value):
                raise ConfigError(f"{source}: {key} must be {expected}, got {shown(value)}")
        elif isinstance(defaults.get(key), bool) and not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {shown(value)}")
        elif _number(defaults.get(key)) and not _number(value):
            raise ConfigError(f"{source}: {key} must be a number, got {shown(value)}")
    for key, known in _BLOCK_KEYS.items():
        block = _block(config, key)
        unknown = set(block) - set(known)
        if unknown:
            raise unknown_keys_error(f"{source}: {key}", unknown, known, why="DeepSpeed would ignore it")
        if block and "type" not in block:
            raise ConfigError(f"{source}: {key} needs a \"type\"")
        if block.get("params") is not None and not isinstance(block["params"], dict):
            raise ConfigError(f"{source}: {key}.params must be an object, got {shown(block['params'])}")
    kind = _type_of(config, "optimizer")
    if kind is not None and kind.lower() not in (OPTIMIZER_TYPE.lower(), *DEEPSPEED_OPTIMIZERS) \
            and getattr(torch.optim, kind, None) is None:
        raise ConfigError(f"{source}: optimizer.type {kind!r} is neither autowu's AdamP nor an optimizer DeepSpeed "
                          f"knows ({', '.join(DEEPSPEED_OPTIMIZERS)}, or a torch.optim class)")
    kind = _type_of(config, "scheduler")
    if kind is not None and kind != SCHEDULER_TYPE and not hasattr(lr_schedules, kind) \
            and not hasattr(torch.optim.lr_scheduler, kind):
        raise ConfigError(f"{source}: scheduler.type {kind!r} is neither AutoWU nor a scheduler DeepSpeed knows (its "
                          "lr_schedules, or a torch.optim.lr_scheduler class)")


def resolve(config: Union[str, os.PathLike, Dict[str, Any]], *, source: Optional[str] = None,
            steps_per_epoch: Optional[int] = None, total_epochs: Optional[int] = None, seed: Optional[int] = None,
            world_size: Optional[int] = None) -> ResolvedConfig:
    """Check ``config`` once and say what it asks of autowu.

    ``steps_per_epoch``, ``total_epochs`` and ``seed`` come from the caller (the launcher's data and ``"train"``
    block, ``autowu.deepspeed.initialize``'s arguments) or from the scheduler params; a disagreement is refused.
    ``world_size``, where known before the engine, lets DeepSpeed's own parse and the batch arithmetic run now.
    """
    source = source or (os.fspath(config) if not isinstance(config, dict) else "DeepSpeed config")
    raw = load_config(config)
    check_config_keys(raw, source)
    _check_values(raw, source)
    stage, precision = zero_stage(raw), half_precision(raw)
    options, counts = _autowu_block(raw, source, steps_per_epoch=steps_per_epoch, total_epochs=total_epochs,
                                    seed=seed)
    adamp = _adamp_block(raw, source, stage, precision)
    _refuse_shape_dependent_config_optimizer(raw, stage)
    if options is not None and asks_for_rollback(raw):
        where = rollback_unsupported(raw)
        if where:
            raise ConfigError(f"{source}: scheduler AutoWU: rollback with {where} is not supported (autowu puts "
                              "back ZeRO stage 1 and 2's partitions, or an fp32 model without ZeRO); use "
                              "\"zero_optimization\": {\"stage\": 1} or 2, or set \"rollback\": false in the "
                              "scheduler params")
    _refuse_precision_mixes(raw, stage, precision, source)
    micro = accumulation = None
    if world_size is not None:
        micro, accumulation = _batch(raw, world_size, source)
        _deepspeed_parse(raw, world_size, source)
    deepspeed = _DeepSpeedDict(raw)
    resolved = ResolvedConfig(deepspeed=deepspeed, source=source, autowu=options, adamp=adamp, zero_stage=stage,
                              precision=precision, micro_batch=micro, accumulation=accumulation, **counts)
    deepspeed.resolution = resolved
    return resolved


def refuse_client_objects(resolved: ResolvedConfig, optimizer=None, lr_scheduler=None) -> None:
    """Refuse a client optimizer or scheduler passed beside a config block for the same thing, and a timm
    optimizer whose per-parameter logic DeepSpeed's flat partitions would silently drop."""
    if resolved.autowu is not None and lr_scheduler is not None:
        raise ConfigError("the config selects AutoWU and an lr_scheduler was passed too: choose one")
    if resolved.adamp is not None and optimizer is not None:
        raise ConfigError("the config's optimizer block selects AdamP and an optimizer was passed too: choose one")
    cls = type(optimizer)
    flattened = resolved.zero_stage > 0 or resolved.precision is not None
    if flattened and cls.__module__.startswith("timm.") and cls.__name__ in _SHAPE_DEPENDENT_TIMM_OPTIMIZERS:
        raise ConfigError(
            f"timm's {cls.__name__} under DeepSpeed's ZeRO/fp16 optimizer sees flat 1-D partitions and silently "
            f"drops its per-parameter logic; for AdamP put \"optimizer\": {{\"type\": \"AdamP\", "
            "\"params\": {...}} in the config (autowu's ZeRO-aware AdamP) and pass no optimizer")


# ---------------------------------------------------------------------------------------------- the blocks
def _autowu_block(config: Dict[str, Any], source: str, **given):
    """AutoWU's options and step counts from the scheduler block (None, {} where it names another scheduler)."""
    if not selects_autowu(config):  # the run's length, for the "auto" step counts of DeepSpeed's schedulers
        return None, {key: given[key] for key in ("steps_per_epoch", "total_epochs") if given.get(key) is not None}
    params = config["scheduler"].get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: scheduler AutoWU: params must be an object, got {shown(params)}")
    where = f"{source}: scheduler AutoWU params"
    unfilled = sorted(key for key, value in params.items() if value == "auto")
    if unfilled:
        raise ConfigError(f"{where}: {unfilled} still say \"auto\": the program that built the engine did not fill "
                          "them in; write the numbers in the config")
    counts = {key: params[key] for key in _STEP_COUNTS if key in params}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key}: expected a positive whole number, got {shown(value)}")
    options = {key: value for key, value in params.items() if key not in _STEP_COUNTS}
    for key, value in given.items():
        if value is None:
            continue
        held = options if key == "seed" else counts
        if key in held and held[key] != value:
            raise ConfigError(f"{where}.{key} {held[key]!r} disagrees with {value!r} from the "
                              f"{'run (train.seed / --seed)' if key == 'seed' else 'data and epochs'}; remove it "
                              "from the scheduler params")
        held[key] = value
    if FRAMEWORK_TOTAL_STEPS in counts:
        counts["total_epochs"] = _epochs_of_total_steps(counts.pop(FRAMEWORK_TOTAL_STEPS), counts, where)
    unknown = set(options) - {f.name for f in dataclasses.fields(AutoWUOptions)}
    if unknown:
        raise unknown_keys_error(where, unknown, [f.name for f in dataclasses.fields(AutoWUOptions)] +
                                 list(_STEP_COUNTS))
    return AutoWUOptions.from_dict(options, where), counts


def _epochs_of_total_steps(total_steps: int, counts: Dict[str, int], where: str) -> int:
    steps_per_epoch = counts.get("steps_per_epoch")
    if steps_per_epoch is None:
        raise ConfigError(f"{where}.{FRAMEWORK_TOTAL_STEPS} {total_steps} needs steps_per_epoch (optimizer steps "
                          "an epoch: AutoWU tests at epochs' ends) in the scheduler params")
    epochs, rest = divmod(total_steps, steps_per_epoch)
    if rest or epochs == 0:
        raise ConfigError(f"{where}.{FRAMEWORK_TOTAL_STEPS} {total_steps} is not a whole number of epochs of "
                          f"{steps_per_epoch} steps (steps_per_epoch)")
    if counts.get("total_epochs", epochs) != epochs:
        raise ConfigError(f"{where}.{FRAMEWORK_TOTAL_STEPS} {total_steps} is {epochs} epochs of {steps_per_epoch} "
                          f"steps, but total_epochs is {counts['total_epochs']}")
    return epochs


def _adamp_block(config: Dict[str, Any], source: str, stage: int, precision: Optional[str]):
    """ZeroAdamP's keyword arguments from the optimizer block (None where it names another optimizer); refuses
    the set-ups where AdamP cannot run as AdamP."""
    if not selects_adamp(config):
        return None
    from .adamp import ZeroAdamP, check_arguments  # the optimizer's own signature lists its arguments

    where = f"{source}: optimizer AdamP params"
    params = config["optimizer"].get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be an object, got {shown(params)}")
    params = dict(params)
    known = set(inspect.signature(ZeroAdamP.__init__).parameters) - {"self", "params"}
    unknown = set(params) - known
    if unknown:
        raise unknown_keys_error(where, unknown, known)
    unfilled = sorted(key for key, value in params.items() if value == "auto")
    if unfilled:
        raise ConfigError(f"{where}: {unfilled} still say \"auto\": the program that built the engine did not fill "
                          "them in; write the numbers in the config")
    if isinstance(params.get("betas"), list):
        params["betas"] = tuple(params["betas"])
    check_types(where, params, typing.get_type_hints(ZeroAdamP.__init__))
    if stage == 3:
        raise ConfigError(f"{source}: optimizer AdamP with ZeRO stage 3: not supported (its projection needs each "
                          "parameter's channels, which autowu maps for ZeRO's flat partitions of stage 1 and 2 "
                          "only); use \"zero_optimization\": {\"stage\": 1} or 2")
    zero = config.get("zero_optimization")
    offload = (zero.get("offload_optimizer") or {}) if isinstance(zero, dict) else {}
    if isinstance(offload, dict) and offload.get("device") not in (None, "none"):
        raise ConfigError(f"{source}: optimizer AdamP with zero_optimization.offload_optimizer (device "
                          f"{offload.get('device')!r}): not supported (autowu's AdamP all-reduces its per-channel "
                          "sums where the partitions live, and offloaded they live on the host); remove "
                          "offload_optimizer, or use DeepSpeed's own AdamW there (no AdamP projection)")
    if stage == 0 and precision:
        raise ConfigError(f"{source}: optimizer AdamP with {precision} needs ZeRO stage 1 or 2: without ZeRO, "
                          f"DeepSpeed's {precision} optimizer flattens the parameters in a way autowu does not map; "
                          "use \"zero_optimization\": {\"stage\": 1}")
    arguments = inspect.signature(ZeroAdamP.__init__).bind_partial(**params)
    arguments.apply_defaults()
    try:
        check_arguments(*(arguments.arguments[name] for name in ("lr", "betas", "eps", "weight_decay", "delta",
                                                                 "wd_ratio")))
    except ConfigError as err:
        raise ConfigError(f"{where}: {str(err).removeprefix('AdamP: ')}") from None
    return params


def _refuse_precision_mixes(config: Dict[str, Any], stage: int, precision: Optional[str], source: str) -> None:
    """Gradient accumulation in another precision than the model's: DeepSpeed 0.19.8 builds an engine for it only
    with ZeRO (and for bf16 with fp32 accumulation on ZeRO-1, its BF16_Optimizer); without ZeRO it raises
    NotImplementedError at the engine's construction."""
    from deepspeed.runtime.config import DtypeEnum

    accumulate = _block(config, "data_types").get("grad_accum_dtype")
    model = {"fp16": "fp16", "bf16": "bf16", "bfloat16": "bf16", None: "fp32"}[precision]
    if accumulate is None or stage > 0:
        return
    try:
        accumulated = DtypeEnum(accumulate).name   # any of DeepSpeed's spellings: "float", "torch.float32", ...
    except ValueError:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype: invalid {accumulate!r}; allowed: fp32, fp16, "
                          "bf16 (or DeepSpeed's other spellings of them)") from None
    if accumulated != model:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype {accumulate!r} with a {model} model needs ZeRO "
                          "(\"zero_optimization\": {\"stage\": 1} or 2); DeepSpeed has no engine for that mix "
                          "without it")


def _refuse_shape_dependent_config_optimizer(config: Dict[str, Any], stage: int) -> None:
    name = str(_type_of(config, "optimizer") or "").lower()
    if name in ("lamb", "onebitlamb") and stage > 0:
        raise ConfigError(f"optimizer {config['optimizer']['type']} with ZeRO stage {stage}: its trust ratio is per "
                          "parameter, but ZeRO hands it flat partitions that cut through parameters (DeepSpeed "
                          "#88); use ZeRO stage 0, or AdamP, which autowu maps onto the partitions")


# ---------------------------------------------------------------------------------------------- batch and steps
def _batch(config: Dict[str, Any], world_size: int, source: str):
    """Fill in gradient accumulation so that micro x accumulation x world = global; return (micro, accumulation).

    One clear error when the global batch cannot be reached on this many ranks."""
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        value = config.get(key)
        if value is None:
            raise ConfigError(f"{source}: needs train_batch_size (global) and train_micro_batch_size_per_gpu")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: {key} must be a positive whole number, got {shown(value)}")
    micro, global_batch = config["train_micro_batch_size_per_gpu"], config["train_batch_size"]
    per_step = micro * world_size
    if global_batch % per_step:
        raise ConfigError(f"{source}: train_batch_size {global_batch} is not a multiple of "
                          f"train_micro_batch_size_per_gpu {micro} x {world_size} ranks = {per_step}; "
                          f"use a world size that divides {global_batch // micro} or change the batch sizes")
    accumulation = global_batch // per_step
    configured = config.get("gradient_accumulation_steps")
    if configured not in (None, "auto", accumulation):
        raise ConfigError(f"{source}: gradient_accumulation_steps {shown(configured)} disagrees with "
                          f"{global_batch} / ({micro} x {world_size} ranks) = {accumulation}; remove it or fix it")
    config["gradient_accumulation_steps"] = accumulation
    return micro, accumulation


def _fill_schedule_steps(config: Dict[str, Any], total_steps: int, source: str) -> None:
    """The ``"auto"`` step counts of DeepSpeed's WarmupCosineLR / WarmupDecayLR, from the run's length."""
    block = _block(config, "scheduler")
    params = block.get("params", {}) or {}
    for key, value in (("total_num_steps", total_steps),
                       ("warmup_num_steps", max(1, round(AUTO_WARMUP_FRACTION * total_steps)))):
        if params.get(key) == "auto":
            params[key] = value
        elif isinstance(params.get(key), str):
            raise ConfigError(f"{source}: scheduler {block.get('type')}: {key} must be a number or \"auto\", got "
                              f"{params[key]!r}")


def _deepspeed_parse(config: Dict[str, Any], world_size: int, source: str) -> None:
    """DeepSpeed's own parse of the config on ``world_size`` ranks, its refusals as one line naming the key.
    (autowu's blocks are left out: DeepSpeed would refuse AutoWU and AdamP by name.)"""
    from deepspeed.runtime.config import DeepSpeedConfig

    def parse(candidate):
        DeepSpeedConfig(candidate, mpu=_one_rank())

    plain = copy.deepcopy({k: v for k, v in config.items() if not (
        (k == "scheduler" and selects_autowu(config)) or (k == "optimizer" and selects_adamp(config)))})
    # The batch arithmetic on world_size ranks is checked already (_batch); parsed as one rank's share, the parse
    # does not depend on whether a process group exists yet (DeepSpeed's parser takes one rank without one).
    plain["train_batch_size"] = config["train_batch_size"] // world_size
    for key in ("scheduler", "optimizer"):
        if isinstance(plain.get(key), dict) and isinstance(plain[key].get("params"), dict):
            # "auto" step counts are filled once the data is known; parse with a placeholder
            plain[key]["params"] = {k: (1 if v == "auto" else v) for k, v in plain[key]["params"].items()}
    try:
        parse(plain)
    except Exception as err:  # DeepSpeed's parser raises whatever its code hits: name the key it was reading
        culprit = next((key for key in plain if _parses_without(parse, plain, key)), None)
        raise ConfigError(f"{source}: DeepSpeed {_deepspeed_version()} refuses "
                          f"{_described(err, culprit)}") from None


def _described(err: Exception, culprit: Optional[str]) -> str:
    """DeepSpeed's refusal in one line, naming the key: a block's own validation (pydantic) names the field."""
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic's ValidationError: the field's path and what it expects
        try:
            first = errors()[0]
            loc = tuple(str(part) for part in first.get("loc", ()))
            path = ".".join(loc if culprit is None or loc[:1] == (culprit,) else (culprit, *loc))
            return f"{path}: {first.get('msg', '')}, got {shown(first.get('input'))}"
        except Exception:  # noqa: BLE001  (another errors(): fall back to the message)
            pass
    text = " ".join(str(err).split())[:300] or type(err).__name__
    return f"\"{culprit}\": {type(err).__name__}: {text}" if culprit else f"the config: {type(err).__name__}: {text}"


def _parses_without(parse, config: Dict[str, Any], key: str) -> bool:
    try:
        parse({k: v for k, v in copy.deepcopy(config).items() if k != key})
        return True
    except Exception:  # noqa: BLE001  (any failure: the key alone is not the cause)
        return False

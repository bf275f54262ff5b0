"""AutoWU as a DeepSpeed LR scheduler and autowu's AdamP as a DeepSpeed optimizer, chosen from the JSON config.

``import autowu.deepspeed`` registers both (``autowu/engine_seam.py``): from then on DeepSpeed's own
``deepspeed.initialize``, and every program that calls it for you (Accelerate, Hugging Face's Trainer), builds
them from the config::

    import autowu.deepspeed  # noqa: F401  (registers "AutoWU" and "AdamP")
    # "scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 1251, "total_epochs": 90}}
    # "optimizer": {"type": "AdamP", "params": {"lr": 1.0, "weight_decay": 0.1}}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config="ds_configs/resnet50_4k.json")
    for images, labels in loader:
        loss = criterion(engine(images), labels)
        engine.backward(loss)
        engine.step()

``autowu.deepspeed.initialize`` is the same with ``steps_per_epoch``/``total_epochs`` as arguments (what the
launcher uses). ``attach(engine)`` installs the loss hook on an engine built another way.

The hook (``AutoWULossHook``) keeps the mean of each optimizer step's micro-batch losses on the device and
hands it to the scheduler, which buffers it there. At each GP test (an epoch's end, or more often on a fast
ramp) the scheduler makes one all-reduce (mean over data-parallel ranks) of the losses buffered since its last
test, runs the GP test, and takes rank 0's decision by a broadcast, so every rank switches at the same step
with the same LR. On an fp16 overflow the engine skips the scheduler's step; the hook steps it anyway, so the
schedule stays aligned with the data. The default mode's rollback at the switch is the engine's own
(``autowu.rollback.EngineRollback``: each rank's ZeRO-1/2 partition, its optimizer state and the module's buffers;
its snapshots saved beside each rank's checkpoint shards by the hook's ``save_checkpoint``).

``"optimizer": {"type": "AdamP"}`` builds ``autowu.adamp.ZeroAdamP`` and declares ZeRO-1/2's flat partitions
to it, so that AdamP's projection and ``wd_ratio`` run on every parameter (timm's AdamP under ZeRO silently
runs Adam: it sees one 1-D tensor). A layer-wise timm optimizer handed over as a client optimizer under ZeRO,
and AdamP with ZeRO-3, are refused. With AutoWU under fp16, the dynamic loss scaler no longer ends the run at
its minimum scale: a warmup that overflows step after step is AutoWU's signal, and those steps are skipped and
their losses still recorded. ``end_process`` ends a rank without the interpreter teardown that aborts it.
"""
from __future__ import annotations

import argparse
import copy
import functools
import inspect
import math
import os
import typing
import warnings
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist

from .adamp import ZeroAdamP, zero_partition_layouts
from .jsonfile import read_json
from .gp import GPTestSettings
from .rollback import EngineRollback
from .scheduler import MODE_DEFAULTS, AutoWU
from .settings import check_types, from_mapping, unknown_keys_error

SCHEDULER_TYPE = "AutoWU"
OPTIMIZER_TYPE = "AdamP"
# model serves rollback, which under DeepSpeed takes the engine's module (``EngineRollback``, installed by attach):
# a config names no module.
_AUTOWU_PARAMS = set(inspect.signature(AutoWU.__init__).parameters) - {"self", "optimizer", "model"}
_ADAMP_PARAMS = set(inspect.signature(ZeroAdamP.__init__).parameters) - {"self", "params"}
# timm optimizers whose update depends on each parameter's shape: on ZeRO's flat 1-D partitions they silently
# become something else (AdamP/SGDP lose the projection, LAMB/LARS the trust ratio, Adafactor its factoring).
_SHAPE_DEPENDENT_TIMM_OPTIMIZERS = ("AdamP", "SGDP", "Lamb", "Lars", "Adafactor", "AdafactorBigVision")


def remove_cpu_shm_buffers(master_port, local_rank="*") -> None:
    """DeepSpeed's CPU all-reduce (its ``deepspeed_shm_comm`` op) creates a 66 MB file in /dev/shm for each rank,
    ``deepspeed_allreduce_buffer_<n>_<addr>_<port>_<local rank>``, and never removes it: every CPU run leaked
    132 MB of memory on 2 ranks until a reboot (a day of test runs here filled 20 GB and stalled the machine).
    Removing the names at exit is safe: ranks that mapped the memory keep it until they end."""
    import glob
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{master_port}_{local_rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


def end_process(exit_code: int = 0) -> None:
    """End a DeepSpeed rank: a barrier, the process groups destroyed, atexit handlers run, output flushed, then
    the process exits without the interpreter's finalisation.

    Why not return normally: ``destroy_process_group`` forgets the groups but DeepSpeed still holds them (the
    engine, its ZeRO optimizer, ``deepspeed.utils.groups``), so gloo's worker threads (4 ``pt_gloo_runloop``,
    2 ``gloo_tcp_loop`` on 2 ranks, counted here) are still running when the interpreter tears down, and their
    destructors then now and then abort the rank ("terminate called without an active exception", exit -6:
    a finished run reported as failed; torch's pull request 179291 describes the same)."""
    import atexit
    import sys
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what a normal exit would run (DeepSpeed's /dev/shm files, loggers)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def load_config(config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """A DeepSpeed config as a dict, from a dict or a JSON file, with a clear error for a bad file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    return read_json(config, "DeepSpeed config")


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


@functools.lru_cache(maxsize=1)
def deepspeed_config_keys() -> frozenset:
    """DeepSpeed's top-level config keys, from DeepSpeed itself: every key its config parser
    (``DeepSpeedConfig``) asks a config for, and the key names of ``deepspeed.runtime.constants``.

    DeepSpeed reads the top level key by key and ignores the rest: ``"zero_optimisation"`` trains without ZeRO.
    Asking the installed version (rather than keeping a copied list) follows its upgrades.
    """
    from types import SimpleNamespace

    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _KeyRecorder({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1})
    recorder.asked = set()
    # A one-rank view (mpu) so that parsing needs no process group and its batch check holds.
    DeepSpeedConfig(recorder, mpu=SimpleNamespace(get_data_parallel_world_size=lambda: 1))
    if len(recorder.asked) < 30 or "zero_optimization" not in recorder.asked:
        raise RuntimeError(f"autowu: DeepSpeed {_deepspeed_version()}'s config parser no longer reads the config "
                           "key by key as autowu.deepspeed.deepspeed_config_keys expects; update it")
    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    return frozenset(recorder.asked | names)


def _deepspeed_version() -> str:
    import deepspeed
    return deepspeed.__version__


def check_config_keys(config: Dict[str, Any], source: str = "DeepSpeed config") -> None:
    """Refuse top-level keys DeepSpeed does not know, naming the nearest known one."""
    unknown = set(config) - deepspeed_config_keys()
    if unknown:
        raise unknown_keys_error(source, unknown, deepspeed_config_keys(), list_known=False,
                                 why=f"DeepSpeed {_deepspeed_version()} would ignore {'them' if len(unknown) > 1 else 'it'} "
                                 "without a word")


# What programs that build the engine fill in for "auto" (Hugging Face's Trainer and Accelerate): the run's
# optimizer steps. AutoWU turns it into epochs with steps_per_epoch.
FRAMEWORK_TOTAL_STEPS = "total_num_steps"


def autowu_params(config: Dict[str, Any], **overrides) -> Optional[Dict[str, Any]]:
    """AutoWU's keyword arguments from a config's scheduler block, or None if it names another scheduler.

    The step counts: ``steps_per_epoch`` and ``total_epochs`` in the params, or ``steps_per_epoch`` and
    ``total_num_steps`` (what Hugging Face's Trainer and Accelerate write for ``"auto"``; a whole number of
    epochs), or ``overrides`` (``autowu.deepspeed.initialize``'s ``steps_per_epoch``/``total_epochs``, the
    launcher's ``seed``). A missing, disagreeing or still-``"auto"`` one is one error (one owner a setting).
    Unknown keys raise: a misspelt option must not be silently ignored. ``gp_settings`` may be an object of
    ``GPTestSettings``' fields.
    """
    block = config.get("scheduler")
    if not block or block.get("type") != SCHEDULER_TYPE:
        return None
    params = dict(block.get("params", {}))
    unknown = set(params) - _AUTOWU_PARAMS - {FRAMEWORK_TOTAL_STEPS}
    if unknown:
        raise unknown_keys_error("scheduler AutoWU params", unknown, _AUTOWU_PARAMS | {FRAMEWORK_TOTAL_STEPS})
    if "rollback_keep" in params and not params.get("rollback", _mode_default(params, "rollback")):
        raise ValueError("scheduler AutoWU: rollback_keep is used only where the switch rolls back (the default "
                         "mode, or \"rollback\": true)")
    unfilled = sorted(key for key, value in params.items() if value == "auto")
    if unfilled:
        raise ValueError(f"scheduler AutoWU: params {unfilled} still say \"auto\": the program that built the engine "
                         "did not fill them in; write the numbers in the config")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in params and params[key] != value:
            raise ValueError(f"scheduler AutoWU: params.{key} {params[key]!r} disagrees with {value!r} from the "
                             f"{'data and epochs' if key != 'seed' else 'run (train.seed / --seed)'}; remove it from "
                             "the scheduler params")
        params[key] = value
    if FRAMEWORK_TOTAL_STEPS in params:
        params["total_epochs"] = _epochs_of_total_steps(params.pop(FRAMEWORK_TOTAL_STEPS), params)
    if isinstance(params.get("gp_settings"), dict):
        params["gp_settings"] = from_mapping(GPTestSettings, params["gp_settings"], "scheduler AutoWU: gp_settings")
    check_types("scheduler AutoWU params", params, typing.get_type_hints(AutoWU.__init__))
    keep = params.get("rollback_keep", 6)
    if keep < 1:
        raise ValueError(f"scheduler AutoWU: rollback_keep must be a positive integer, got {keep!r}")
    missing = [k for k in ("steps_per_epoch", "total_epochs") if k not in params]
    if missing:
        raise ValueError(f"scheduler AutoWU needs {' and '.join(missing)} (optimizer steps an epoch; epochs): put "
                         f"them in the config's scheduler params (or {FRAMEWORK_TOTAL_STEPS} for total_epochs, as "
                         "Hugging Face's Trainer and Accelerate fill in for \"auto\"), or pass them to "
                         "autowu.deepspeed.initialize")
    return params


def _mode_default(params: Dict[str, Any], name: str):
    """The value AutoWU's mode (``params["mode"]``, else the default mode) gives an option not set."""
    return MODE_DEFAULTS.get(params.get("mode", "default"), MODE_DEFAULTS["default"])[name]


def _epochs_of_total_steps(total_steps, params: Dict[str, Any]) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"scheduler AutoWU: params.{FRAMEWORK_TOTAL_STEPS} must be a positive whole number of "
                         f"optimizer steps, got {total_steps!r}")
    steps_per_epoch = params.get("steps_per_epoch")
    if steps_per_epoch is None:
        raise ValueError(f"scheduler AutoWU: params.{FRAMEWORK_TOTAL_STEPS} {total_steps} needs steps_per_epoch "
                         "(optimizer steps an epoch: AutoWU tests at epochs' ends) in the scheduler params")
    epochs, rest = divmod(total_steps, steps_per_epoch)
    if rest or epochs == 0:
        raise ValueError(f"scheduler AutoWU: params.{FRAMEWORK_TOTAL_STEPS} {total_steps} is not a whole number of "
                         f"epochs of {steps_per_epoch} steps (steps_per_epoch)")
    if params.get("total_epochs", epochs) != epochs:
        raise ValueError(f"scheduler AutoWU: params.{FRAMEWORK_TOTAL_STEPS} {total_steps} is {epochs} epochs of "
                         f"{steps_per_epoch} steps, but total_epochs is {params['total_epochs']}")
    return epochs


def zero_stage(config: Dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def half_precision(config: Dict[str, Any]) -> Optional[str]:
    """The config's enabled 16-bit mode ("fp16", "bf16" or DeepSpeed's alias "bfloat16"), or None."""
    return next((key for key in ("fp16", "bf16", "bfloat16") if config.get(key, {}).get("enabled", False)), None)


def adamp_params(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """ZeroAdamP's keyword arguments from the config's optimizer block, or None if it names another optimizer.

    Refuses, with one error each, unknown params and the set-ups where AdamP cannot run as AdamP.
    """
    block = config.get("optimizer")
    if not block or str(block.get("type", "")).lower() != OPTIMIZER_TYPE.lower():
        return None
    params = dict(block.get("params", {}))
    unknown = sorted(set(params) - _ADAMP_PARAMS)
    if unknown:
        raise ValueError(f"optimizer AdamP: unknown params {unknown}; known: {sorted(_ADAMP_PARAMS)}")
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    check_types("optimizer AdamP params", params, typing.get_type_hints(ZeroAdamP.__init__))
    stage = zero_stage(config)
    if stage not in (0, 1, 2):
        raise ValueError(f"optimizer AdamP with ZeRO stage {stage}: not supported (its projection needs each "
                         "parameter's channels, which autowu maps for ZeRO's flat partitions of stage 1 and 2 "
                         "only); use \"zero_optimization\": {\"stage\": 1} or 2")
    if stage == 0 and half_precision(config):
        raise ValueError("optimizer AdamP with fp16/bf16 needs ZeRO stage 1 or 2: without ZeRO, DeepSpeed's "
                         "fp16 optimizer flattens the parameters in a way autowu does not map")
    return params


def _refuse_shape_dependent_config_optimizer(config: Dict[str, Any]) -> None:
    name = str(config.get("optimizer", {}).get("type", "")).lower()
    if name in ("lamb", "onebitlamb") and zero_stage(config) > 0:
        raise ValueError(f"optimizer {config['optimizer']['type']} with ZeRO stage {zero_stage(config)}: its trust "
                         "ratio is per parameter, but ZeRO hands it flat partitions that cut through parameters "
                         "(DeepSpeed #88); use ZeRO stage 0, or AdamP, which autowu maps onto the partitions")


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


def _refuse_rollback_where_it_cannot(config: Dict[str, Any]) -> None:
    where = rollback_unsupported(config)
    if where:
        raise ValueError(f"scheduler AutoWU: rollback with {where} is not supported (autowu puts back ZeRO stage 1 "
                         "and 2's partitions, or an fp32 model without ZeRO); use \"zero_optimization\": "
                         "{\"stage\": 1} or 2, or set \"rollback\": false in the scheduler params")


def _refuse_shape_dependent_client_optimizer(optimizer, config: Dict[str, Any]) -> None:
    cls = type(optimizer)
    flattened = zero_stage(config) > 0 or half_precision(config) is not None
    if flattened and cls.__module__.startswith("timm.") and cls.__name__ in _SHAPE_DEPENDENT_TIMM_OPTIMIZERS:
        raise ValueError(
            f"timm's {cls.__name__} under DeepSpeed's ZeRO/fp16 optimizer sees flat 1-D partitions and silently "
            f"drops its per-parameter logic; for AdamP put \"optimizer\": {{\"type\": \"AdamP\", "
            "\"params\": {...}} in the config (autowu's ZeRO-aware AdamP) and pass no optimizer")


def refuse_unsupported(config: Dict[str, Any], optimizer=None, lr_scheduler=None):
    """Every refusal of a config (and the client optimizer or scheduler passed with it) before an engine is built:
    unknown top-level keys, bad AutoWU or AdamP params, AdamP where it cannot be AdamP, a shape-dependent
    optimizer on ZeRO's flat partitions, a config block and a client object for the same thing. Returns
    ``(autowu_params(config), adamp_params(config))``."""
    check_config_keys(config)
    _refuse_shape_dependent_config_optimizer(config)
    scheduler_params, optimizer_params = autowu_params(config), adamp_params(config)
    if scheduler_params is not None and scheduler_params.get("rollback"):  # asked for, not the mode's default
        _refuse_rollback_where_it_cannot(config)
    if scheduler_params is not None and lr_scheduler is not None:
        raise ValueError("the config selects AutoWU and an lr_scheduler was passed too: choose one")
    if optimizer_params is not None:
        if optimizer is not None:
            raise ValueError("the config's optimizer block selects AdamP and an optimizer was passed too: choose one")
    elif isinstance(optimizer, torch.optim.Optimizer):
        _refuse_shape_dependent_client_optimizer(optimizer, config)
    return scheduler_params, optimizer_params


def _declare_zero_partitions(engine, optimizer: ZeroAdamP) -> None:
    """Tell ZeroAdamP which parameters ZeRO's flat partitions hold; refuse anything it cannot map."""
    zero_optimizer = engine.optimizer
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # ZeRO stage 1 and 2
        for partition, layout, group in zero_partition_layouts(zero_optimizer):
            optimizer.set_layout(partition, layout, group)
    optimizer.check_layouts()


def _keep_fp16_alive_at_min_scale(engine) -> None:
    """DeepSpeed's dynamic loss scaler raises once it must go below ``min_loss_scale``. During AutoWU's warmup
    a stretch of overflowing steps is the rising loss the next test must see; keep skipping those steps at
    the minimum scale instead of ending the run (the scale grows back after ``loss_scale_window`` good steps).
    """
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
        scaler.raise_error_at_min_scale = False


class AutoWULossHook:
    """Wraps ``engine.backward`` and ``engine.step`` to feed AutoWU each optimizer step's loss.

    The loss is summed on its device over the micro-batches of a step (no ``.item()``, no host sync) and its
    mean handed to the scheduler as ``pending_loss`` right before the engine would step it.
    """

    def __init__(self, engine, scheduler: AutoWU):
        self.engine = engine
        self.scheduler = scheduler
        self._loss_sum: Optional[torch.Tensor] = None
        self._micro_batches = 0
        self._engine_backward = engine.backward
        self._engine_step = engine.step
        self._engine_save_checkpoint = engine.save_checkpoint
        self._engine_load_checkpoint = engine.load_checkpoint
        engine.backward = self.backward
        engine.step = self.step
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        group = getattr(engine, "seq_data_parallel_group", None)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            scheduler.loss_reducer = _AllReduceMean(group)
            scheduler.decision_sync = _BroadcastFromFirstRank(group)

    def backward(self, loss, *args, **kwargs):
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._micro_batches += 1
        return self._engine_backward(loss, *args, **kwargs)

    def step(self, *args, **kwargs):
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            if self._loss_sum is None and self.scheduler.phase == "warmup":
                raise RuntimeError(
                    f"AutoWU received no loss for optimizer step {self.scheduler.last_step + 1}: the engine was "
                    "stepped with no engine.backward(loss) since its last step (a loop calling loss.backward() "
                    "itself, or a framework that bypasses the engine's backward). AutoWU's warmup is decided by "
                    "the training loss: call engine.backward(loss), then engine.step()")
            if self._loss_sum is not None:
                self.scheduler.pending_loss = self._loss_sum / self._micro_batches
            self._loss_sum, self._micro_batches = None, 0
        result = self._engine_step(*args, **kwargs)
        if boundary and not self.engine.was_step_applied():
            # fp16 overflow: the engine skipped the scheduler, but the step consumed its data. Its loss (from
            # the forward pass, which did not overflow) is as real as any other.
            if self.scheduler.pending_loss is None:
                self.scheduler.pending_loss = math.nan
            self.scheduler.step()
        self.scheduler.pending_loss = None
        return result

    def _engine_rollback(self) -> Optional[EngineRollback]:
        rollback = self.scheduler._rollback
        return rollback if isinstance(rollback, EngineRollback) else None

    def save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
        # Every rank calls save_checkpoint; rank 0's scheduler state is what every rank loads, so the losses
        # it holds must already be the ranks' mean.
        self.scheduler.reduce_pending_losses()
        rollback = self._engine_rollback()
        if rollback is not None:
            # Before the engine's save: it ends in a barrier, and whoever commits the checkpoint after it (the
            # launcher, or DeepSpeed's ``latest``) must find every rank's file whole. DeepSpeed's default tag.
            rollback.save_rank_file(os.path.join(save_dir, str(tag if tag is not None
                                                                else f"global_step{self.engine.global_steps}")))
        return self._engine_save_checkpoint(save_dir, tag, *args, **kwargs)

    def load_checkpoint(self, load_dir, tag=None, *args, **kwargs):
        load_path, client_state = self._engine_load_checkpoint(load_dir, tag, *args, **kwargs)
        rollback = self._engine_rollback()
        if rollback is not None and load_path is not None:
            # load_path is the checkpoint's model-states file, in the folder DeepSpeed resolved the tag to.
            rollback.load_rank_file(os.path.dirname(load_path))
        return load_path, client_state

    def remove(self) -> None:
        self.engine.backward = self._engine_backward
        self.engine.step = self._engine_step
        self.engine.save_checkpoint = self._engine_save_checkpoint
        self.engine.load_checkpoint = self._engine_load_checkpoint
        self.scheduler.loss_reducer = self.scheduler.decision_sync = None


class _AllReduceMean:
    def __init__(self, group):
        self.group = group

    def __call__(self, losses: torch.Tensor) -> None:
        dist.all_reduce(losses, op=dist.ReduceOp.SUM, group=self.group)
        losses /= dist.get_world_size(self.group)


class _BroadcastFromFirstRank:
    def __init__(self, group):
        self.group = group

    def __call__(self, decision: torch.Tensor) -> torch.Tensor:
        dist.broadcast(decision, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                       group=self.group)
        return decision


def _contiguous_parameters(model) -> list:
    """Gives every parameter the standard strides; returns the 4-D ones that were channels_last.

    DeepSpeed 0.19.8 broadcasts each parameter at initialize as ``p.data.view(torch.uint8)``, which needs a last
    stride of 1: a channels_last convolution weight (``model.to(memory_format=torch.channels_last)``, as
    ffcv-imagenet does) raises "self.stride(-1) must be 1 to view Float as Byte" there, 1x1 kernels included
    (``is_contiguous()`` is true for them, the last stride is not 1).
    """
    channels_last = []
    for p in model.parameters() if model is not None else ():
        standard = torch.empty(p.shape, device="meta").stride()
        if p.data.stride() != standard:
            if p.dim() == 4 and p.data.is_contiguous(memory_format=torch.channels_last):
                channels_last.append(p)
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return channels_last


def selects_autowu(config: Dict[str, Any]) -> bool:
    return (config.get("scheduler") or {}).get("type") == SCHEDULER_TYPE


def selects_adamp(config: Dict[str, Any]) -> bool:
    return str((config.get("optimizer") or {}).get("type", "")).lower() == OPTIMIZER_TYPE.lower()


def attach(engine) -> AutoWULossHook:
    """Install AutoWU's loss hook on an engine whose LR scheduler is AutoWU, if it has none yet; return the hook.

    Engines built after ``import autowu.deepspeed`` have it already. For one built before (with an ``AutoWU``
    passed as ``lr_scheduler``) or handed over by a framework: ``engine`` is the ``DeepSpeedEngine`` (what
    Accelerate's ``prepare`` returns for the model) or an object holding it as ``.engine`` or
    ``.deepspeed_engine`` (Lightning's strategy). Also declares ZeRO's partitions to autowu's AdamP and keeps
    the fp16 scaler going at its minimum scale, as a config-built engine does.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not isinstance(engine, DeepSpeedEngine):
        inner = getattr(engine, "engine", None) or getattr(engine, "deepspeed_engine", None)
        if not isinstance(inner, DeepSpeedEngine):
            raise TypeError(f"autowu.deepspeed.attach needs a DeepSpeedEngine (or an object holding one as .engine or "
                            f".deepspeed_engine), got {type(engine).__name__}")
        engine = inner
    hook = getattr(engine, "autowu_hook", None)
    if hook is not None:
        return hook
    scheduler = engine.lr_scheduler
    if not isinstance(scheduler, AutoWU):
        raise ValueError(f"autowu.deepspeed.attach: the engine's LR scheduler is {type(scheduler).__name__}, not "
                         "AutoWU; select it in the config (\"scheduler\": {\"type\": \"AutoWU\", ...}) or pass an "
                         "AutoWU as lr_scheduler")
    if isinstance(engine.basic_optimizer, ZeroAdamP):
        _declare_zero_partitions(engine, engine.basic_optimizer)
    # An AutoWU that rolls back (the default mode's, or asked for) was built on the basic optimizer, which misses
    # ZeRO's 16-bit copies: the engine's own rollback takes its place. Asked for where the engine cannot, it was
    # refused before the engine was built (refuse_unsupported); so here that is the mode's default: off.
    rollback = scheduler._rollback
    if rollback is not None and not isinstance(rollback, EngineRollback):
        where = rollback_unsupported(engine._config._param_dict)
        if where:
            warnings.warn(f"AutoWU: the default mode's rollback at the switch is off for this engine ({where}); the "
                          "switch keeps the state trained past the peak", RuntimeWarning)
            scheduler.rollback, scheduler._rollback = False, None
        else:
            scheduler.use_rollback(EngineRollback(engine, rollback.keep))
    engine.autowu_hook = AutoWULossHook(engine, scheduler)
    if engine.fp16_enabled():
        _keep_fp16_alive_at_min_scale(engine)
    return engine.autowu_hook


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None,
               steps_per_epoch: Optional[int] = None, total_epochs: Optional[int] = None,
               seed: Optional[int] = None, **kwargs):
    """``deepspeed.initialize`` with AutoWU's step counts (and seed) as arguments.

    After ``import autowu.deepspeed``, a plain ``deepspeed.initialize`` understands
    ``"scheduler": {"type": "AutoWU", ...}`` and ``"optimizer": {"type": "AdamP", ...}`` (pass ``model`` or
    ``model_parameters``, no ``optimizer``); this is the same, with ``steps_per_epoch``, ``total_epochs`` and
    ``seed`` written into the scheduler params (a disagreeing JSON value is refused), unknown top-level keys
    refused for any config, and channels_last parameters handled (see ``_contiguous_parameters``). The config
    comes from ``config`` or ``args.deepspeed_config``. Returns DeepSpeed's ``(engine, optimizer,
    training_dataloader, lr_scheduler)``; with AutoWU, ``engine.autowu_hook`` holds the loss hook.
    """
    import deepspeed

    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
    if config is None:
        raise ValueError("autowu.deepspeed.initialize needs a config (a dict or a JSON path)")
    config = load_config(config)
    counts = {"steps_per_epoch": steps_per_epoch, "total_epochs": total_epochs, "seed": seed}
    if autowu_params(config, **counts) is not None:  # refuses a disagreement
        config["scheduler"].setdefault("params", {}).update({k: v for k, v in counts.items() if v is not None})
    _, optimizer_params = refuse_unsupported(config, optimizer, kwargs.get("lr_scheduler"))  # before any engine
    if optimizer_params is not None and model is None and model_parameters is None:
        raise ValueError("optimizer AdamP needs the model or model_parameters")
    channels_last = _contiguous_parameters(model)
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, config=config, **kwargs)
    if zero_stage(config) == 0:
        # Without ZeRO the engine keeps the module's parameters: their layout can come back. ZeRO-1/2 rebind
        # them to NCHW views of the flat buffer after every step; the activations stay channels_last (cuDNN
        # follows the input) and each convolution re-lays out its weights (benchmarks/gpu_throughput.py
        # measures what that costs).
        for p in channels_last:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return engine, engine_optimizer, loader, scheduler


# The registration: from here on DeepSpeed's own initialize builds AutoWU and AdamP from a config (an import
# with a side effect, chosen over an explicit call because the engine is often built inside a framework the
# user does not call directly: one import line is all such a program can add; a moved seam fails right here).
from .engine_seam import install as _install_engine_seam  # noqa: E402

_install_engine_seam()

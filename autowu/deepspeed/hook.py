"""AutoWU's loss hook on a DeepSpeed engine, its collectives, and ZeRO's partitions declared to AdamP.

``attach(engine)`` installs ``AutoWULossHook`` on an engine whose LR scheduler is AutoWU. The hook keeps the
loss of each optimizer step on the device and hands it to the scheduler (``AutoWU.receive_loss``) right before
the engine steps it. That loss is the mean over the step's micro-batches of the loss as the model computed it:
``engine.backward(loss)`` scales the loss by the accumulation itself, so the hook averages what it is given;
``engine.backward(loss, scale_wrt_gas=False)`` (Hugging Face's Trainer) means the caller scaled each micro-batch's
loss already, so that their sum is the step's loss, and the hook sums. At each GP test the scheduler all-reduces
(mean over data-parallel ranks) the losses buffered since the last one, runs the test, and takes rank 0's decision
by a broadcast, so every rank switches at the same step with the same LR. On an fp16 overflow the engine skips
the scheduler's step; the hook steps it anyway, so the schedule stays aligned with the data.

The default mode's rollback at the switch is the engine's own (``autowu.rollback.EngineRollback``); its snapshots
are saved beside each rank's checkpoint shards by the hook's ``save_checkpoint``.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from ..adamp import ZeroAdamP, maps_partitions, zero_partition_layouts
from ..ds_config import asks_for_rollback, rollback_unsupported
from ..errors import ConfigError
from ..rollback import EngineRollback
from ..scheduler import AutoWU


class AutoWULossHook:
    """Wraps ``engine.backward``, ``engine.step`` and the engine's checkpointing to feed AutoWU each optimizer
    step's loss; no ``.item()``, no host sync."""

    def __init__(self, engine, scheduler: AutoWU):
        self.engine = engine
        self.scheduler = scheduler
        self._loss_sum: Optional[torch.Tensor] = None
        self._micro_batches = 0
        self._summed = None   # whether this step's losses are summed (scale_wrt_gas=False) or averaged
        # Where the caller owns the accumulation ("managed_gradient_accumulation": false), every engine.step() is
        # an optimizer step; the engine says it is a boundary only while inside it. Read once: a config setting.
        managed = getattr(engine, "managed_gradient_accumulation", None)
        self._every_step_a_boundary = callable(managed) and not managed()
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
            scheduler.connect_ranks(_AllReduceMean(group), _BroadcastFromFirstRank(group))

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True, **kwargs):
        """``DeepSpeedEngine.backward``'s own signature, so that ``scale_wrt_gas`` is read however it is passed."""
        summed = not scale_wrt_gas
        if self._summed is not None and summed != self._summed:
            raise ConfigError("engine.backward was called with and without scale_wrt_gas=False within one optimizer "
                              "step: AutoWU cannot tell the step's loss (the mean of losses DeepSpeed scales, or the "
                              "sum of losses the caller scaled); call it alike for every micro-batch")
        self._summed = summed
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._micro_batches += 1
        return self._engine_backward(loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas, **kwargs)

    def step(self, *args, **kwargs):
        boundary = self._every_step_a_boundary or self.engine.is_gradient_accumulation_boundary()
        scheduler = self.scheduler
        handed = None
        if boundary:
            if self._loss_sum is None and scheduler.phase == "warmup":
                raise RuntimeError(
                    f"AutoWU received no loss for optimizer step {scheduler.last_step + 1}: the engine was "
                    "stepped with no engine.backward(loss) since its last step (a loop calling loss.backward() "
                    "itself, or a framework that bypasses the engine's backward). AutoWU's warmup is decided by "
                    "the training loss: call engine.backward(loss), then engine.step()")
            if self._loss_sum is not None:
                handed = self._loss_sum if self._summed else self._loss_sum / self._micro_batches
                scheduler.receive_loss(handed)
            self._loss_sum, self._micro_batches, self._summed = None, 0, None
        result = self._engine_step(*args, **kwargs)
        if boundary and not self.engine.was_step_applied():
            # fp16 overflow: the engine skipped the scheduler, but the step consumed its data. Its loss (from
            # the forward pass, which did not overflow) is as real as any other.
            scheduler.step(handed if handed is not None else math.nan)
        scheduler.receive_loss(None)
        return result

    def _engine_rollback(self) -> Optional[EngineRollback]:
        rollback = self.scheduler.switch_rollback
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
        self.scheduler.connect_ranks(None, None)


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


def declare_zero_partitions(engine, optimizer: ZeroAdamP) -> None:
    """Tell ZeroAdamP which parameters ZeRO's flat partitions hold; refuse anything it cannot map."""
    zero_optimizer = engine.optimizer
    if maps_partitions(zero_optimizer):  # ZeRO stage 1 and 2, and the bf16 optimizer's partitions
        for partition, layout, group in zero_partition_layouts(zero_optimizer):
            optimizer.set_layout(partition, layout, group)
    optimizer.check_layouts()


def refuse_pipeline(engine_or_model) -> None:
    """AutoWU under DeepSpeed's pipeline engine: refused. Its ``train_batch`` runs the backward passes and the
    optimizer step inside itself (``engine.backward`` and ``engine.step`` raise there), and steps the scheduler
    before the batch's loss is known, so the loss never reaches AutoWU."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule

    if isinstance(engine_or_model, (PipelineEngine, PipelineModule)):
        raise ConfigError("AutoWU with DeepSpeed's pipeline engine (a PipelineModule) is not supported: its "
                          "train_batch() steps the scheduler before the batch's loss is known, so AutoWU could not "
                          "see it; train without pipeline parallelism (a plain module), or use another scheduler")


def _keep_fp16_alive_at_min_scale(engine) -> None:
    """DeepSpeed's dynamic loss scaler raises once it must go below ``min_loss_scale``. During AutoWU's warmup
    a stretch of overflowing steps is the rising loss the next test must see; keep skipping those steps at
    the minimum scale instead of ending the run (the scale grows back after ``loss_scale_window`` good steps).
    """
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
        scaler.raise_error_at_min_scale = False


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
    refuse_pipeline(engine)
    if not isinstance(scheduler, AutoWU):
        raise ValueError(f"autowu.deepspeed.attach: the engine's LR scheduler is {type(scheduler).__name__}, not "
                         "AutoWU; select it in the config (\"scheduler\": {\"type\": \"AutoWU\", ...}) or pass an "
                         "AutoWU as lr_scheduler")
    if isinstance(engine.basic_optimizer, ZeroAdamP):
        declare_zero_partitions(engine, engine.basic_optimizer)
    # An AutoWU that rolls back (the default mode's, or asked for) was built on the basic optimizer, which misses
    # ZeRO's 16-bit copies: the engine's own rollback takes its place. Asked for where the engine cannot, it was
    # refused with the config; so here that is the mode's default: off.
    rollback = scheduler.switch_rollback
    if rollback is not None and not isinstance(rollback, EngineRollback):
        config = engine._config._param_dict
        where = rollback_unsupported(config)
        if not where:
            try:
                scheduler.use_rollback(EngineRollback(engine, rollback.keep))
            except ConfigError as err:  # an optimizer wrapper autowu cannot put back
                if asks_for_rollback(config):
                    raise
                where = str(err)
        if where:
            warnings.warn(f"AutoWU: the default mode's rollback at the switch is off for this engine ({where}); the "
                          "switch keeps the state trained past the peak", RuntimeWarning)
            scheduler.use_rollback(None)
    engine.autowu_hook = AutoWULossHook(engine, scheduler)
    if engine.fp16_enabled():
        _keep_fp16_alive_at_min_scale(engine)
    return engine.autowu_hook

"""BatchNorm across data-parallel ranks: timm's SyncBN conversion, checked, and one set of running statistics.

- ``convert_sync_batchnorm``: timm's converter, which keeps ``BatchNormAct2d``'s activation
  (``SyncBatchNormAct``). torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it into a plain
  ``SyncBatchNorm`` whose forward never calls the ``act`` child it copies: EfficientNet would train without most
  of its SiLUs. ``check_norm_act`` refuses such a model.
- ``sync_batchnorm_statistics``: DeepSpeed broadcasts parameters once and never syncs buffers (DDP does at every
  forward), so each rank's running statistics drift apart with its own data. Averaging them (timm's
  ``distribute_bn(reduce=True)``) before each evaluation and checkpoint gives one model: validation on every rank
  normalises alike, and the checkpoint holds every rank's statistics, not rank 0's alone.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import UserError


def check_norm_act(model: torch.nn.Module) -> None:
    """Raise if a SyncBatchNorm holds an activation (or drop) it will never call."""
    from timm.layers import SyncBatchNormAct

    lost = [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.SyncBatchNorm) and not isinstance(module, SyncBatchNormAct)
            and any(not isinstance(getattr(module, attr, None), (type(None), torch.nn.Identity))
                    for attr in ("act", "drop"))]
    if lost:
        raise UserError(f"{len(lost)} SyncBatchNorm layers hold an activation their forward never calls "
                         f"(first: {lost[0]}): converted with torch's convert_sync_batchnorm; use "
                         "autowu.batchnorm.convert_sync_batchnorm (timm's), which keeps BatchNormAct2d's act")


def convert_sync_batchnorm(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """timm's SyncBN conversion (norm + act layers become ``SyncBatchNormAct``), checked."""
    from timm.layers import convert_sync_batchnorm as timm_convert

    converted = timm_convert(model, process_group)
    check_norm_act(converted)
    return converted


def batchnorm_statistics(model: torch.nn.Module) -> List[torch.Tensor]:
    """The floating running statistics of every BatchNorm layer (SyncBatchNorm and timm's norm-act included)."""
    return [buffer for module in model.modules() if isinstance(module, _BatchNorm) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var) if buffer is not None]


@torch.no_grad()
def sync_batchnorm_statistics(model: torch.nn.Module, group=None) -> int:
    """Average every BatchNorm running mean and variance over the ranks of ``group``, in place.

    One all-reduce of all statistics together, in fp32 whatever the buffers' dtype. A collective: every rank
    calls it. Returns the number of values averaged (0 on one rank, or without BatchNorm).
    """
    buffers = batchnorm_statistics(model)
    if not buffers or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) < 2:
        return 0
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()
    return flat.numel()


@torch.no_grad()
def gather_batchnorm_statistics(model: torch.nn.Module) -> List[torch.Tensor]:
    """Every rank's BatchNorm statistics, one flat fp32 CPU tensor a rank (a collective). The ranks' statistics
    differ until an epoch's end averages them, so a mid-epoch checkpoint keeps each rank's, not rank 0's alone."""
    buffers = batchnorm_statistics(model)
    if not buffers or not dist.is_initialized():
        return []
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return [g.cpu() for g in gathered]


@torch.no_grad()
def load_batchnorm_statistics(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy one rank's statistics from ``gather_batchnorm_statistics`` back into ``model``."""
    offset = 0
    for buffer in batchnorm_statistics(model):
        buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()
    if offset != flat.numel():
        raise UserError(f"BatchNorm statistics from the checkpoint hold {flat.numel()} values, the model {offset}")

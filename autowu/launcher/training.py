"""The steps of ``launch/train.py``, importable: the data, the model, what actually runs, one epoch of training,
evaluation. Each takes what it needs as arguments; the launcher reads as the sequence of them."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..batchnorm import batchnorm_statistics, convert_sync_batchnorm
from ..data import DataConfig, beton_info, write_betons
from ..data.digits import build_digits_folder
from ..environment import local_rank
from ..errors import ConfigError
from .nodes import is_shared_path
from .run_config import REPO



def prepare_data(data_dir: Optional[str], run) -> Tuple[Dict[str, str], Dict[str, dict]]:
    """The betons to train on: ``data_dir`` (the same path on every node, each node's own copy or a shared
    disk), or the embedded digits dataset, built once per node-local disk (each node's local rank 0), or once
    (rank 0) when the disk is shared. Returns the paths and ``beton_info`` of both splits."""
    if not data_dir and run.default_data == "digits":
        data_dir = os.path.join(REPO, "data", "digits", "betons")
        builder = dist.get_rank() == 0 if is_shared_path(os.path.dirname(data_dir)) else local_rank() == 0
        if builder and not os.path.exists(os.path.join(data_dir, "val.beton")):
            print("[train] no --data_dir: building the embedded dataset (scikit-learn's digits as JPEGs)", flush=True)
            folders = build_digits_folder(os.path.join(REPO, "data", "digits", "folders"))
            write_betons(folders, data_dir, DataConfig.from_json(os.path.join(REPO, run.data_config)).write)
        dist.barrier()
    elif not data_dir:
        raise ConfigError("--data_dir is required: a folder with train.beton and val.beton "
                         "(write them with launch/write_betons.py)")
    paths = {split: os.path.join(data_dir, f"{split}.beton") for split in ("train", "val")}
    infos = {split: beton_info(path) for split, path in paths.items()}  # one clear error if missing
    return paths, infos


def num_classes_of(path: str) -> int:
    from ffcv.reader import Reader
    reader = Reader(path)
    labels = reader.metadata[f"f{list(reader.field_names).index('label')}"]
    return int(labels.max()) + 1


def build_model(run, num_classes: int, device: torch.device, distributed: bool) -> torch.nn.Module:
    import timm
    try:
        model = timm.create_model(run.model, num_classes=num_classes)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        import difflib
        close = difflib.get_close_matches(run.model, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"unknown model {run.model!r} (timm)" + (f"; did you mean {', '.join(close)}?" if close else
                                                                  "; timm.list_models() lists them")) from None
    if run.sync_bn and distributed:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn: torch's SyncBatchNorm runs on GPUs only; set it false for a CPU run "
                             "(each rank then normalises its own batch, and the running statistics are averaged "
                             "before every evaluation and checkpoint)")
        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    model = model.to(device)
    if run.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def check_batchnorm_statistics(engine, device: torch.device) -> torch.dtype:
    """Refuse half-precision BatchNorm statistics after DeepSpeed's initialize; on CPU ranks of a 16-bit engine,
    cast them to the weights' dtype (CPU batch_norm wants one dtype). Returns the weights' dtype."""
    import deepspeed
    dtype = next(engine.module.parameters()).dtype
    half_statistics = [b for b in batchnorm_statistics(engine.module) if b.dtype != torch.float32]
    if half_statistics:
        # DeepSpeed before 0.19.2 (module.half()) or a "buffer_dtype" setting: SyncBatchNorm would count the
        # rank's 3.2M elements a channel in fp16 (inf, then NaN) and running statistics would lose precision.
        raise ConfigError(f"{len(half_statistics)} BatchNorm statistics are {half_statistics[0].dtype} after "
                         f"DeepSpeed's initialize (DeepSpeed {deepspeed.__version__}); they must stay fp32: use "
                         "DeepSpeed >= 0.19.2 and no buffer_dtype in the config")
    if dtype != torch.float32 and device.type == "cpu":
        for buffer in engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)
    return dtype


def describe_recipe(engine, device) -> Dict[str, object]:
    """What actually runs, read from the engine (not the config): for the log and run_config.json."""
    from timm.layers import SyncBatchNormAct

    stage = engine.zero_optimization_stage()
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    modules = list(engine.module.modules())
    sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in modules)
    norm = (f"SyncBatchNorm in {sync} layers ({sum(isinstance(m, SyncBatchNormAct) for m in modules)} with their "
            "activation, timm's)" if sync else "per-rank BatchNorm, running statistics averaged over ranks "
            "before each evaluation and checkpoint")
    convs = [m.weight for m in modules if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    channels_last = sum(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    scaler_skips = engine.fp16_enabled() and not getattr(engine.optimizer.loss_scaler, "raise_error_at_min_scale", True)
    rollback = getattr(getattr(engine, "lr_scheduler", None), "switch_rollback", None)
    return {"optimizer": f"{type(basic).__module__}.{type(basic).__name__}",
            "switch_rollback": (f"on: each rank's training state at up to {rollback.keep} GP tests kept in host "
                                "memory, the last at or below the peak put back at the switch" if rollback is not None
                                else "off"),
            "conv_weights": f"{channels_last} of {len(convs)} channels_last" + (
                " (ZeRO binds them to NCHW views of its flat buffer)" if convs and stage
                and channels_last < len(convs) else ""),
            "zero_stage": stage,
            "precision": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
            "batchnorm": norm, "device": device.type,
            "fp16_loss_scaler": ("dynamic, skips overflowing steps at its minimum scale instead of ending the run"
                                 if scaler_skips else "DeepSpeed's" if engine.fp16_enabled() else "none (fp32/bf16)")}


@dataclass
class EpochProgress:
    """Where an epoch stands: the micro-batches done and the loss sums still open (on the device). A mid-epoch
    checkpoint carries it, so that a resumed epoch logs exactly what the unbroken one would have."""
    batches_done: int = 0
    interval_sum: Optional[torch.Tensor] = None   # since the last log reading
    interval_count: int = 0
    epoch_sum: Optional[torch.Tensor] = None
    epoch_count: int = 0

    def add(self, loss: torch.Tensor) -> None:
        self.interval_sum = loss if self.interval_sum is None else self.interval_sum + loss
        self.epoch_sum = loss if self.epoch_sum is None else self.epoch_sum + loss
        self.interval_count += 1
        self.epoch_count += 1

    def state_dict(self) -> Dict:
        return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in vars(self).items()}

    @classmethod
    def from_state_dict(cls, state: Dict, device: torch.device) -> "EpochProgress":
        return cls(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in state.items()})


@dataclass
class EpochResult:
    mean_loss: float       # over every micro-batch of the epoch (nan if none)
    images_per_s: float
    seconds: float
    progress: EpochProgress
    stopped_by: Optional[int] = None   # the signal the ranks agreed to stop for, mid-epoch


def train_one_epoch(engine, loader, criterion, steps_per_epoch: int, accumulation: int, dtype: torch.dtype,
                    log, log_every: int, scheduler=None, description: str = "",
                    progress: Optional[EpochProgress] = None, stop=None) -> EpochResult:
    """One epoch: ``steps_per_epoch`` optimizer steps of ``accumulation`` micro-batches, or what is left of it
    after ``progress`` (a resumed epoch; the loader skips the batches done). The loss stays on the device except
    every ``log_every`` steps (a reading for the log). ``scheduler``: AutoWU, whose tests are logged as they
    happen. ``stop`` (``autowu.preemption.StopRequests``): checked at step boundaries; the epoch ends early when
    the ranks agree to stop."""
    progress = progress or EpochProgress()
    micro_batch = engine.train_micro_batch_size_per_gpu()
    world = dist.get_world_size()
    bar = log.progress_bar(steps_per_epoch, description)
    bar.update(progress.batches_done // accumulation)
    tests_logged = len(scheduler.history) if scheduler is not None else 0
    started = interval_start = time.perf_counter()
    images_before = progress.epoch_count
    stopped_by = None
    for micro_step, (images, labels) in enumerate(loader, start=progress.batches_done):
        if micro_step >= steps_per_epoch * accumulation:
            break
        loss = criterion(engine(images.to(dtype)).float(), labels)
        engine.backward(loss)
        engine.step()
        progress.add(loss.detach())
        progress.batches_done = micro_step + 1
        if (micro_step + 1) % accumulation:
            continue
        bar.update()
        step = engine.global_steps
        if step % log_every == 0 or micro_step + 1 == steps_per_epoch * accumulation:
            mean_loss = (progress.interval_sum / progress.interval_count).item()  # the one host sync of log_every steps
            rate = progress.interval_count * micro_batch * world / (time.perf_counter() - interval_start)
            lr = engine.get_lr()[0]
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            log.record("train", step=step, epoch=step / steps_per_epoch, loss=mean_loss, lr=lr, images_per_s=rate)
            log.scalars([("Train/loss", mean_loss, step)])
            progress.interval_sum, progress.interval_count, interval_start = None, 0, time.perf_counter()
        if scheduler is not None:
            tests_logged = log.autowu_tests(scheduler, tests_logged)
        if stop is not None and micro_step + 1 < steps_per_epoch * accumulation:
            stopped_by = stop.agreed(step)
            if stopped_by:
                break
    bar.close()
    seconds = time.perf_counter() - started
    return EpochResult(mean_loss=(progress.epoch_sum / progress.epoch_count).item() if progress.epoch_count else math.nan,
                       images_per_s=(progress.epoch_count - images_before) * micro_batch * world / seconds,
                       seconds=seconds, progress=progress, stopped_by=stopped_by)


@dataclass
class Evaluation:
    top1: float
    top5: float
    images: int   # every validation image once, without the distributed padding


def evaluate(engine, loader, num_samples: int, dtype: torch.dtype) -> Evaluation:
    """Top-1/top-5 over the whole validation set, all-reduced; the padding duplicates are not counted."""
    world, rank = dist.get_world_size(), dist.get_rank()
    pad = math.ceil(num_samples / world) * world - num_samples
    # DistributedSampler pads by repeating the first samples; they land last on ranks >= N mod world.
    my_count = math.ceil(num_samples / world) - (1 if pad and rank >= num_samples % world else 0)
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
    seen = counted = 0
    engine.eval()
    with torch.no_grad():
        for images, labels in loader:
            keep = min(len(labels), my_count - seen)
            seen += len(labels)
            if keep <= 0:
                continue
            logits = engine(images.to(dtype))[:keep].float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:keep, None]
            totals[:2] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).to(totals)
            counted += keep  # counted on the host: no tensor made from a Python number per batch
    engine.train()
    totals[2] = counted
    dist.all_reduce(totals)
    return Evaluation((totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), int(totals[2].item()))

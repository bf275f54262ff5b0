"""Run by tests/test_deepspeed.py on 2 CPU ranks through the deepspeed launcher.

A small MLP on scikit-learn's digits, AdamP (the config's optimizer block: autowu's ZeRO-aware AdamP) under
ZeRO-1, AutoWU from the JSON config via autowu.deepspeed.initialize. Each rank writes what it saw (LR per step,
switch, history) as JSON. Modes: ``resume`` (fp32, gradient accumulation 2: a full run, then a run restored
from a mid-warmup checkpoint), ``fp16`` (real fp16 engine with forced overflows), ``diverge`` (fp16, a stretch
of 30 steps that overflow at any loss scale: stock DeepSpeed raises at the minimum scale, AutoWU's run goes
on), ``builtin`` (a DeepSpeed scheduler block).
"""
import argparse
import json
import math
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import deepspeed
from deepspeed.accelerator import get_accelerator

import autowu.deepspeed as autowu_ds
from autowu import AutoWU
from autowu.launcher.processes import end_process

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=["resume", "fp16", "diverge", "builtin"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

MICRO_BATCH, GAS, STEPS_PER_EPOCH, EPOCHS = 16, 2, 10, 40
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
digits = load_digits()
features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
shard = torch.arange(rank, len(labels), world)  # each rank its own images


def micro_batch(global_micro_step):
    """The micro-batch of a given micro-step: a pure function of the step, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(global_micro_step)
    idx = shard[torch.randint(len(shard), (MICRO_BATCH,), generator=g)]
    return features[idx], labels[idx]


def build(fp16=False, scheduler_block=None, initialize=autowu_ds.initialize):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamP", "params": {"lr": 1.0, "delta": 0.1, "wd_ratio": 0.1, "weight_decay": 0.1}},
        # A test at each epoch's end and the ramp over half the run (the paper's), so that the alignment of
        # tests with epochs and fp16 skips is what these runs check.
        "scheduler": scheduler_block or {"type": "AutoWU", "params": {
            "immediate_cooldown": True, "max_warmup_fraction": 0.5, "max_lr_growth_per_test": None}},
    }
    if fp16:
        config["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 50}
    if initialize is not autowu_ds.initialize:  # stock DeepSpeed: timm's AdamP is fine without projection here
        from timm.optim import AdamP
        config.pop("scheduler")
        config.pop("optimizer")
        config["zero_allow_untested_optimizer"] = True
        return initialize(model=model, config=config, optimizer=AdamP(model.parameters(), lr=1e-3))
    return initialize(model=model, config=config, steps_per_epoch=STEPS_PER_EPOCH, total_epochs=EPOCHS)


def train(engine, scheduler, until, forced_overflows=(), on_step=None, diverging=()):
    lrs = {}
    while engine.global_steps < until:
        step = engine.global_steps
        lrs[step] = engine.get_lr()[0]
        for micro in range(GAS):
            x, y = micro_batch(step * GAS + micro)
            out = engine(x.to(next(engine.parameters()).dtype))
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            if step in forced_overflows:
                loss = loss * math.inf  # inf gradients: the fp16 engine must skip this step
            if step in diverging:
                # A finite loss that rises step after step, whose gradients overflow fp16 at any loss scale.
                loss = loss * 1e8 * (1 + step - min(diverging))
            engine.backward(loss)
            engine.step()
        if on_step:
            on_step(engine.global_steps)
    return lrs


def summary(scheduler):
    return {"switch_step": scheduler.switch_step, "peak_lr": scheduler.peak_lr, "last_step": scheduler.last_step,
            "history": [{k: r[k] for k in ("step", "passed", "probability", "argmin_lr", "nonfinite")}
                        for r in scheduler.history], "final_lr": scheduler.get_last_lr()[0]}


result = {"rank": rank, "world": world}
if args.mode == "resume":
    ckpt = os.path.join(args.out, "ckpt")
    cut = 5 * STEPS_PER_EPOCH + 3  # mid-warmup, mid-epoch
    engine, _, _, scheduler = build()
    assert isinstance(scheduler, AutoWU) and engine.lr_scheduler is scheduler
    saver = lambda s: engine.save_checkpoint(ckpt, tag="cut") if s == cut else None
    result["full_lrs"] = train(engine, scheduler, TOTAL_STEPS, on_step=saver)
    result["full"] = summary(scheduler)
    engine2, _, _, scheduler2 = build()
    engine2.load_checkpoint(ckpt, tag="cut")
    result["resumed_from"] = {"global_steps": engine2.global_steps, "scheduler_step": scheduler2.last_step}
    result["resumed_lrs"] = train(engine2, scheduler2, TOTAL_STEPS)
    result["resumed"] = summary(scheduler2)
elif args.mode == "fp16":
    # CPU fp16 is refused unless the CPU's mkldnn has it; the engine's fp16 logic itself runs anywhere.
    get_accelerator().is_fp16_supported = lambda: True
    engine, _, _, scheduler = build(fp16=True)
    forced = {3, 17, 2 * STEPS_PER_EPOCH - 1, 9 * STEPS_PER_EPOCH - 1}  # two of them on an epoch's last step
    result["lrs"] = train(engine, scheduler, TOTAL_STEPS, forced_overflows=forced)
    result["fp16"] = summary(scheduler)
    result["skipped_steps"] = engine.skipped_steps
    result["global_steps"] = engine.global_steps
    result["dtype"] = str(next(engine.module.parameters()).dtype)
elif args.mode == "diverge":
    get_accelerator().is_fp16_supported = lambda: True
    stretch = range(5 * STEPS_PER_EPOCH, 8 * STEPS_PER_EPOCH)  # epochs 6-8, during the warmup
    engine, _, _, _ = build(fp16=True, initialize=deepspeed.initialize)
    try:  # stock DeepSpeed: the scaler halves the scale at each overflow and raises at its minimum
        train(engine, None, 8 * STEPS_PER_EPOCH, diverging=stretch)
        result["stock_error"] = None
    except Exception as err:  # noqa: BLE001  (DeepSpeed raises a bare Exception)
        result["stock_error"] = str(err)
        result["stock_died_at_step"] = engine.global_steps
    engine, _, _, scheduler = build(fp16=True)
    result["lrs"] = train(engine, scheduler, TOTAL_STEPS, diverging=stretch)
    result["diverge"] = summary(scheduler)
    result["skipped_steps"] = engine.skipped_steps
    result["global_steps"] = engine.global_steps
    result["final_loss_scale"] = engine.optimizer.loss_scaler.cur_scale
else:
    block = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 10}}
    engine, _, _, scheduler = build(scheduler_block=block)
    result["lrs"] = train(engine, scheduler, 20)
    result["scheduler_type"] = type(scheduler).__name__

with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
print(f"rank {rank} done", flush=True)
end_process()  # without the interpreter's teardown, which now and then aborts a rank

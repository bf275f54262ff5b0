"""Run by tests/test_registration.py through the deepspeed launcher: AutoWU and AdamP built by DeepSpeed's own
``deepspeed.initialize`` from the JSON, after ``import autowu.deepspeed``.

Modes:
- ``plain`` (2 ranks): the same run three ways, ``autowu.deepspeed.initialize(steps_per_epoch=..,
  total_epochs=..)``, ``deepspeed.initialize`` with both counts in the JSON, and with ``total_num_steps`` (what
  Accelerate and HF's Trainer fill in); plus an fp16 engine built the plain way (its scaler's flag).
- ``attach`` (1 rank): an engine built before ``import autowu.deepspeed`` with an AutoWU passed as
  ``lr_scheduler``: what stepping it without the hook says, then ``attach``; a loop that calls
  ``loss.backward()`` itself on a hooked engine.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import deepspeed
from deepspeed.accelerator import get_accelerator

from autowu import AutoWU  # the core package: DeepSpeed does not know AutoWU yet
from autowu.launcher.processes import end_process

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=["plain", "attach"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

MICRO_BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 10, 30
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
AUTOWU_PARAMS = {"immediate_cooldown": True, "max_warmup_fraction": 0.5, "max_lr_growth_per_test": None}

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
digits = load_digits()
features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
shard = torch.arange(rank, len(labels), world)


def micro_batch(step):
    g = torch.Generator().manual_seed(step)
    idx = shard[torch.randint(len(shard), (MICRO_BATCH,), generator=g)]
    return features[idx], labels[idx]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def config(scheduler_params=None, optimizer=True, **extra):
    cfg = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "zero_optimization": {"stage": 1}, **extra}
    if optimizer:
        cfg["optimizer"] = {"type": "AdamP", "params": {"lr": 1.0, "delta": 0.1, "wd_ratio": 0.1, "weight_decay": 0.1}}
    if scheduler_params is not None:
        cfg["scheduler"] = {"type": "AutoWU", "params": {**AUTOWU_PARAMS, **scheduler_params}}
    return cfg


def train(engine, steps=TOTAL_STEPS, own_backward=False):
    lrs = []
    for step in range(steps):
        lrs.append(engine.get_lr()[0])
        x, y = micro_batch(step)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        if own_backward:
            loss.backward()
        else:
            engine.backward(loss)
        engine.step()
    return lrs


def summary(engine, scheduler, lrs):
    return {"engine_scheduler_is_autowu": isinstance(engine.lr_scheduler, AutoWU), "returned_is_engines":
            scheduler is engine.lr_scheduler, "optimizer": type(engine.basic_optimizer).__name__,
            "hooked": getattr(engine, "autowu_hook", None) is not None,
            "lrs": lrs, "switch_step": scheduler.switch_step, "peak_lr": scheduler.peak_lr,
            "history": [{k: r[k] for k in ("step", "passed", "probability", "argmin_lr", "at_cap")}
                        for r in scheduler.history],
            "params": [p.detach().double().sum().item() for p in engine.module.parameters()]}


def error_of(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001  (the test asserts the type and the words)
        return f"{type(err).__name__}: {err}"
    return None


result = {"rank": rank}
if args.mode == "plain":
    import autowu.deepspeed as autowu_ds  # the registration

    engine, _, _, scheduler = autowu_ds.initialize(model=model(), config=config({}), steps_per_epoch=STEPS_PER_EPOCH,
                                                   total_epochs=EPOCHS)
    result["autowu_initialize"] = summary(engine, scheduler, train(engine))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model(), config=config({"steps_per_epoch": STEPS_PER_EPOCH, "total_epochs": EPOCHS}))
    result["plain_epochs"] = summary(engine, scheduler, train(engine))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model(), config=config({"steps_per_epoch": STEPS_PER_EPOCH, "total_num_steps": TOTAL_STEPS}))
    result["plain_total_steps"] = summary(engine, scheduler, train(engine))
    result["plain_no_counts"] = error_of(lambda: deepspeed.initialize(model=model(), config=config({})))
    result["plain_misspelt_key"] = error_of(lambda: deepspeed.initialize(model=model(), config=config(
        {"steps_per_epoch": STEPS_PER_EPOCH, "total_epochs": EPOCHS}, zero_optimisation={"stage": 1})))
    get_accelerator().is_fp16_supported = lambda: True  # builds the fp16 engine on a CPU; it is not trained here
    engine, *_ = deepspeed.initialize(model=model(), config=config(
        {"steps_per_epoch": STEPS_PER_EPOCH, "total_epochs": EPOCHS}, fp16={"enabled": True}))
    result["fp16_raises_at_min_scale"] = engine.optimizer.loss_scaler.raise_error_at_min_scale
else:
    def autowu_of(optimizer):
        return AutoWU(optimizer, STEPS_PER_EPOCH, EPOCHS, **AUTOWU_PARAMS)

    # Built before the import: DeepSpeed knows nothing of AutoWU; a client optimizer and scheduler. One engine
    # to see what stepping it unhooked says (its first step is then spent), one to attach.
    unhooked, attached = [deepspeed.initialize(
        model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1.0, weight_decay=0.1),
        lr_scheduler=autowu_of, config=config(optimizer=False))[0] for net in (model(), model())]
    result["unhooked_step"] = error_of(lambda: train(unhooked, steps=1))
    import autowu.deepspeed as autowu_ds

    hook = autowu_ds.attach(attached)
    result["attach_again_same_hook"] = autowu_ds.attach(attached) is hook
    result["attached"] = summary(attached, attached.lr_scheduler, train(attached))
    # The same run built after the import: the seam installs the hook itself.
    net = model()
    engine, _, _, scheduler = deepspeed.initialize(
        model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1.0, weight_decay=0.1),
        lr_scheduler=autowu_of, config=config(optimizer=False))
    result["seam"] = summary(engine, scheduler, train(engine))
    net = model()
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1.0),
                                      config=config(optimizer=False))
    result["attach_without_autowu"] = error_of(lambda: autowu_ds.attach(engine))
    result["attach_not_an_engine"] = error_of(lambda: autowu_ds.attach(net))
    engine, *_ = deepspeed.initialize(model=model(), config=config(
        {"steps_per_epoch": STEPS_PER_EPOCH, "total_epochs": EPOCHS}))
    result["own_backward"] = error_of(lambda: train(engine, steps=2, own_backward=True))

with open(os.path.join(args.out, f"{args.mode}_rank{rank}.json"), "w") as f:
    json.dump(result, f)
end_process()

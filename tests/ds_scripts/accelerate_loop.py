"""Run by tests/test_frameworks.py on 2 CPU ranks through the deepspeed launcher: Hugging Face Accelerate builds
the DeepSpeed engine itself from the JSON, with AutoWU and autowu's AdamP named there, after one line,
``import autowu.deepspeed``. The loop is Accelerate's documented one (DummyOptim/DummyScheduler stand for the
config's optimizer and scheduler; ``accelerator.backward`` runs the engine's backward and step).

``--phase full``: the whole run, saving Accelerate's state (``accelerator.save_state``) after ``--cut`` optimizer
steps. ``--phase resume``: a fresh process that loads that state (``accelerator.load_state``) and runs on.
Each rank writes the LR of every step, its own losses, the scheduler's (all-reduced) losses and decisions.
"""
import argparse
import json
import os

import torch
from sklearn.datasets import load_digits

import autowu.deepspeed as autowu_ds  # noqa: F401  (registers "AutoWU" and "AdamP" with DeepSpeed)
from autowu.launcher.processes import end_process  # registers "AutoWU" and "AdamP" with DeepSpeed
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, InitProcessGroupKwargs

parser = argparse.ArgumentParser()
parser.add_argument("--phase", choices=["full", "resume"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--cut", type=int, default=53)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

MICRO_BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 10, 40
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 1},
    # "auto": what Accelerate fills in from DummyOptim and DummyScheduler, as for any DeepSpeed config.
    "optimizer": {"type": "AdamP", "params": {"lr": "auto", "weight_decay": "auto", "delta": 0.1, "wd_ratio": 0.1}},
    "scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": STEPS_PER_EPOCH, "total_num_steps": "auto",
                                               "immediate_cooldown": True, "max_warmup_fraction": 0.5,
                                               "max_lr_growth_per_test": None}},
}

# On CPUs Accelerate picks no backend by itself and then counts one process on every rank while DeepSpeed runs
# two (each rank believes it is rank 0); naming gloo makes its count DeepSpeed's. On GPUs this line is not needed.
accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=CONFIG),
                          kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
rank, world = accelerator.process_index, accelerator.num_processes
digits = load_digits()
features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
shard = torch.arange(rank, len(labels), world)  # each rank its own images: the ranks' losses differ


def micro_batch(step):
    g = torch.Generator().manual_seed(step)
    idx = shard[torch.randint(len(shard), (MICRO_BATCH,), generator=g)]
    return features[idx], labels[idx]


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = DummyOptim(model.parameters(), lr=1.0, weight_decay=0.1)
# Accelerate counts the steps of the un-split data and divides by the number of processes.
scheduler = DummyScheduler(optimizer, total_num_steps=TOTAL_STEPS * world)
engine, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
autowu = scheduler.scheduler
checkpoint = os.path.join(args.out, "accelerate_state")
start = 0
if args.phase == "resume":
    accelerator.load_state(checkpoint)
    start = engine.global_steps
result = {"rank": rank, "world": world, "start": start, "engine_type": type(engine).__name__,
          "scheduler_type": type(autowu).__name__, "optimizer_type": type(engine.basic_optimizer).__name__,
          "hooked": getattr(engine, "autowu_hook", None) is not None, "lrs": {}, "own_losses": {}}
for step in range(start, TOTAL_STEPS):
    result["lrs"][step] = scheduler.get_last_lr()[0]
    x, y = micro_batch(step)
    loss = torch.nn.functional.cross_entropy(engine(x), y)
    result["own_losses"][step] = loss.item()
    accelerator.backward(loss)
    optimizer.step()  # Accelerate's wrappers: no-ops under DeepSpeed (the engine stepped both)
    scheduler.step()
    optimizer.zero_grad()
    if args.phase == "full" and step + 1 == args.cut:
        accelerator.save_state(checkpoint)  # through the engine's save_checkpoint: the losses are reduced first
        result["scheduler_losses_at_cut"] = [float(v) for v in autowu.state_dict()["losses"]]
result.update(
    switch_step=autowu.switch_step, peak_lr=autowu.peak_lr, last_step=autowu.last_step,
    engine_steps=engine.global_steps,
    history=[{k: r[k] for k in ("step", "passed", "probability", "argmin_lr")} for r in autowu.history],
    params=[p.detach().double().sum().item() for p in engine.module.parameters()])
with open(os.path.join(args.out, f"{args.phase}_rank{rank}.json"), "w") as f:
    json.dump(result, f)
end_process()

"""Run by tests/test_rollback.py on 2 CPU ranks through the deepspeed launcher: AutoWU's rollback on a real
ZeRO-1 engine chosen from the JSON config (the default mode's; "rollback": true in the fp16 run).

An MLP with BatchNorm on scikit-learn's digits (each rank its own images), the config's AdamP (autowu's ZeroAdamP
on ZeRO-1's flat partitions), fp32. The loop copies, at every GP test, what each rank holds: the module (its
weights as ZeRO gathered them, and BatchNorm's statistics), the rank's fp32 partition and the optimizer's moments
for it; at the switch it compares them with what the scheduler put back. Then the same run is cut mid-warmup,
saved through the engine, loaded into a new engine of other initial weights, and run to the end; an fp16
engine to its switch; and an fp16 engine without ZeRO, which cannot roll back. Each rank writes what it saw as JSON and its final weights as a tensor file.
"""
import argparse
import copy
import json
import os
import warnings

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import deepspeed
from deepspeed.accelerator import get_accelerator

import autowu.deepspeed as autowu_ds
from autowu.launcher.processes import end_process
from autowu.rollback import ROLLBACK_FILE, EngineRollback

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

MICRO_BATCH, STEPS_PER_EPOCH, EPOCHS = 32, 28, 30
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
digits = load_digits()
features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
shard = torch.arange(rank, len(labels), world)


def batch(step):
    """A pure function of the step: a resumed run sees what the unbroken one saw."""
    g = torch.Generator().manual_seed(step)
    idx = shard[torch.randint(len(shard), (MICRO_BATCH,), generator=g)]
    return features[idx], labels[idx]


def build(seed, fp16=False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamP", "params": {"lr": 1.0, "weight_decay": 0.1}},
        # the default mode rolls back: no key needed (the fp16 run asks for it by name)
        "scheduler": {"type": "AutoWU", "params": {"immediate_cooldown": True}},
    }
    if fp16:
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
        config["scheduler"]["params"]["rollback"] = True
    engine, _, _, scheduler = autowu_ds.initialize(model=model, config=config, steps_per_epoch=STEPS_PER_EPOCH,
                                                   total_epochs=EPOCHS)
    if fp16:  # DeepSpeed halves the parameters; BatchNorm's floating buffers follow them on a CPU
        for buffer in engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.half()
    assert isinstance(scheduler.switch_rollback, EngineRollback)
    return engine, scheduler


def held(engine):
    """What this rank holds that a rollback must put back."""
    optimizer = engine.basic_optimizer
    partitions = [p for group in optimizer.param_groups for p in group["params"]]
    return {"module": copy.deepcopy(engine.module.state_dict()),
            "partitions": [p.detach().clone() for p in partitions],
            "moments": [{k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                        for p in partitions]}


def same(a, b):
    return (all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
            and all(torch.equal(x, y) for x, y in zip(a["partitions"], b["partitions"]))
            and all(torch.equal(x[k], y[k]) for x, y in zip(a["moments"], b["moments"]) for k in x))


def train(engine, scheduler, until, on_test=None):
    while engine.global_steps < until:
        x, y = batch(engine.global_steps)
        tests = len(scheduler.history)
        engine.backward(torch.nn.functional.cross_entropy(engine(x.to(engine.module[0].weight.dtype)).float(), y))
        engine.step()
        if on_test is not None and len(scheduler.history) > tests:
            on_test(engine.global_steps, scheduler.history[-1])


result = {"rank": rank, "world": world}

def unbroken_run(engine, scheduler, until):
    """Train to ``until`` copying the state at every test; what the switch put back against those copies."""
    taken, at_switch = {}, {}

    def on_test(step, record):
        if record["switched"]:
            at_switch.update(state=held(engine), record=record, lr=engine.get_lr()[0])
        elif not at_switch:
            taken[step] = (record["lr"], held(engine))

    train(engine, scheduler, until, on_test)
    back = at_switch["record"]["rolled_back_to"]
    return {
        "switch_step": scheduler.switch_step, "peak_lr": scheduler.peak_lr, "rolled_back_to": back,
        "test_lrs": {step: lr for step, (lr, _) in taken.items()},
        "lr_after_switch": at_switch["lr"],
        "put_back_equals_copy": back is not None and same(at_switch["state"], taken[back][1]),
        # the module's weights are ZeRO's gathered (16-bit) copies: put back on every rank, not only the partitions
        "module_differs_from_the_last_test": not all(torch.equal(at_switch["state"]["module"][k], v)
                                                     for k, v in taken[max(taken)][1]["module"].items()),
    }


# 1. The unbroken run, its state copied at every test.
engine, scheduler = build(seed=0)
result["whole"] = unbroken_run(engine, scheduler, TOTAL_STEPS)
torch.save(engine.module.state_dict(), os.path.join(args.out, f"whole_rank{rank}.pt"))

# 2. Cut mid-warmup (5 steps before the unbroken run's switch), saved, loaded into a new engine, run to the end.
ckpt = os.path.join(args.out, "ckpt")
cut = result["whole"]["switch_step"] - 5   # snapshots held, the switch still to come
engine, scheduler = build(seed=0)
train(engine, scheduler, cut)
result["snapshots_at_cut"] = [s["step"] for s in scheduler.switch_rollback.snapshots]
engine.save_checkpoint(ckpt, tag="cut")
folder = os.path.join(ckpt, "cut")
result["files"] = sorted(os.listdir(folder))
states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
result["scheduler_state_rollback"] = states["lr_scheduler"]["rollback"]
engine, scheduler = build(seed=7)   # other initial weights: all overwritten by the load
engine.load_checkpoint(ckpt, tag="cut")
result["snapshots_loaded"] = [s["step"] for s in scheduler.switch_rollback.snapshots]
rollback = scheduler.switch_rollback

# The failures, on this engine: the files of another number of ranks, then a missing file.
expected = dict(rollback.expected)
rollback.expected = dict(expected, world_size=world + 1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rollback.load_rank_file(folder)
result["other_world_size"] = {"snapshots": len(rollback.snapshots), "warning": str(caught[0].message)}
rollback.expected = expected
mine = os.path.join(folder, ROLLBACK_FILE.format(rank=rank))
os.rename(mine, mine + ".away")
try:
    rollback.load_rank_file(folder)
    result["missing_file_error"] = None
except FileNotFoundError as err:
    result["missing_file_error"] = str(err)
os.rename(mine + ".away", mine)
rollback.load_rank_file(folder)
assert [s["step"] for s in rollback.snapshots] == result["snapshots_loaded"]

train(engine, scheduler, TOTAL_STEPS)
result["resumed"] = {"switch_step": scheduler.switch_step, "peak_lr": scheduler.peak_lr,
                     "rolled_back_to": scheduler.history[-1]["rolled_back_to"]}
torch.save(engine.module.state_dict(), os.path.join(args.out, f"resumed_rank{rank}.pt"))

# 3. fp16: the module's fp16 weights are rebuilt from the fp32 partitions put back (to the switch only).
get_accelerator().is_fp16_supported = lambda: True   # the CPU's fp16 engine logic runs anywhere
engine, scheduler = build(seed=0, fp16=True)
result["fp16"] = unbroken_run(engine, scheduler, int(result["whole"]["switch_step"] * 1.5))
result["fp16"]["dtype"] = str(engine.module[0].weight.dtype)

# 4. fp16 without ZeRO (DeepSpeed's own fp16 optimizer keeps the master weights): the default's rollback is off.
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 10))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine, _, _, scheduler = autowu_ds.initialize(
        model=model, steps_per_epoch=STEPS_PER_EPOCH, total_epochs=EPOCHS,
        config={"train_micro_batch_size_per_gpu": MICRO_BATCH, "fp16": {"enabled": True},
                "optimizer": {"type": "AdamW", "params": {"lr": 1.0, "torch_adam": True}},
                "scheduler": {"type": "AutoWU", "params": {}}})
result["fp16_no_zero"] = {"rollback": None if scheduler.switch_rollback is None else type(scheduler.switch_rollback).__name__,
                          "warning": " ".join(str(w.message) for w in caught if w.category is RuntimeWarning)}

with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
print(f"rank {rank} done", flush=True)
end_process()

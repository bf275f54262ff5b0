"""Run by tests/test_long_runs.py through the deepspeed launcher: a checkpoint saved on one number of CPU ranks and
resumed on another (autowu.checkpoints: DeepSpeed's universal checkpoint). ``save`` trains a small CNN under
ZeRO-1 with ZeroAdamP and AutoWU for 6 steps and saves; ``load`` resumes. Both write, from rank 0, every
parameter's full fp32 value and AdamP moments (DeepSpeed's safe_get_full_* gather them from the partitions) and
AutoWU's state."""
import argparse

import torch
import torch.distributed as dist

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

import autowu.deepspeed as autowu_ds
from autowu.launcher.processes import end_process
from autowu.launcher.checkpoints import Checkpoints
from autowu.launcher.runlog import RunLog

parser = argparse.ArgumentParser()
parser.add_argument("--phase", choices=["save", "load"], required=True)
parser.add_argument("--out_dir", required=True)
parser.add_argument("--dump", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

GLOBAL_BATCH, MICRO_BATCH = 8, 4
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO_BATCH,
          "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO_BATCH * world), "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamP", "params": {"weight_decay": 0.1, "delta": 0.1, "wd_ratio": 0.1}},
          "scheduler": {"type": "AutoWU", "params": {"immediate_cooldown": True}}}
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                            torch.nn.Linear(8, 5))
checkpoints = Checkpoints(args.out_dir, config, "world_size.py", RunLog(None))
tag = checkpoints.prepare_resume(config) if args.phase == "load" else None
engine, _, _, scheduler = autowu_ds.initialize(model=model, config=config, steps_per_epoch=3, total_epochs=100)
if args.phase == "save":
    for step in range(6 * engine.gradient_accumulation_steps()):
        g = torch.Generator().manual_seed(step * world + rank)
        x, y = torch.randn(MICRO_BATCH, 3, 12, 12, generator=g), torch.randint(0, 5, (MICRO_BATCH,), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
    checkpoints.save(engine, 2)
else:
    state = checkpoints.load(engine, tag)
    assert state["epoch"] == 2, state
dump = {name: {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        for name, p in engine.module.named_parameters()}
basic = engine.optimizer.optimizer
steps = sorted({int(s["step"]) for s in basic.state.values()})
autowu_state = scheduler.state_dict()
if rank == 0:
    torch.save({"params": dump, "adamp_steps": steps, "global_steps": engine.global_steps,
                "autowu": {k: autowu_state[k] for k in ("last_step", "phase", "rule", "history", "losses")}},
               args.dump)
end_process()  # without the interpreter's teardown, which now and then aborts a rank

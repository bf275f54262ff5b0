"""Run by tests/test_setups.py through the deepspeed launcher on 1-4 CPU ranks: every cell of
``tests/setup_matrix.py`` whose rank counts include this run's, each built by DeepSpeed's own
``deepspeed.initialize`` from its JSON (after ``import autowu.deepspeed``) and trained for a few optimizer steps
the way its loop would. Each rank writes, per cell: what refused it (type, message), or each micro-batch loss it
computed, the losses AutoWU recorded (reduced over the ranks), the optimizer steps and the warnings.

The model, 64 -> 4 -> 8 -> 10, is shaped so that ZeRO's partitions on 3 and 4 ranks leave one rank with whole
parameters only (the layout where a rank once skipped AdamP's all-reduce and the run hung).
"""
import argparse
import copy
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import deepspeed
from deepspeed.accelerator import get_accelerator

import autowu.deepspeed  # noqa: F401  (registers AutoWU and AdamP with DeepSpeed)
from autowu import AutoWU
from autowu.launcher.processes import end_process

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from setup_matrix import CELLS  # noqa: E402  (the test's own definitions, beside it)

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--cells", default="", help="comma-separated cell names (default: all for this rank count)")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

MICRO_BATCH, STEPS = 8, 6
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
get_accelerator().is_fp16_supported = lambda: True  # a CPU without AVX512-FP16 builds fp16 engines only so
digits = load_digits()
features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)


def batch(micro_step):
    g = torch.Generator().manual_seed(1000 * rank + micro_step)  # each rank its own images
    idx = torch.randint(len(labels), (MICRO_BATCH,), generator=g)
    return features[idx], labels[idx]


def layers():
    return [torch.nn.Linear(64, 4), torch.nn.ReLU(), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10)]


def merged(base, change):
    out = copy.deepcopy(base)
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_of(cell):
    base = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": cell.gas,
            "steps_per_print": 10 ** 6, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamP", "params": {"weight_decay": 0.1}},
            "scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 3, "total_epochs": 10,
                                                       "max_warmup_fraction": 0.5}}}
    config = merged(base, cell.config)
    if cell.config.get("optimizer") is not None and cell.config["optimizer"].get("type") != "AdamP":
        config["optimizer"] = copy.deepcopy(cell.config["optimizer"])  # replaced whole, not merged
    if "scheduler" in cell.config:
        config["scheduler"] = copy.deepcopy(cell.config["scheduler"])
    return config


def run(cell):
    torch.manual_seed(0)
    config = config_of(cell)
    if cell.pipeline:
        from deepspeed.pipe import PipelineModule
        model = PipelineModule(layers(), num_stages=world, loss_fn=torch.nn.CrossEntropyLoss())
    else:
        model = torch.nn.Sequential(*layers())
    optimizer = None
    if cell.client_optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    elif cell.client_optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=optimizer,
                                              config=config)
        except Exception as err:  # noqa: BLE001  (the test asserts the type and the words)
            return {"refused": type(err).__name__, "message": str(err),
                    "error_module": type(err).__module__}
    dtype = next(engine.module.parameters()).dtype
    own, steps = [], 0
    micro = 0
    while steps < STEPS:
        x, y = batch(micro)
        loss = torch.nn.functional.cross_entropy(engine(x.to(dtype)).float(), y)
        own.append(loss.item())
        if cell.caller_scales:
            engine.backward(loss / cell.gas, scale_wrt_gas=False)
        else:
            engine.backward(loss)
        micro += 1
        if not cell.unmanaged or micro % cell.gas == 0:
            engine.step()
        if micro % cell.gas == 0:
            steps += 1
    scheduler = engine.lr_scheduler
    result = {"dtype": str(dtype), "engine_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
              "optimizer": type(engine.basic_optimizer).__name__, "wrapper": type(engine.optimizer).__name__,
              "scheduler": type(scheduler).__name__, "hooked": hasattr(engine, "autowu_hook"),
              "warnings": [str(w.message) for w in caught if "AutoWU" in str(w.message)]}
    everyone = [None] * world
    dist.all_gather_object(everyone, own)
    result["own_losses"] = everyone
    if isinstance(scheduler, AutoWU):
        scheduler.reduce_pending_losses()   # a collective: every rank
        recorded = scheduler.state_dict()["losses"]
        result.update(autowu_steps=scheduler.last_step, autowu_losses=recorded.tolist(),
                      rollback=type(scheduler.switch_rollback).__name__)
    engine.destroy()
    return result


results = {}
chosen = [c for c in CELLS if world in c.ranks and (not args.cells or c.name in args.cells.split(","))]
for cell in chosen:
    results[cell.name] = run(cell)
    dist.barrier()
with open(os.path.join(args.out, f"setups_{world}ranks_rank{rank}.json"), "w") as f:
    json.dump(results, f)
end_process()

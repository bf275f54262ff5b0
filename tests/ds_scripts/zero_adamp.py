"""Run by tests/test_adamp.py on 1-3 CPU ranks through the deepspeed launcher.

A conv+BatchNorm+linear model whose ZeRO partitions cut through parameters, trained with the config's
``"optimizer": {"type": "AdamP"}`` (autowu's ZeRO-aware AdamP) under ZeRO-1 and ZeRO-2, gradient accumulation
2, a checkpoint at step 3 and a resumed engine. Each rank also trains the same model unpartitioned with timm's
AdamP on the global batch (every rank's micro-batches), as the reference, and, for contrast, timm's AdamP handed
to ZeRO-1 directly. Then the BatchNorm statistics, which differ per rank, are averaged. Writes rank<r>.json.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import deepspeed
from timm.optim import AdamP

import autowu.deepspeed as autowu_ds
from autowu.launcher.processes import end_process
from autowu.adamp import ZeroAdamP
from autowu.batchnorm import batchnorm_statistics, sync_batchnorm_statistics

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--stages", default="1")
parser.add_argument("--local_rank", type=int, default=0)
parser.add_argument("--kernel", default=None, choices=["triton"],
                    help="step the partitions with the Triton kernels (a GPU's; here under TRITON_INTERPRET=1)")
args = parser.parse_args()

MICRO_BATCH, GAS, STEPS, CUT = 8, 2, 6, 3
ADAMP = {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "delta": 0.1, "wd_ratio": 0.1}

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
digits = load_digits()
images = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8).expand(-1, 3, -1, -1)
labels = torch.tensor(digits.target)


def use_kernel(optimizer):
    if args.kernel:
        for p in optimizer.param_groups[0]["params"]:
            optimizer._segments_of(p)[0].kernel = args.kernel


def model_fn():
    torch.manual_seed(0)
    # 351 + 26 + 1287 + 22 + 120 = 1806 parameters: ZeRO's partitions (904 on 2 ranks, 602 on 3) cut conv2.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 13, 3, bias=False), torch.nn.BatchNorm2d(13), torch.nn.ReLU(),
        torch.nn.Conv2d(13, 11, 3, bias=False), torch.nn.BatchNorm2d(11), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(11, 10))


def micro_batch(step, micro, r):
    """Rank r's micro-batch: a pure function of (step, micro-step, rank)."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + r)
    idx = torch.randint(len(labels), (MICRO_BATCH,), generator=g)
    return images[idx], labels[idx]


def config(stage, with_optimizer_block=True):
    c = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": GAS,
         "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6}
    if with_optimizer_block:
        c["optimizer"] = {"type": "AdamP", "params": ADAMP}
    else:
        c["zero_allow_untested_optimizer"] = True
    return c


def train(engine, first, last):
    for step in range(first, last):
        for micro in range(GAS):
            x, y = micro_batch(step, micro, rank)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()


def params_of(module):
    return [p.detach().clone().float() for p in module.parameters()]


def rel_errors(params, reference):
    """Per tensor: ||p - r|| / ||r||."""
    return [((p - r).norm() / r.norm()).item() for p, r in zip(params, reference)]


# The reference: timm's AdamP on the whole model, the global batch of every rank and micro-step.
reference = model_fn()
reference_opt = AdamP(reference.parameters(), lr=ADAMP["lr"], weight_decay=0.1, delta=0.1, wd_ratio=0.1)
for step in range(STEPS):
    reference_opt.zero_grad()
    for r in range(world):
        for micro in range(GAS):
            x, y = micro_batch(step, micro, r)
            (torch.nn.functional.cross_entropy(reference(x), y) / (world * GAS)).backward()
    reference_opt.step()
reference_params = params_of(reference)

result = {"rank": rank, "world": world, "stages": {}}
for stage in [int(s) for s in args.stages.split(",")]:
    engine, optimizer, _, _ = autowu_ds.initialize(model=model_fn(), config=config(stage))
    basic = engine.optimizer.optimizer
    assert isinstance(basic, ZeroAdamP)
    partition = basic.param_groups[0]["params"][0]
    use_kernel(basic)
    layout = basic._layouts[partition][0]
    # Parameters cut by this rank's partition boundaries.
    bounds = (layout.start, layout.start + layout.numel)
    straddling = sum(1 for s, o in zip(layout.shapes, layout.offsets)
                     if any(o < b < o + torch.Size(s).numel() for b in bounds))
    ckpt = os.path.join(args.out, f"ckpt_stage{stage}")
    train(engine, 0, CUT)
    engine.save_checkpoint(ckpt, tag="cut")
    train(engine, CUT, STEPS)
    full = params_of(engine.module)
    projected = None if basic.last_projected is None else int(basic.last_projected)

    resumed_engine, *_ = autowu_ds.initialize(model=model_fn(), config=config(stage))
    use_kernel(resumed_engine.optimizer.optimizer)
    resumed_engine.load_checkpoint(ckpt, tag="cut")
    train(resumed_engine, CUT, STEPS)
    resumed = params_of(resumed_engine.module)

    stats_before = [b.clone() for b in batchnorm_statistics(engine.module)]
    averaged = sync_batchnorm_statistics(engine.module)
    stats_after = batchnorm_statistics(engine.module)
    gathered = [None] * world
    dist.all_gather_object(gathered, [b.tolist() for b in stats_before])
    mean_before = [torch.tensor([g[i] for g in gathered]).mean(0) for i in range(len(stats_before))]
    result["stages"][stage] = {
        "partition": [layout.start, layout.numel], "total": sum(torch.Size(s).numel() for s in layout.shapes),
        "straddling": straddling, "projected": projected,
        "full_vs_reference": rel_errors(full, reference_params),
        "resumed_vs_reference": rel_errors(resumed, reference_params),
        "resumed_vs_full": rel_errors(resumed, full),
        "bn_values_averaged": averaged,
        "bn_before": [b.tolist() for b in stats_before], "bn_after": [b.tolist() for b in stats_after],
        "bn_after_vs_mean": max((a - m).abs().max().item() for a, m in zip(stats_after, mean_before)),
    }

# For contrast: timm's AdamP handed to ZeRO-1 directly (deepspeed.initialize, not autowu's) sees flat shards.
model = model_fn()
timm_engine, *_ = deepspeed.initialize(model=model, config=config(1, with_optimizer_block=False),
                                       optimizer=AdamP(model.parameters(), **{**ADAMP, "betas": (0.9, 0.999)}))
train(timm_engine, 0, STEPS)
result["timm_under_zero_vs_reference"] = rel_errors(params_of(timm_engine.module), reference_params)
result["timm_under_zero_saw"] = [list(p.shape) for p in timm_engine.optimizer.optimizer.param_groups[0]["params"]]

with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
print(f"rank {rank} done", flush=True)
end_process()  # without the interpreter's teardown, which now and then aborts a rank

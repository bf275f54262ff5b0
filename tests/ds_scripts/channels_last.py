"""Run by tests/test_deepspeed.py on 2 CPU ranks: a channels_last model through autowu.deepspeed.initialize.

DeepSpeed 0.19.8 broadcasts parameters at initialize as ``p.data.view(torch.uint8)``, which raises on a
channels_last convolution weight. Each rank writes, for ZeRO-1 (AdamP) and for no ZeRO (plain Adam): the weights'
layout after initialize and after a step, and the parameters after 3 steps, against the same model in NCHW.
"""
import argparse
import json

import torch
import torch.distributed as dist

import deepspeed

import autowu.deepspeed as autowu_ds
from autowu.launcher.processes import end_process

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1),  # 1x1: last stride 8
                               torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 4))


def run(config, channels_last):
    net = model()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    engine, _, _, _ = autowu_ds.initialize(model=net, config=config)
    convs = [m.weight for m in engine.module.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = [bool(w.is_contiguous(memory_format=torch.channels_last)) for w in convs]
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (4,), generator=g)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    return layout, torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])


results = {}
for name, config in {
        "zero1_adamp": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
                        "optimizer": {"type": "AdamP", "params": {"lr": 0.01, "weight_decay": 0.1}}},
        "no_zero_adam": {"train_micro_batch_size_per_gpu": 4,
                         "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}}}}.items():
    layout, params = run(config, channels_last=True)
    _, reference = run(config, channels_last=False)
    results[name] = {"channels_last_after_initialize": layout,
                     "max_difference_to_nchw_run": float((params - reference).abs().max())}
if rank == 0:
    with open(args.out, "w") as f:
        json.dump(results, f)
end_process()  # without the interpreter's teardown, which now and then aborts a rank

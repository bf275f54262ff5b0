"""Run by tests/test_data.py on 2 ranks: which samples each rank's train and val loaders read."""
import argparse
import json
import os

import deepspeed
import torch.distributed as dist

import autowu.deepspeed as autowu_ds  # noqa: F401  (registers "AutoWU" and "AdamP" with DeepSpeed)
from autowu.launcher.processes import end_process
from autowu.data import TrainLoaderConfig, ValLoaderConfig, train_loader, val_loader

parser = argparse.ArgumentParser()
parser.add_argument("beton")
parser.add_argument("out")
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()
beton, out = args.beton, args.out
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
train = train_loader(beton, TrainLoaderConfig(resolution=16, num_workers=1, flip=False,
                                              lighting_alphastd=0.0), 4, distributed=True, seed=3)
val = val_loader(beton, ValLoaderConfig(resolution=16, batch_size=4, num_workers=1), distributed=True)
seen = {"train_epoch0": [int(v) for _, y in train for v in y],
        "train_epoch1": [int(v) for _, y in train for v in y],
        "val": [int(v) for _, y in val for v in y]}
with open(os.path.join(out, f"shard{rank}.json"), "w") as f:
    json.dump(seen, f)
end_process()  # without the interpreter's teardown, which now and then aborts a rank

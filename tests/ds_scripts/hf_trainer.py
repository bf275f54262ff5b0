"""Run by tests/test_registration.py on 2 CPU ranks: Hugging Face's Trainer with gradient accumulation, a DeepSpeed
JSON naming AutoWU (its warmup the whole run) and AdamP, a small GPT-2 built from its config (no download). The Trainer scales each
micro-batch's loss itself and calls ``engine.backward(loss, scale_wrt_gas=False)``; AutoWU must receive the loss
the Trainer logs for each optimizer step. Each rank writes the Trainer's logged losses and AutoWU's."""
import argparse
import json
import os

import torch
import torch.distributed as dist

import autowu.deepspeed  # noqa: F401  (registers AutoWU and AdamP with DeepSpeed)
from autowu import AutoWU
from autowu.launcher.processes import end_process

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--accumulation", type=int, required=True)
parser.add_argument("--local_rank", type=int, default=0)
args = parser.parse_args()

from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

STEPS, SEQUENCES, LENGTH = 6, 96, 16
torch.manual_seed(0)
tokens = torch.randint(0, 64, (SEQUENCES, LENGTH))


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return SEQUENCES

    def __getitem__(self, i):
        return {"input_ids": tokens[i], "labels": tokens[i]}


class Logged(TrainerCallback):
    """The Trainer's logged loss of each step, and AutoWU's recorded losses while it warms up (every rank reduces
    them alike: a collective)."""
    def __init__(self):
        self.losses, self.autowu = {}, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        scheduler = trainer.model_wrapped.lr_scheduler
        if scheduler.phase == "warmup":
            scheduler.reduce_pending_losses()
            self.autowu = scheduler.state_dict()["losses"].tolist()


config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamP", "params": {"lr": "auto", "weight_decay": "auto"}},
          "scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 2, "total_num_steps": "auto",
                                                    "max_warmup_fraction": 1.0}}}
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2))
training = TrainingArguments(output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=args.accumulation, max_steps=STEPS, logging_steps=1,
                             learning_rate=1e-3, weight_decay=0.1, deepspeed=config, use_cpu=True, ddp_backend="gloo",
                             report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
logged = Logged()
trainer = Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=[logged])
trainer.train()
engine = trainer.model_wrapped
scheduler = engine.lr_scheduler
assert isinstance(scheduler, AutoWU), type(scheduler)
result = {"logged": [logged.losses[s] for s in sorted(logged.losses)], "autowu": logged.autowu,
          "autowu_steps": scheduler.last_step, "engine_steps": engine.global_steps,
          "optimizer": type(engine.basic_optimizer).__name__, "world": dist.get_world_size()}
with open(os.path.join(args.out, f"trainer_gas{args.accumulation}_rank{dist.get_rank()}.json"), "w") as f:
    json.dump(result, f)
end_process()

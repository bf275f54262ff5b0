"""Per-step cost of AutoWU's engine hook + scheduler in a real DeepSpeed engine, and its host syncs.

One CPU process (world size 1, gloo), timm ``test_resnet`` on 32 px inputs, the config's AdamP (autowu's
ZeRO-aware one) under ZeRO-1, fp32. Runs:

1. the same engine with a constant LR (no scheduler) and with AutoWU from the JSON config (a GP test every
   50 steps), alternating blocks of steps, median step time of each;
2. the hook's and the scheduler's own work per step, timed alone on the real objects (the A/B difference of
   (1) is within noise);
3. host syncs: every tensor call that reads a value back to Python (``item``, ``tolist``, ``numpy``, ``cpu``,
   ``__bool__``, ``__float__``, ``__int__``, ``__index__``) made from autowu's own code, counted with a
   ``TorchFunctionMode`` over the training steps, split into GP-test steps and all others.

    .venv/bin/python benchmarks/bench_hook.py
"""
import os
import socket
import statistics
import sys
import time

import torch
from torch.overrides import TorchFunctionMode


SYNC_CALLS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}
AUTOWU_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autowu")


class SyncCounter(TorchFunctionMode):
    """Counts value-reading tensor calls whose caller is autowu's code."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.in_test = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS or (name == "to" and any(str(a) == "cpu" for a in args[1:])):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(AUTOWU_DIR):
                self.calls.append((self.in_test, name, os.path.basename(caller), sys._getframe(1).f_code.co_name))
        return func(*args, **(kwargs or {}))


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import timm

    import autowu.deepspeed as autowu_ds
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    batch, steps_per_epoch = 32, 50
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def build(with_autowu):
        model = timm.create_model("test_resnet", num_classes=10)
        config = {"train_micro_batch_size_per_gpu": batch, "zero_optimization": {"stage": 1},
                  "optimizer": {"type": "AdamP", "params": {"lr": 1e-3}}, "steps_per_print": 10 ** 9}
        if with_autowu:
            config["scheduler"] = {"type": "AutoWU", "params": {"immediate_cooldown": True}}
        engine, *_ = autowu_ds.initialize(model=model, config=config, steps_per_epoch=steps_per_epoch,
                                          total_epochs=100)
        return engine

    def train(engine, steps):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            times.append(time.perf_counter() - start)
        return times

    constant, auto = build(False), build(True)
    train(constant, 10), train(auto, 10)
    t_constant, t_auto, t_auto_test = [], [], []
    for _ in range(6):  # alternate blocks so that machine noise hits both alike
        t_constant += train(constant, 50)
        block = train(auto, 50)
        # the step that ran the epoch's GP test is the one where last_step became a multiple of 50
        test_index = (50 - (auto.lr_scheduler.last_step % 50)) % 50 - 1
        t_auto_test.append(block[test_index])
        t_auto += block[:test_index] + block[test_index + 1:]
    med_c, med_a = statistics.median(t_constant), statistics.median(t_auto)

    # The hook's and scheduler's own work per step, on the real objects, without the engine around them.
    sched = auto.lr_scheduler
    loss = torch.tensor(2.3)
    n = 20000
    saved_step = sched.last_step
    sched_state = sched.state_dict()
    start = time.perf_counter()
    for i in range(n):
        detached = loss.detach().float()  # hook.backward's work
        total = detached if i % 2 else detached + detached
        sched.receive_loss(total / 1)  # hook.step's work
        sched._record(total / 1)  # scheduler.step's work: record, count, set the LRs
        sched.receive_loss(None)
        sched._set_lrs()
        sched.last_step = saved_step  # stay inside one epoch: no GP test in this loop
    own_us = (time.perf_counter() - start) / n * 1e6
    sched.load_state_dict(sched_state)

    train(auto, 1)  # the first step after a restore moves the restored losses to their device, once
    counter = SyncCounter()
    run_test = sched._test

    def counted_test(*args, **kwargs):
        counter.in_test = True
        try:
            return run_test(*args, **kwargs)
        finally:
            counter.in_test = False

    sched._test = counted_test
    with counter:
        train(auto, 100)  # two GP tests
    sched._test = run_test
    test_calls = [c[1:] for c in counter.calls if c[0]]
    other = [c[1:] for c in counter.calls if not c[0]]
    print(f"cores={os.cpu_count()} torch {torch.__version__} deepspeed {deepspeed.__version__}; "
          f"test_resnet, batch {batch}, 32 px, fp32, ZeRO-1, AdamP")
    print(f"median step: constant LR {med_c * 1e3:.2f} ms, AutoWU {med_a * 1e3:.2f} ms "
          f"(difference {(med_a - med_c) / med_c * 100:+.2f}%, within run-to-run noise)")
    print(f"GP-test steps: median {statistics.median(t_auto_test) * 1e3:.2f} ms "
          f"(amortised over {steps_per_epoch} steps: {(statistics.median(t_auto_test) - med_c) / steps_per_epoch * 1e3:.3f} ms a step)")
    print(f"hook + scheduler own work: {own_us:.1f} us a step = {own_us / (med_c * 1e6) * 100:.3f}% of a step")
    print(f"host syncs from autowu over 100 steps: {len(other)} outside GP tests; "
          f"{len(test_calls)} inside the 2 GP tests: {sorted(set(test_calls))}"
          + (f"; outside: {sorted(set(other))}" if other else ""))


if __name__ == "__main__":
    main()

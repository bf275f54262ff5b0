"""AutoWU and ZeroAdamP on a CUDA device: no host synchronisation per step, and the same numbers as on paper.

Needs only torch, numpy, numba, scipy, timm and scikit-learn (the GPU image's), no DeepSpeed:

1. AutoWU's default mode drives a BatchNorm CNN (digits, AdamW) on the GPU for 30 epochs. Every step that runs
   no GP test runs under ``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation there raises. The
   GP test steps (the epoch's one read of the loss buffer) run outside it and are counted.
2. ZeroAdamP on whole parameters (channels_last convolutions) against timm's AdamP on the same GPU model,
   both stepped with the same gradients.

    python benchmarks/gpu_scheduler_check.py --json $OUT/gpu_scheduler.json
"""
import argparse
import json
import time

import torch

from autowu import AutoWU
from autowu.adamp import ZeroAdamP


def digits(device):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1).to(device)
    y = torch.tensor(data.target).to(device)
    return x[:1437], y[:1437], x[1437:], y[1437:]


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))


def autowu_without_syncs(device):
    x_train, y_train, x_test, y_test = digits(device)
    torch.manual_seed(0)
    model = cnn().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batch, epochs = 64, 30
    steps_per_epoch = len(x_train) // batch
    scheduler = AutoWU(optimizer, steps_per_epoch, epochs, immediate_cooldown=True, device=device)
    order = torch.Generator(device=device).manual_seed(0)
    checked = test_steps = 0
    started = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order, device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            runs_a_test = scheduler.tests_at(scheduler.last_step + 1)
            if not runs_a_test and device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step(loss.detach())
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            checked += not runs_a_test
            test_steps += runs_a_test
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        top1 = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {"steps_checked_without_a_host_sync": checked, "gp_test_steps": test_steps,
            "switch_step": scheduler.switch_step, "switched_by_test": not scheduler.history[-1]["at_cap"],
            "peak_lr": scheduler.peak_lr, "top1": top1, "seconds": seconds,
            "scheduler_seconds_in_tests": sum(r["seconds"] for r in scheduler.history)}


def zero_adamp_channels_last(device):
    import timm.optim
    x_train, y_train, _, _ = digits(device)
    torch.manual_seed(0)
    reference = cnn().to(device)
    ours = cnn().to(device)
    ours.load_state_dict(reference.state_dict())
    ours = ours.to(memory_format=torch.channels_last)
    opt_ref = timm.optim.AdamP(reference.parameters(), lr=0.01, weight_decay=0.1)
    opt_ours = ZeroAdamP(ours.parameters(), lr=0.01, weight_decay=0.1)
    projected = []
    for step in range(8):
        idx = torch.arange(step * 64, (step + 1) * 64, device=device)
        opt_ref.zero_grad()
        torch.nn.functional.cross_entropy(reference(x_train[idx]), y_train[idx]).backward()
        # The same gradients for both (cuDNN computes a channels_last model's in another order, TF32 included):
        # what is compared is the optimizer alone.
        for p, q in zip(reference.parameters(), ours.parameters()):
            q.grad = torch.empty_like(q).copy_(p.grad)
        opt_ref.step()
        opt_ours.step()
        projected.append(int(opt_ours.last_projected))
    errors = [((p - q).norm() / q.norm()).item() for p, q in zip(ours.parameters(), reference.parameters())]
    return {"max_relative_difference_after_8_steps": max(errors), "projected_per_step": projected}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the same code, no sync checks")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {"device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    results["autowu"] = autowu_without_syncs(device)
    results["zero_adamp_channels_last"] = zero_adamp_channels_last(device)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

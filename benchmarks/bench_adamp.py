"""What the ZeRO-aware AdamP costs a step, against timm's AdamP and plain Adam, and whether it syncs the host.

Two parts; each prints one line a measurement and, with ``--json``, writes them.

``engine`` (needs DeepSpeed; CPU here): one process (world size 1, gloo), timm's ResNet-50, fp32, ZeRO-1, a
64 px batch of 8 a rank (``--batch``, ``--image_size``: small, so that forward and backward stay short, but with
BatchNorm statistics over 32 values a channel in the last stage, so that its gradients are the orthogonal ones of a
real run and AdamP takes the channel view on every convolution, as on ImageNet; with a 32 px batch of 2, the
earlier default, BatchNorm normalises 2 values, its gradients lose that orthogonality to rounding, and in one
draw 9 of the convolutions, 14.4M of the 25.6M elements, took the layer view and its extra visit), median time of
``engine.step()`` (the ZeRO optimizer's step: gradient handling, the client optimizer, the all-gather) with

- the config's ``{"type": "AdamP"}`` (autowu's ZeroAdamP, projection on ZeRO's flat partition),
- DeepSpeed's plain Adam path, ``{"type": "AdamW", "params": {"torch_adam": true}}`` (torch's AdamW; DeepSpeed's
  fused CPU Adam would need a C++ build at run time),
- for reference, timm's AdamP stepping the unflattened model alone (no DeepSpeed: it cannot run under ZeRO).

ZeroAdamP and FusedAdam alternate in rounds of 3 steps (10 rounds by default); the ratio is taken by round, under
the same machine conditions. On several ranks it is also given less the time ZeroAdamP waits for the other ranks'
partial sums of the parameters a partition boundary cuts: that wait is the ranks' skew, which FusedAdam pays in
the all-gather after its step, outside the time measured.

``flat`` (torch only; CPU or GPU): ResNet-50's parameters flattened into one fp32 buffer as ZeRO-1 lays them out
on one rank; median ``optimizer.step()`` of ZeroAdamP on the flat buffer, timm's AdamP on the 161 separate
parameters, torch's AdamW (foreach) on the separate parameters, torch's AdamW (fused) on one flat copy (what
DeepSpeed's FusedAdam does on a partition; ZeroAdamP's ratio to it is issue 21's figure); the largest relative
difference of the parameters between ZeroAdamP and timm after 5 steps; on a GPU, ZeroAdamP's step under
``torch.cuda.set_sync_debug_mode("error")`` (raises on any host synchronisation). On a GPU ZeroAdamP runs its
Triton kernels (``autowu.adamp_triton``); its torch path and the Triton kernels with smaller tiles are timed
beside them, on copies, in the same run; each optimizer also back to back (CUDA events around ``--repeats``
steps queued without synchronising, as a training loop queues them).

    .venv/bin/python benchmarks/bench_adamp.py engine
    python benchmarks/bench_adamp.py flat --device cuda --json out.json
"""
import argparse
import json
import math
import os
import socket
import statistics
import time
from typing import Dict

import torch

from autowu.adamp import FlatLayout, ZeroAdamP

ADAMP = dict(lr=1e-3, weight_decay=0.1, delta=0.1, wd_ratio=0.1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def back_to_back(fn, repeats) -> float:
    """Milliseconds a call, from CUDA events around ``repeats`` calls queued without a synchronisation between
    them (the host's launch time counts only where it is longer than the device's)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def create(name, device):
    import timm
    torch.manual_seed(0)
    return timm.create_model(name).to(device)


def flat_part(device, repeats, model_name="resnet50", variants_too=None):
    """``variants_too``: time the device paths' variants (default: on a GPU only; on the CPU they need Triton's
    interpreter, ``TRITON_INTERPRET=1``, and a small ``model_name``: the GPU check's dry run)."""
    import timm.optim
    results = {"model": model_name}
    model = create(model_name, device)
    params = [p for p in model.parameters()]
    shapes = tuple(tuple(p.shape) for p in params)
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    zero_adamp = ZeroAdamP([flat], **ADAMP)
    zero_adamp.set_layout(flat, FlatLayout(shapes, tuple(offsets), 0, total))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    timm_adamp = timm.optim.AdamP(reference, **ADAMP)
    adamw_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(adamw_params, lr=1e-3, weight_decay=0.1, foreach=True)
    # What DeepSpeed's FusedAdam does on a ZeRO partition: one fused kernel over the one flat buffer.
    fused_flat = torch.nn.Parameter(flat.detach().clone())
    adamw_fused = torch.optim.AdamW([fused_flat], lr=1e-3, weight_decay=0.1, fused=True)

    generator = torch.Generator(device="cpu").manual_seed(0)
    # Gradients like a network behind BatchNorm: mostly orthogonal to the weights, so AdamP projects.
    grads = []
    for p in params:
        g = torch.randn(p.shape, generator=generator).to(device) * 1e-2
        if p.dim() > 1:
            w = p.detach().reshape(p.shape[0], -1)
            g2 = g.reshape(p.shape[0], -1)
            g2 -= w * (g2 * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True)
        grads.append(g)
    flat.grad = torch.cat([g.reshape(-1) for g in grads])
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    for p, g in zip(adamw_params, grads):
        p.grad = g.clone()
    fused_flat.grad = flat.grad.clone()

    # On a GPU, ZeroAdamP's other device paths on copies of the same buffer: torch operations (the path before the
    # Triton kernels, and where Triton is missing), and the Triton kernels with tiles of at most 4,096 elements
    # (rows over it, layer4's 4,608-element ones, then take the looping kernel: registers against a second read).
    variants = {}
    if device.type == "cuda" if variants_too is None else variants_too:
        from autowu.adamp_triton import TritonPlan
        for name, kernel, classes in (("zero_adamp_torch_path", "torch", None),
                                      ("zero_adamp_tiles_to_4096", "triton", (64, 256, 1024, 4096))):
            copy = torch.nn.Parameter(flat.detach().clone())
            copy.grad = flat.grad.clone()
            opt = ZeroAdamP([copy], **ADAMP)
            opt.set_layout(copy, FlatLayout(shapes, tuple(offsets), 0, total))
            segments = opt._segments_of(copy)[0]
            segments.kernel = kernel
            if classes:
                segments._triton_plan = TritonPlan(shapes, tuple(offsets), 0, total, device, tile_classes=classes)
            variants[name] = (copy, opt)
        results["zero_adamp_kernel"] = zero_adamp._segments_of(flat)[0].kernel

    for step in range(5):
        zero_adamp.step()
        timm_adamp.step()
        for _, opt in variants.values():
            opt.step()
        if step == 0:  # the gradients were made orthogonal to the initial weights: projected then
            results["parameters_projected_at_step_1"] = int(zero_adamp.last_projected)
    after = flat.detach().split([p.numel() for p in params])
    errors = [((a.view(p.shape) - p).norm() / p.norm()).item() for a, p in zip(after, reference)]
    results["max_relative_difference_vs_timm_after_5_steps"] = max(errors)
    for name, (copy, _) in variants.items():
        after = copy.detach().split([p.numel() for p in params])
        results[f"{name}_max_relative_difference_vs_timm"] = max(
            ((a.view(p.shape) - p).norm() / p.norm()).item() for a, p in zip(after, reference))
    results["parameters"] = len(params)
    results["elements"] = total

    timed_optimizers = [("zero_adamp_flat", zero_adamp), ("timm_adamp_per_parameter", timm_adamp),
                        ("torch_adamw_foreach", adamw), ("torch_adamw_fused_flat", adamw_fused)]
    timed_optimizers += [(name, opt) for name, (_, opt) in variants.items()]
    for name, opt in timed_optimizers:
        opt.step()  # warm-up
        median, low, high = timed(opt.step, device, repeats)
        results[f"{name}_ms"] = {"median": median * 1e3, "min": low * 1e3, "max": high * 1e3}
        if device.type == "cuda":   # steps queued back to back, as a training loop queues them: the device's time
            results[f"{name}_back_to_back_ms"] = back_to_back(opt.step, repeats)
    results["zero_adamp_over_fused_adamw"] = (results["zero_adamp_flat_ms"]["median"]
                                              / results["torch_adamw_fused_flat_ms"]["median"])
    for name, _ in timed_optimizers[4:]:
        results[f"{name}_over_fused_adamw"] = (results[f"{name}_ms"]["median"]
                                               / results["torch_adamw_fused_flat_ms"]["median"])
    if device.type == "cuda":
        for name, _ in [timed_optimizers[0]] + timed_optimizers[4:]:
            results[f"{name}_back_to_back_over_fused_adamw"] = (results[f"{name}_back_to_back_ms"]
                                                                / results["torch_adamw_fused_flat_back_to_back_ms"])
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                zero_adamp.step()
            results["zero_adamp_host_syncs"] = "none (set_sync_debug_mode('error') raised nothing)"
        except RuntimeError as err:
            results["zero_adamp_host_syncs"] = f"SYNC: {err}"
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.set_sync_debug_mode("error")
        try:
            timm_adamp.step()
            results["timm_adamp_host_syncs"] = "none"
        except RuntimeError as err:
            results["timm_adamp_host_syncs"] = f"syncs ({str(err)[:60]}...)"
        torch.cuda.set_sync_debug_mode("default")
        results["device_name"] = torch.cuda.get_device_name()
    return results


def adamp_views(optimizer, delta: float) -> Dict[str, Dict[str, int]]:
    """Which view timm's AdamP rule takes on each whole projected parameter of the rank's partitions, from their
    current param and grad (parameters and elements by view): what the step's cost depends on."""
    views = {v: {"parameters": 0, "elements": 0} for v in ("channel", "layer", "none")}
    for group in optimizer.param_groups:
        for p in group["params"]:
            segments, _ = optimizer._segments_of(p)
            units = segments.units
            for first, rows, n, projects in zip(units.first, units.rows, units.row_size, units.projects):
                if not projects:
                    continue
                w = p.detach()[first:first + rows * n].view(rows, n).double()
                g = p.grad[first:first + rows * n].view(rows, n).double()
                cosine = (w * g).sum(1).abs() / (w.norm(dim=1).clamp_min(1e-8) * g.norm(dim=1).clamp_min(1e-8))
                if cosine.max() < delta / math.sqrt(n):
                    view = "channel"
                else:
                    layer = (w * g).sum().abs() / (w.norm().clamp_min(1e-8) * g.norm().clamp_min(1e-8))
                    view = "layer" if layer < delta / math.sqrt(n * rows) else "none"
                views[view]["parameters"] += 1
                views[view]["elements"] += int(rows * n)
    return views


def engine_part(repeats, batch, image_size):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if "RANK" not in os.environ:  # alone; under `deepspeed --num_gpus N` the launcher sets these
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import timm.optim

    import autowu.deepspeed as autowu_ds
    from autowu.launcher.processes import remove_cpu_shm_buffers
    import atexit
    atexit.register(remove_cpu_shm_buffers, os.environ["MASTER_PORT"], os.environ.get("LOCAL_RANK", "0"))
    deepspeed.init_distributed(dist_backend="gloo")
    device = torch.device("cpu")
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 1000, (batch,))
    results = {}
    world = torch.distributed.get_world_size()
    engines = {}
    views_at = {"next": False, "views": None}
    for name, block in (("zero1_adamp", {"type": "AdamP", "params": ADAMP}),
                        ("zero1_fused_adamw", {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}),
                        ("zero1_plain_adamw", {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1,
                                                                           "torch_adam": True}})):
        config = {"train_micro_batch_size_per_gpu": batch, "train_batch_size": batch * world,
                  "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9, "optimizer": block}
        engine, *_ = autowu_ds.initialize(model=create("resnet50", device), config=config)
        # The client optimizer's step alone, as the engine calls it on this rank's ZeRO-1 partition.
        basic = engine.optimizer.optimizer
        timings = {"optimizer": [], "engine": [], "class": f"{type(basic).__module__}.{type(basic).__name__}"}

        def timed_step(*args, inner_step=basic.step, optimizer_times=timings["optimizer"], optimizer=basic,
                       **kwargs):
            if views_at["next"] and isinstance(optimizer, ZeroAdamP):
                views_at["views"], views_at["next"] = adamp_views(optimizer, ADAMP["delta"]), False
            start = time.perf_counter()
            out = inner_step(*args, **kwargs)
            optimizer_times.append(time.perf_counter() - start)
            return out
        basic.step = timed_step
        engines[name] = engine, timings

    # ZeroAdamP's own C call (the whole parameters' kernel on torch's threads), to tell the kernel from the Python
    # around it: that Python runs with the caches cold after ZeRO's passes, and costs far more than it does warm.
    import autowu.adamp_cpu as adamp_cpu
    kernel_times, run_kernel = [], adamp_cpu.run_on_torch_threads

    def timed_kernel(*args):
        start = time.perf_counter()
        run_kernel(*args)
        kernel_times.append(time.perf_counter() - start)
    adamp_cpu.run_on_torch_threads = timed_kernel
    # On several ranks ZeroAdamP waits, after its kernel, for the other ranks' partial sums of the parameters a
    # partition boundary cuts. That wait is the ranks' skew on entering the step (a rank descheduled, on this
    # 2-core machine), not ZeroAdamP's work: FusedAdam pays the same skew in the all-gather after its step, outside
    # the time measured here. So it is timed too, and the ratio is also given without it.
    import autowu.adamp as adamp_module
    wait_times, all_reduce = [], adamp_module.dist.all_reduce

    class TimedWork:
        def __init__(self, work):
            self.work = work

        def wait(self):
            start = time.perf_counter()
            self.work.wait()
            wait_times.append(time.perf_counter() - start)

    def timed_all_reduce(*args, **kwargs):
        work = all_reduce(*args, **kwargs)
        return TimedWork(work) if kwargs.get("async_op") else work
    adamp_module.dist.all_reduce = timed_all_reduce

    def steps(name, count):
        engine, timings = engines[name]
        for _ in range(count):
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            start = time.perf_counter()
            engine.step()
            timings["engine"].append(time.perf_counter() - start)

    for name in engines:  # warm-up: first steps allocate the moments
        steps(name, 2)
        for key in ("optimizer", "engine"):
            engines[name][1][key].clear()
    kernel_times.clear()
    wait_times.clear()
    # AdamP and FusedAdam in alternating rounds: the ratio is taken under the same machine conditions (this
    # machine's speed drifts by tens of percent within minutes); torch's AdamW once, it is slow.
    rounds, ratios, ratios_less_wait = max(1, repeats // 3), [], []
    for _ in range(rounds):
        before = {name: len(engines[name][1]["optimizer"]) for name in ("zero1_adamp", "zero1_fused_adamw")}
        waits_before = len(wait_times)
        for name in ("zero1_adamp", "zero1_fused_adamw"):
            steps(name, 3)
        adamp_round = engines["zero1_adamp"][1]["optimizer"][before["zero1_adamp"]:]
        fused_round = statistics.median(engines["zero1_fused_adamw"][1]["optimizer"][before["zero1_fused_adamw"]:])
        ratios.append(statistics.median(adamp_round) / fused_round)
        if len(wait_times) - waits_before == len(adamp_round):
            ratios_less_wait.append(statistics.median(
                step - wait for step, wait in zip(adamp_round, wait_times[waits_before:])) / fused_round)
    steps("zero1_plain_adamw", repeats)
    for name, (_, timings) in engines.items():
        for key in ("engine", "optimizer"):
            values = timings[key]
            results[f"{name}_{key}_step_ms"] = {"median": statistics.median(values) * 1e3,
                                                "min": min(values) * 1e3, "max": max(values) * 1e3}
        results[f"{name}_optimizer_step_ms"]["class"] = timings["class"]
    results["adamp_over_fused_adamw_optimizer_step"] = (results["zero1_adamp_optimizer_step_ms"]["median"] /
                                                        results["zero1_fused_adamw_optimizer_step_ms"]["median"])
    results["adamp_over_fused_adamw_by_round"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                  "max": max(ratios), "rounds": rounds}
    if ratios_less_wait and len(ratios_less_wait) == rounds:
        waits = wait_times[:len(engines["zero1_adamp"][1]["optimizer"])]
        results["zero1_adamp_wait_for_other_ranks_ms"] = {"median": statistics.median(waits) * 1e3,
                                                          "max": max(waits) * 1e3}
        results["adamp_less_wait_over_fused_adamw_by_round"] = {
            "median": statistics.median(ratios_less_wait), "min": min(ratios_less_wait),
            "max": max(ratios_less_wait), "rounds": rounds}
    adamp_module.dist.all_reduce = all_reduce
    adamp_steps = engines["zero1_adamp"][1]["optimizer"]
    if len(kernel_times) == len(adamp_steps):  # one kernel call a step (a rank whose partition holds whole ones)
        outside = [step - kernel for step, kernel in zip(adamp_steps, kernel_times)]
        results["zero1_adamp_kernel_ms"] = {"median": statistics.median(kernel_times) * 1e3,
                                            "min": min(kernel_times) * 1e3, "max": max(kernel_times) * 1e3}
        results["zero1_adamp_python_around_kernel_ms"] = {"median": statistics.median(outside) * 1e3,
                                                          "min": min(outside) * 1e3, "max": max(outside) * 1e3}
    adamp_cpu.run_on_torch_threads = run_kernel
    views_at["next"] = True   # one more step, whose gradients are classified (outside its timing)
    steps("zero1_adamp", 1)
    results["zero1_adamp_views_of_whole_parameters"] = views_at["views"]
    results["ranks"] = world
    results["batch_per_rank"], results["image_size"] = batch, image_size
    model = create("resnet50", device)
    opt = timm.optim.AdamP(model.parameters(), **ADAMP)
    step_times = []
    for i in range(repeats + 2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        start = time.perf_counter()
        opt.step()
        if i >= 2:
            step_times.append(time.perf_counter() - start)
    results["timm_adamp_unflattened_step_ms"] = {"median": statistics.median(step_times) * 1e3,
                                                 "min": min(step_times) * 1e3, "max": max(step_times) * 1e3}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["engine", "flat"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="engine part: images a rank")
    parser.add_argument("--image_size", type=int, default=64, help="engine part: pixels a side")
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="resnet50", help="flat part: timm's model whose parameters are laid out")
    parser.add_argument("--variants", action="store_true",
                        help="flat part: time the device paths' variants on the CPU too (with TRITON_INTERPRET=1)")
    parser.add_argument("--local_rank", type=int, default=0)  # under `deepspeed --num_gpus N` (engine part)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    if args.part == "flat":
        results = flat_part(torch.device(args.device), args.repeats, args.model, args.variants or None)
    else:
        results = engine_part(args.repeats, args.batch, args.image_size)
    results.update(torch=torch.__version__, cores=os.cpu_count(), part=args.part, device=args.device)
    if os.environ.get("RANK", "0") != "0":
        return
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

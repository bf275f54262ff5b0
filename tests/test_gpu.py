"""The GPU path, on a CUDA device (``pytest -m gpu``; skipped without one). scripts/gpu_check.sh runs these on
a GPU machine with the kit from scripts/gpu_kit.sh.

- the GPU loaders' output (device, fp16, channels_last) against the CPU path's on the same images, seed, epoch;
- a 1-GPU fp16 ZeRO-1 engine (ZeroAdamP, AutoWU from the config): where each host synchronisation of the hot loop
  comes from, outside AutoWU's GP tests: none from autowu or the loop, DeepSpeed's own counted;
- ZeroAdamP's device path: the same bits on every run, and timm's AdamP;
- the digits default end to end on one GPU, through DeepSpeed's launcher.
"""
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

from conftest import REPO, free_port

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def digits_betons(tmp_path_factory):
    from autowu.data import WriteConfig, write_betons
    from autowu.data.digits import build_digits_folder
    root = tmp_path_factory.mktemp("gpu_digits")
    folders = build_digits_folder(str(root / "folders"))
    write_betons(folders, str(root / "betons"), WriteConfig(max_resolution=64, num_workers=4), progress=False)
    return root / "betons"


def test_gpu_loaders_match_the_cpu_path(digits_betons):
    from autowu.data import TrainLoaderConfig, ValLoaderConfig, train_loader, val_loader
    beton = str(digits_betons / "train.beton")
    config = TrainLoaderConfig(resolution=32, num_workers=4, flip=True, lighting_alphastd=0.1)
    gpu = train_loader(beton, config, 64, device="cuda", seed=1, epoch=3)
    cpu = train_loader(beton, config, 64, device="cpu", seed=1, epoch=3)
    assert gpu.adds_lighting_bias and not cpu.adds_lighting_bias
    batches = 0
    for (a, la), (b, lb) in zip(gpu, cpu):
        assert a.device.type == "cuda" and a.dtype == torch.float16 and la.device.type == "cuda"
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(la.cpu(), lb)
        # fp16 (FFCV's lookup-table normalisation, then the lighting bias) against the CPU's float32 pass
        torch.testing.assert_close(a.float().cpu(), b, atol=2e-2, rtol=1e-2)
        batches += 1
    assert batches == len(cpu) > 10
    val_config = ValLoaderConfig(resolution=32, crop_ratio=1.0, batch_size=100, num_workers=4)
    for (a, la), (b, lb) in zip(val_loader(str(digits_betons / "val.beton"), val_config, device="cuda"),
                                val_loader(str(digits_betons / "val.beton"), val_config, device="cpu")):
        assert a.dtype == torch.float16 and a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a.float().cpu(), b, atol=2e-2, rtol=1e-2)
        assert torch.equal(la.cpu(), lb)


class SyncRecorder:
    """Every synchronising CUDA call (``set_sync_debug_mode("warn")``), with the innermost frame outside torch
    that made it: ``owner`` is deepspeed, autowu or other (this loop)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def _show(self, message, category, filename, lineno, file=None, line=None):
        # Only the warnings of synchronising calls: not set_sync_debug_mode's own notice that it is a prototype
        # ("... does not yet detect all synchronizing operations"), which the first GPU run counted as a sync.
        if "called a synchronizing CUDA operation" not in str(message):
            return
        for frame in reversed(traceback.extract_stack()[:-1]):  # innermost first, without this method
            path = frame.filename.replace(os.sep, "/")
            if "/torch/" in path or path.endswith("warnings.py"):
                continue
            owner = "deepspeed" if "/deepspeed/" in path else "autowu" if "/autowu/" in path else "other"
            self.calls.append((owner, f"{os.path.basename(path)}:{frame.lineno}"))
            return
        self.calls.append(("other", f"{os.path.basename(filename)}:{lineno}"))


def test_fp16_zero1_engine_with_autowu_syncs_only_in_gp_tests(tmp_path):
    import deepspeed
    import timm
    import autowu.deepspeed as autowu_ds
    from autowu.adamp import ZeroAdamP

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).cuda().to(memory_format=torch.channels_last)
    config = json.loads((REPO / "ds_configs" / "resnet50_4k.json").read_text())
    for key in ("train", "tensorboard", "csv_monitor"):
        config.pop(key)
    config.update(train_batch_size=32, train_micro_batch_size_per_gpu=32)
    steps_per_epoch, epochs = 20, 6
    engine, _, _, scheduler = autowu_ds.initialize(model=model, config=config, steps_per_epoch=steps_per_epoch,
                                                   total_epochs=epochs)
    assert engine.fp16_enabled() and isinstance(engine.optimizer.optimizer, ZeroAdamP)
    generator = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(8, 32, 3, 64, 64, device="cuda", generator=generator).half()
    labels = torch.randint(0, 10, (8, 32), device="cuda", generator=generator)
    criterion = torch.nn.CrossEntropyLoss()
    outside_tests, in_tests, checked = [], 0, 0
    for step in range(steps_per_epoch * epochs):
        runs_a_test = scheduler.tests_at(scheduler.last_step + 1)
        x = images[step % 8].contiguous(memory_format=torch.channels_last)
        with SyncRecorder() as recorder:
            loss = criterion(engine(x).float(), labels[step % 8])
            engine.backward(loss)
            engine.step()
        if runs_a_test:
            in_tests += 1
        else:
            checked += 1
            outside_tests += recorder.calls
    torch.cuda.synchronize()
    ours = [c for c in outside_tests if c[0] != "deepspeed"]
    deepspeed_sites = sorted({site for owner, site in outside_tests if owner == "deepspeed"})
    report = {"steps_checked": checked, "gp_test_steps": in_tests, "syncs_outside_deepspeed": ours,
              "deepspeed_syncs_per_step": sum(owner == "deepspeed" for owner, _ in outside_tests) / checked,
              "deepspeed_sync_sites": deepspeed_sites, "switch_step": scheduler.switch_step}
    out = os.environ.get("AUTOWU_GPU_CHECK_OUT")
    if out:
        with open(os.path.join(out, "engine_syncs.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    assert checked > 80 and in_tests >= 1
    assert ours == [], f"host syncs outside DeepSpeed and the GP tests: {ours[:10]}"


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_zero_adamp_on_the_gpu_gives_the_same_bits_every_run(kernel):
    """ResNet-50's parameters as ZeRO-1 lays them out on one rank (a flat fp32 buffer with padding), ZeroAdamP's
    device paths (Triton's kernels, the default; torch operations, where Triton is missing): no atomics in the
    channel sums, so two runs from the same state give the same bits (with ``index_add_`` they differed in the
    last bits); and each stays timm's AdamP. Random gradients: most rows step ahead in the channel view and are
    taken back, some parameters are projected."""
    import timm
    import timm.optim
    from autowu.adamp import FlatLayout, ZeroAdamP

    torch.manual_seed(0)
    params = [p.detach().cuda() for p in timm.create_model("resnet50").parameters()]
    offsets, end = [], 0
    for p in params:
        offsets.append(end)
        end += p.numel() + 16
    layout = FlatLayout(tuple(tuple(p.shape) for p in params), tuple(offsets), 0, end)
    grads = [torch.randn(end, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) * 1e-3
             for s in range(3)]

    def run():
        flat = torch.nn.Parameter(torch.zeros(end, device="cuda"))
        for p, offset in zip(params, offsets):
            flat.data[offset:offset + p.numel()] = p.reshape(-1)
        opt = ZeroAdamP([flat], lr=1e-3, weight_decay=0.1)
        opt.set_layout(flat, layout)
        segments = opt._segments_of(flat)[0]
        assert segments.kernel == "triton"   # a GPU's default
        segments.kernel = kernel
        for grad in grads:
            flat.grad = grad.clone()
            opt.step()
        torch.cuda.synchronize()
        return flat.detach().clone(), int(opt.last_projected)

    first, projected = run()
    second, _ = run()
    assert torch.equal(first, second) and projected > 0
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    timm_adamp = timm.optim.AdamP(reference, lr=1e-3, weight_decay=0.1)
    for grad in grads:
        for p, offset in zip(reference, offsets):
            p.grad = grad[offset:offset + p.numel()].view(p.shape).clone()
        timm_adamp.step()
    worst = max(((first[o:o + p.numel()].view(p.shape) - p).norm() / p.norm()).item()
                for p, o in zip(reference, offsets))
    assert worst < 1e-5, worst


def test_digits_default_end_to_end_on_one_gpu(tmp_path):
    runner = shutil.which("deepspeed")
    command = [runner] if runner else [sys.executable, "-m", "deepspeed.launcher.runner"]
    run_dir = tmp_path / "run"
    proc = subprocess.run(command + ["--num_gpus", "1", "--master_port", str(free_port()),
                                     str(REPO / "launch" / "train.py"), "--deepspeed_config",
                                     str(REPO / "ds_configs" / "cpu_digits.json"), "--out_dir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=420,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    final = records[-1]
    resolved = json.loads((run_dir / "run_config.json").read_text())
    assert resolved["recipe"]["device"] == "cuda"
    assert final["kind"] == "final" and final["switch_step"] is not None and final["top1"] > 0.9
    tests = [r for r in records if r["kind"] == "autowu_test"]
    assert tests[-1]["switched"] and not tests[-1]["at_cap"]
    out = os.environ.get("AUTOWU_GPU_CHECK_OUT")
    if out:
        with open(os.path.join(out, "digits_gpu.json"), "w") as f:
            json.dump({"final": final, "seconds": sum(r.get("seconds", 0) for r in records if r["kind"] == "val"),
                       "recipe": resolved["recipe"]}, f, indent=1)

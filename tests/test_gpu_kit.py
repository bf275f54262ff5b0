"""The GPU check kit, built and dry-run here, so that a broken kit is found on the CPU, not in GPU time.

scripts/gpu_kit.sh builds what the GPU machine's image lacks (deepspeed and its missing requirements for
Python 3.12, FFCV for the limited C API with its native libraries bundled); scripts/gpu_check.sh --dry-run
installs it as that image's Python 3.12 would (tags checked), loads FFCV from it with this machine's OpenCV,
libjpeg-turbo, X11/GL and LAPACK hidden (as root), collects the GPU tests and runs the throughput script on the
CPU with a tiny model.
"""
import json
import os
import subprocess
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # builds the kit


def test_the_kit_builds_under_48_mib_and_its_dry_run_passes(tmp_path):
    kit = tmp_path / "kit"
    build = subprocess.run(["bash", str(REPO / "scripts" / "gpu_kit.sh"), str(kit)], cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    manifest = json.loads((kit / "kit.json").read_text())
    assert manifest["bytes"] <= 48 * 2**20
    wheels = " ".join(manifest["wheels"])
    for expected in ("deepspeed-0.19.8-py3-none-any", "ffcv-1.0.2-cp38-abi3-manylinux_", "pydantic_core-",
                     "cp312-cp312-manylinux", "pytorch_pfn_extras-", "hjson-"):
        assert expected in wheels, (expected, wheels)
    ffcv_wheel = kit / "wheels" / manifest["ffcv"]["wheel"]
    names = zipfile.ZipFile(ffcv_wheel).namelist()
    assert "ffcv/_libffcv.abi3.so" in names
    for bundled in ("libopencv_core.so.406", "libopencv_imgproc.so.406", "libturbojpeg.so.0", "libX11.so.6"):
        assert f"ffcv.libs/{bundled}" in names
    assert any(n.startswith("ffcv.libs/_fast_resize") for n in names)

    out = tmp_path / "out"
    check = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, AUTOWU_GPU_KIT=str(kit)))
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert check.returncode == 0, check.stdout[-2000:] + log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [s["step"] for s in summary["steps"]] == [
        "kit_for_python_3.12", "kit_install", "environment", "pytest_gpu", "throughput", "adamp_flat"]
    env = summary["env"]
    assert "/site/ffcv/" in env["ffcv_from"] and env["fast_resize"] and env["bundled_opencv_resized"]
    if os.geteuid() == 0:
        assert "hiding this machine's" in log and "libopencv_core.so.406" in log
    assert "5 tests collected" in log
    throughput = summary["throughput"]
    for figure in ("loader", "train", "model_only", "torchvision"):
        assert throughput[figure]["images_per_s"] > 0
    assert set(throughput["ratios"]) == {"train_over_model_only", "loader_over_train",
                                         "ffcv_loader_over_torchvision", "train_over_torchvision_loader"}
    assert throughput["channels_last"]["after_deepspeed_initialize"]["channels_last"] == 0  # ZeRO's NCHW views
    # ZeroAdamP's time inside the engine's steps (timed around the client optimizer's step), and alone
    share = throughput["zero_adamp_share"]
    assert share["steps"] > 0 and 0 < share["share_of_step"] < 1 and share["median_ms"] > 0
    adamp = summary["adamp_flat"]
    assert adamp["zero_adamp_over_fused_adamw"] > 0 and adamp["max_relative_difference_vs_timm_after_5_steps"] < 1e-5

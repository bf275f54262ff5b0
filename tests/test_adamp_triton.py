"""ZeroAdamP's Triton path, the one a GPU takes (``autowu.adamp_triton``), tested without a GPU:

- against timm's AdamP under Triton's interpreter (``tests/interpreted/triton_adamp_cases.py``, in a process of
  its own: ``TRITON_INTERPRET`` must be set before Triton is imported);
- every kernel variant it launches compiled for Hopper (sm_90, an H100 or H200) down to machine code, by the
  compiler and ``ptxas`` that come with Triton: what the interpreter accepts, the compiler may not.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_deepspeed

CASES = REPO / "tests" / "interpreted" / "triton_adamp_cases.py"


@pytest.mark.slow   # 30 s: the interpreter runs each program in Python
def test_the_triton_path_equals_timms_adamp_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b(\d+) passed", summary) and int(re.search(r"(\d+) passed", summary).group(1)) >= 30, summary
    assert "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.slow
def test_zero_partitions_on_the_triton_kernels_step_like_timms_adamp(tmp_path):
    """A real ZeRO-1 engine on 2 CPU ranks whose partition boundary cuts a convolution, their partitions
    stepped by the Triton kernels (interpreted), the cut rows' sums completed by the real all-reduce: timm's AdamP
    on the whole model, and a run resumed from its checkpoint equal to the unbroken one, bit for bit."""
    script = REPO / "tests" / "ds_scripts" / "zero_adamp.py"
    proc = run_deepspeed([script, "--out", tmp_path, "--stages", "1", "--kernel", "triton"], num_ranks=2,
                         env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    runs = [result["stages"]["1"] for result in results]
    assert all(run["straddling"] >= 1 for run in runs)
    assert sum(run["projected"] for run in runs) >= 2   # both convolutions, counted once over the ranks
    for run in runs:
        assert max(run["full_vs_reference"]) < 1e-6, run["full_vs_reference"]
        assert max(run["resumed_vs_full"]) == 0.0


def test_a_gpu_takes_the_triton_kernels_unless_told_otherwise(monkeypatch):
    from autowu.adamp import KERNEL_ENV, device_kernel
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert device_kernel() == "triton"   # Triton comes with torch's CUDA wheels, installed here too
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert device_kernel() == "torch"
    monkeypatch.setenv(KERNEL_ENV, "trition")
    with pytest.raises(ValueError, match="'triton', 'torch' or unset"):
        device_kernel()
    monkeypatch.setenv(KERNEL_ENV, "triton")
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)   # a torch without Triton
    with pytest.raises(RuntimeError, match="Triton cannot be imported"):
        device_kernel()
    monkeypatch.delenv(KERNEL_ENV)
    assert device_kernel() == "torch"


def _signature(kernel):
    """Argument types by name, as ``TritonPlan`` passes them."""
    int32 = {"tiles", "tile_length", "tile_kind", "tile_row", "tile_segment", "stepped", "long_segments", "long_whole",
             "segment_length", "segment_row", "param_row0", "param_rows", "views", "projected"}
    int64 = {"tile_first", "segment_first"}
    scalars_int = {"sums_stride"}
    floats_ptr = {"param", "grad", "exp_avg", "exp_avg_sq", "row_bound", "sums", "ahead_coefficient",
                  "param_channel_bound", "param_layer_bound", "coefficient"}
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name in int32:
            signature[name] = "*i32"
        elif name in int64:
            signature[name] = "*i64"
        elif name in floats_ptr:
            signature[name] = "*fp32"
        elif name in scalars_int:
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    return signature


def test_every_kernel_variant_compiles_for_hopper():
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autowu import adamp_triton as at
    variants = [(at._rows_kernel, {"ALIGNED": aligned, "BLOCK": block}, at._warps(block))
                for block in at.TILE_CLASSES for aligned in (True, False)]
    variants += [(at._decide_kernel, {"BLOCK": at.DECIDE_BLOCK}, 4)]
    variants += [(kernel, {"NESTEROV": nesterov, "BLOCK": at.FINISH_BLOCK}, 4)
                 for kernel in (at._long_rows_kernel, at._finish_kernel) for nesterov in (False, True)]
    for kernel, constexprs, warps in variants:
        names = kernel.arg_names
        source = ASTSource(fn=kernel, signature=_signature(kernel),
                           constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert len(compiled.asm["cubin"]) > 1000, (kernel.fn.__name__, constexprs)
        assert ".target sm_90" in compiled.asm["ptx"]
    # Told that a tile starts and ends on 4-element boundaries of a 16-byte aligned tensor, as torch allocates
    # them, the rows kernel loads and stores 4 floats at a time (16-byte vectors); not told, one at a time.
    for aligned in (True, False):
        names = at._rows_kernel.arg_names
        source = ASTSource(fn=at._rows_kernel, signature=_signature(at._rows_kernel),
                           constexprs={(names.index("ALIGNED"),): aligned, (names.index("BLOCK"),): 1024},
                           attrs={(names.index(name),): [["tt.divisibility", 16]]
                                  for name in ("param", "grad", "exp_avg", "exp_avg_sq")})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        assert (ptx.count("ld.global.v4") >= 4 and ptx.count("st.global.v4") >= 2) == aligned

"""The stack installs and works together: autowu, DeepSpeed, FFCV, timm, gpytorch, numba on this CPU."""
import subprocess
import sys

from conftest import REPO, free_port


def test_the_stack_imports_and_builds_the_papers_models():
    import deepspeed  # noqa: F401
    import ffcv.loader  # noqa: F401
    import gpytorch  # noqa: F401
    import numba
    import timm
    import torch

    import autowu

    assert hasattr(autowu, "AutoWU")
    resnet = timm.create_model("resnet50")
    effnet = timm.create_model("efficientnet_b0")
    assert sum(p.numel() for p in resnet.parameters()) == 25_557_032
    assert sum(p.numel() for p in effnet.parameters()) == 5_288_548
    with torch.no_grad():
        assert effnet(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert numba.njit(lambda x: x + 1)(1) == 2


def test_a_deepspeed_engine_trains_on_cpu():
    script = r"""
import deepspeed, torch, timm
deepspeed.init_distributed(dist_backend="gloo")
model = timm.create_model("test_resnet", num_classes=10)
config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
          "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
losses = []
for _ in range(5):
    loss = torch.nn.functional.cross_entropy(engine(x), y)
    engine.backward(loss); engine.step(); losses.append(loss.item())
assert losses[-1] < losses[0], losses
print("ENGINE_OK", engine.global_steps)
"""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    import os
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)
    assert "ENGINE_OK 5" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

"""scripts/setup.sh installs a stack that works together: autowu, DeepSpeed, FFCV, timm, gpytorch, numba."""


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

"""SyncBN the way the paper's EfficientNet needs it: timm's conversion keeps BatchNormAct2d's activation; torch's
loses it. (Averaging the running statistics over ranks is tested on real engines in test_adamp.py.)"""
import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct

from autowu.batchnorm import check_norm_act, convert_sync_batchnorm
from autowu.launcher.run_config import RunSettings
from autowu.launcher.training import build_model


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def test_timms_conversion_keeps_efficientnets_activations_and_torchs_does_not():
    model = timm.create_model("efficientnet_b0", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    norm_acts = count(model, BatchNormAct2d)
    # EfficientNet-B0 keeps its SiLUs inside BatchNormAct2d: 33 of its 49 (the other 16 have no activation).
    assert norm_acts == 49
    assert sum(not isinstance(m.act, torch.nn.Identity) for m in model.modules() if type(m) is BatchNormAct2d) == 33

    converted = convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert count(converted, SyncBatchNormAct) == norm_acts and count(converted, BatchNormAct2d) == 0
    with torch.no_grad():  # eval mode: no collective, the same function as before the conversion
        torch.testing.assert_close(converted(x), expected)

    # torch's converter: plain SyncBatchNorm layers that carry an `act` child their forward never calls.
    torch_converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert count(torch_converted, torch.nn.SyncBatchNorm) == norm_acts
    with torch.no_grad():
        assert (torch_converted(x) - expected).abs().max() > 1e-2
    with pytest.raises(ValueError, match="33 SyncBatchNorm layers hold an activation their forward never calls"):
        check_norm_act(torch_converted)


def test_the_launcher_converts_with_timm_and_refuses_sync_bn_on_cpu():
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only"):
        build_model(RunSettings(model="test_efficientnet", sync_bn=True), 7, torch.device("cpu"), True)
    # One rank: nothing to synchronise, the model is built as it is.
    model = build_model(RunSettings(model="test_efficientnet", sync_bn=True), 7, torch.device("cpu"),
                                     False)
    assert count(model, torch.nn.SyncBatchNorm) == 0

"""AutoWU as a DeepSpeed LR scheduler and autowu's AdamP as a DeepSpeed optimizer, chosen from the JSON config.

``import autowu.deepspeed`` registers both (``seam.py``): from then on DeepSpeed's own ``deepspeed.initialize``,
and every program that calls it for you (Accelerate, Hugging Face's Trainer), builds them from the config::

    import autowu.deepspeed  # noqa: F401  (registers "AutoWU" and "AdamP")
    # "scheduler": {"type": "AutoWU", "params": {"steps_per_epoch": 1251, "total_epochs": 90}}
    # "optimizer": {"type": "AdamP", "params": {"lr": 1.0, "weight_decay": 0.1}}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config="ds_configs/resnet50_4k.json")
    for images, labels in loader:
        loss = criterion(engine(images), labels)
        engine.backward(loss)
        engine.step()

``initialize`` here is the same with ``steps_per_epoch``/``total_epochs``/``seed`` as arguments, or a config
``autowu.ds_config.resolve`` resolved already (what the launcher passes). ``attach(engine)`` installs the loss
hook on an engine built another way (``hook.py``). The config side lives in ``autowu.ds_config``, outside this
package, so that reading a config registers nothing.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from ..ds_config import ResolvedConfig, refuse_client_objects, resolve
from ..errors import ConfigError
from .hook import AutoWULossHook, attach, declare_zero_partitions
from .seam import install as _install_seam

__all__ = ["initialize", "attach", "declare_zero_partitions", "AutoWULossHook"]


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None,
               steps_per_epoch: Optional[int] = None, total_epochs: Optional[int] = None,
               seed: Optional[int] = None, **kwargs):
    """``deepspeed.initialize`` with AutoWU's step counts (and seed) as arguments.

    ``config``: a dict, a JSON path, ``args.deepspeed_config``, or a ``ResolvedConfig`` (then the counts are
    its own). Unknown top-level keys are refused for any config, and channels_last parameters are handled
    (see ``_contiguous_parameters``). Returns DeepSpeed's ``(engine, optimizer, training_dataloader,
    lr_scheduler)``; with AutoWU, ``engine.autowu_hook`` holds the loss hook.
    """
    import deepspeed

    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})
    if config is None:
        raise ConfigError("autowu.deepspeed.initialize needs a config (a dict, a JSON path or a ResolvedConfig)")
    if isinstance(config, ResolvedConfig):
        if (steps_per_epoch, total_epochs, seed) != (None, None, None):
            raise TypeError("autowu.deepspeed.initialize: a ResolvedConfig carries its own step counts and seed")
        resolved = config
    else:
        resolved = resolve(config, steps_per_epoch=steps_per_epoch, total_epochs=total_epochs, seed=seed)
    refuse_client_objects(resolved, optimizer, kwargs.get("lr_scheduler"))  # the seam sees only autowu's configs
    if resolved.adamp is not None and model is None and model_parameters is None:
        raise ConfigError("optimizer AdamP needs the model or model_parameters")
    channels_last = _contiguous_parameters(model)
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, config=resolved.deepspeed,
        **kwargs)
    if resolved.zero_stage == 0:
        # Without ZeRO the engine keeps the module's parameters: their layout can come back. ZeRO-1/2 rebind
        # them to NCHW views of the flat buffer after every step; the activations stay channels_last (cuDNN
        # follows the input) and each convolution re-lays out its weights (benchmarks/gpu_throughput.py
        # measures what that costs).
        for p in channels_last:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return engine, engine_optimizer, loader, scheduler


def _contiguous_parameters(model) -> list:
    """Gives every parameter the standard strides; returns the 4-D ones that were channels_last.

    DeepSpeed 0.19.8 broadcasts each parameter at initialize as ``p.data.view(torch.uint8)``, which needs a last
    stride of 1: a channels_last convolution weight (``model.to(memory_format=torch.channels_last)``, as
    ffcv-imagenet does) raises "self.stride(-1) must be 1 to view Float as Byte" there, 1x1 kernels included
    (``is_contiguous()`` is true for them, the last stride is not 1).
    """
    channels_last = []
    for p in model.parameters() if model is not None else ():
        standard = torch.empty(p.shape, device="meta").stride()
        if p.data.stride() != standard:
            if p.dim() == 4 and p.data.is_contiguous(memory_format=torch.channels_last):
                channels_last.append(p)
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return channels_last


# The registration: from here on DeepSpeed's own initialize builds AutoWU and AdamP from a config (an import
# with a side effect, chosen over an explicit call because the engine is often built inside a framework the
# user does not call directly: one import line is all such a program can add; a moved seam fails right here).
_install_seam()

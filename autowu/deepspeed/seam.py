"""Where autowu meets DeepSpeed's engine construction: one wrapper around ``DeepSpeedEngine.__init__``.

DeepSpeed has no registry for LR schedulers or optimizers (its issue 3492): a name it does not know in the
config's ``"scheduler"`` block stops ``deepspeed.initialize`` ("DeepSpeed does not recognize LR scheduler
AutoWU"), an unknown ``"optimizer"`` type likewise ("AdamP is not a supported DeepSpeed Optimizer"). The
narrowest seam is the engine's constructor: every way of building an engine goes through it
(``deepspeed.initialize``; Accelerate and Hugging Face's Trainer through that; the pipeline and hybrid engines
as subclasses), and it already takes what AutoWU and AdamP need, a client optimizer and a client scheduler
callable. DeepSpeed's scheduler lookup by name (``deepspeed.runtime.lr_schedules``) would be narrower still,
but it builds the scheduler on the ZeRO wrapper with no engine in reach, so the loss hook could not be installed,
and an optimizer name is looked up in ``torch.optim`` itself.

Before the constructor runs, a config that names AutoWU or AdamP is resolved (``autowu.ds_config.resolve``;
a config that ``autowu.deepspeed.initialize`` or the launcher resolved already is recognised and not checked
again) and the two blocks become those client arguments; after it, ZeRO's flat partitions are declared to AdamP
and AutoWU's loss hook is installed (``attach``). A config that names neither passes through untouched.

What the seam relies on is checked when it is installed, at ``import autowu.deepspeed``: a DeepSpeed release
that moved it fails there, naming what moved, never silently at run time.
"""
from __future__ import annotations

import functools
import inspect
from typing import List

from ..adamp import ZeroAdamP
from ..ds_config import ResolvedConfig, refuse_client_objects, resolve, selects_adamp, selects_autowu
from ..scheduler import AutoWU
from .hook import attach, declare_zero_partitions, refuse_pipeline


# Arguments of DeepSpeedEngine.__init__ the seam reads or fills in.
INIT_ARGUMENTS = ("model", "optimizer", "model_parameters", "lr_scheduler", "config_class")
# DeepSpeedConfig attributes the seam reads (the raw dict) or sets (the optimizer block, once it is a client
# optimizer, and the flag DeepSpeed asks of any client optimizer under ZeRO).
CONFIG_ATTRIBUTES = ("_param_dict", "optimizer_name", "optimizer_params", "zero_allow_untested_optimizer")
# Source lines the seam's behaviour depends on, by the function that must contain them.
SOURCE_FACTS = (
    ("deepspeed.initialize", "config_class=config_class",
     "the engine is given the parsed config (the seam reads and amends it)"),
    ("DeepSpeedEngine._configure_lr_scheduler", "self.client_lr_scheduler(self.basic_optimizer)",
     "a client scheduler callable is called with the basic optimizer (AutoWU's)"),
)
_INSTALLED = "_autowu_seam"


def seam_problems() -> List[str]:
    """What no longer holds of the seam in the installed DeepSpeed (empty when all is as autowu expects)."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    problems = []
    init = getattr(DeepSpeedEngine.__init__, "__wrapped__", DeepSpeedEngine.__init__)
    missing = [name for name in INIT_ARGUMENTS if name not in inspect.signature(init).parameters]
    if missing:
        problems.append(f"DeepSpeedEngine.__init__ no longer takes {missing}")
    config_source = _source(DeepSpeedConfig, problems)
    for attribute in CONFIG_ATTRIBUTES:
        if config_source is not None and f"self.{attribute} =" not in config_source:
            problems.append(f"DeepSpeedConfig no longer sets {attribute}")
    functions = {"deepspeed.initialize": deepspeed.initialize,
                 "DeepSpeedEngine._configure_lr_scheduler": getattr(DeepSpeedEngine, "_configure_lr_scheduler", None)}
    for name, line, meaning in SOURCE_FACTS:
        source = _source(functions[name], problems, name)
        if source is not None and line not in source:
            problems.append(f"{name} no longer has `{line}` ({meaning})")
    return problems


def _source(obj, problems, name=None):
    try:
        return inspect.getsource(getattr(obj, "__wrapped__", obj))
    except (OSError, TypeError):
        problems.append(f"cannot read the source of {name or getattr(obj, '__name__', obj)}")
        return None


def install() -> None:
    """Wrap ``DeepSpeedEngine.__init__`` (once); raise ImportError if the seam moved."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    problems = seam_problems()
    if problems:
        raise ImportError(f"autowu.deepspeed cannot register AutoWU and AdamP with DeepSpeed {deepspeed.__version__}: "
                          + "; ".join(problems) + ". autowu is tested with DeepSpeed 0.19 (setup.py's range); "
                          "install that, or adapt autowu/deepspeed/seam.py")
    if getattr(DeepSpeedEngine.__init__, _INSTALLED, False):
        return
    original = DeepSpeedEngine.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        _before_init(bound.arguments)
        original(*bound.args, **bound.kwargs)
        _after_init(self)

    setattr(__init__, _INSTALLED, True)
    DeepSpeedEngine.__init__ = __init__


def _before_init(arguments) -> None:
    """A config naming AutoWU or AdamP: resolved (once), and its blocks turned into the client optimizer and
    scheduler callable (``arguments`` is the constructor's bound arguments, amended in place)."""
    config = arguments.get("config_class")
    if config is None:  # an engine built by hand from a dict: DeepSpeed's own refusal stands
        return
    raw = config._param_dict
    resolved = ResolvedConfig.of(raw)
    if resolved is None:
        if not (selects_autowu(raw) or selects_adamp(raw) or isinstance(arguments.get("lr_scheduler"), AutoWU)):
            return  # not autowu's business
        resolved = resolve(raw)
    refuse_client_objects(resolved, arguments.get("optimizer"), arguments.get("lr_scheduler"))
    if resolved.autowu is not None or isinstance(arguments.get("lr_scheduler"), AutoWU):
        refuse_pipeline(arguments.get("model"))
    if resolved.autowu is not None:
        # called with the basic optimizer
        arguments["lr_scheduler"] = functools.partial(AutoWU, **resolved.autowu_arguments())
    if resolved.adamp is not None:
        parameters = arguments.get("model_parameters")
        if parameters is None:
            parameters = arguments["model"].parameters()
        arguments["optimizer"] = ZeroAdamP(parameters, **resolved.adamp)
        arguments["model_parameters"] = None
        # Now a client optimizer: DeepSpeed must not build one from the block too, and asks this flag of any
        # client optimizer under ZeRO (this one is mapped onto ZeRO's partitions, and tested).
        config.optimizer_name = config.optimizer_params = None
        config.zero_allow_untested_optimizer = True


def _after_init(engine) -> None:
    if isinstance(getattr(engine, "lr_scheduler", None), AutoWU):
        attach(engine)  # the hook, the fp16 scaler, and AdamP's partitions
    elif isinstance(getattr(engine, "basic_optimizer", None), ZeroAdamP):
        declare_zero_partitions(engine, engine.basic_optimizer)

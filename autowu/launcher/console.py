"""The launcher's console: rank 0's lines a person reads, without the noise a user cannot act on.

Only the launcher's entry points call ``quiet_third_party`` (``launch/train.py``, ``python -m autowu.launcher``;
never the library on import), before DeepSpeed is imported, and ``--verbose`` skips it: DeepSpeed's own logs are
one flag away. What it silences, by category and message:

- torch's ``FutureWarning`` for ``all_gather_into_tensor`` (DeepSpeed's ZeRO calls it, once per rank per epoch)
  and for ``torch.jit.script`` (a dependency's import);
- DeepSpeed's "Setting accelerator to CPU" (the accelerator is named through ``DS_ACCELERATOR`` instead, unless
  set), its "ZeRO with an untested optimizer" (autowu maps ZeroAdamP to ZeRO's partitions itself), and the
  "built successfully" and CUDA_HOME lines of the CPU communication op it compiles at start-up.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

QUIET_WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
                  (FutureWarning, r"`torch\.jit\.script` is deprecated"))
QUIET_DEEPSPEED_MESSAGES = ("You are using ZeRO with an untested optimizer",)


class _DropMessages(logging.Filter):
    def __init__(self, messages):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(m in text for m in self.messages)


def quiet_third_party(argv=None) -> None:
    """Call before importing deepspeed; does nothing when ``argv`` (``sys.argv``) has ``--verbose``."""
    if "--verbose" in (sys.argv if argv is None else argv):
        return
    import torch
    cuda_available = torch.cuda.is_available()
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda_available else "cpu")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_DropMessages(QUIET_DEEPSPEED_MESSAGES))


@contextlib.contextmanager
def captured_stdout(enabled: bool):
    """Holds back what DeepSpeed prints (op builds) while it starts; shows it if starting fails."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stdout.write(buffer.getvalue())
        raise

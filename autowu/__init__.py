"""autowu: the AutoWU automated learning-rate scheduler for large-batch training (Kim et al., 2021)."""
from .gp import GPTestResult, GPTestSettings, PastMinimumTest
from .schedule import Schedule
from .scheduler import AutoWU

__all__ = ["AutoWU", "GPTestSettings", "GPTestResult", "PastMinimumTest", "Schedule"]
__version__ = "0.1.0"

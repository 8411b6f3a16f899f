"""diloco: low-communication two-loop training (DiLoCo, SNOO, EMA-Nesterov) for PyTorch."""

from diloco.algorithm.outer import EMANesterov, Nesterov, OuterOptimizer
from diloco.algorithm.streaming import StreamingDiLoCo
from diloco.algorithm.wrapper import DiLoCo, NonFiniteError, SyncReport

__all__ = [
    "DiLoCo",
    "StreamingDiLoCo",
    "SyncReport",
    "NonFiniteError",
    "OuterOptimizer",
    "Nesterov",
    "EMANesterov",
]
__version__ = "0.1.0"

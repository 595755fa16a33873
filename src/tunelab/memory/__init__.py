"""Memory: predict a run's peak from its config, check it against the device, pick a batch size.

Pure Python (no torch or mlx import), so `tunelab estimate` is quick and the
estimator can be used from benchmarks on any machine.
"""

from tunelab.memory.estimate import Estimate, Line, estimate
from tunelab.memory.shapes import ModelShape, read_shape
from tunelab.memory.workload import Workload

__all__ = ["Estimate", "Line", "ModelShape", "Workload", "estimate", "read_shape"]

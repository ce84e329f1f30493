"""Training-memory accounting: estimate from the model, measure a run."""

from tfcompress.memory.estimate import MemoryComparison, MemoryEstimate, compare, estimate
from tfcompress.memory.measure import MemoryMeasurement, measure

__all__ = ["MemoryComparison", "MemoryEstimate", "MemoryMeasurement", "compare", "estimate",
           "measure"]

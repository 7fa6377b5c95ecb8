"""Measuring: interleaved timing and peak tensor memory (pure PyTorch)."""
from .memory import PeakMemory
from .timing import interleaved_times, median_ms

__all__ = ['PeakMemory', 'interleaved_times', 'median_ms']

from .benchmark import measure_ffn_pair
from .timing import interleaved_times, median_ms

__all__ = ['interleaved_times', 'measure_ffn_pair', 'median_ms']

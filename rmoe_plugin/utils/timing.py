"""Interleaved wall-clock timing, so that compared candidates share the machine's state."""
import statistics
import time
from typing import Callable, Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved_times(candidates: Dict[str, Callable[[], object]], repeats: int = 20,
                      warmup: int = 3, device: torch.device = torch.device('cpu')
                      ) -> Dict[str, List[float]]:
    """Run each candidate once per round, ``warmup + repeats`` rounds; keep the timed rounds.

    Interleaving (A, B, A, B, ...) rather than (A, A, ..., B, B, ...) spreads drifts of clock
    speed and cache state over every candidate alike.
    """
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: List[float]) -> float:
    return 1000.0 * statistics.median(samples)

"""What a training stage cost: wall time, processor time and training FLOPs."""
import json
import os
import time
from typing import Optional

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..fileio import atomic_write

# A backward pass costs about twice its forward (two matmuls per forward matmul).
TRAIN_FLOPS_PER_FORWARD_FLOP = 3


def forward_flops(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one ``forward(inputs, mode='tensor')``, as mmengine's analyser counts them.

    The MoE layers are traced as they run, so their count is the experts' actual work.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analyzer = FlopAnalyzer(model, inputs)
            analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analyzer.total())
    finally:
        model.train(was_training)


class _Clock:
    """Wall and processor time with pauses (validation and the FLOP count are not training)."""

    def __init__(self, wall: float = 0.0, process: float = 0.0):
        self.wall, self.process = wall, process
        self._start = None

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._start is not None:
            self.wall += time.perf_counter() - self._start[0]
            self.process += time.process_time() - self._start[1]
            self._start = None


@HOOKS.register_module()
class CostHook(Hook):
    """Records a training stage's cost in ``<work_dir>/cost.json``.

    Wall time and processor time (all threads of this process) cover the training loop,
    data loading included and validation excluded. Training FLOPs are the forward FLOPs of
    the first batch, counted once, times 3 (forward + backward) times the iterations run. A
    resumed stage adds to the record of its earlier part.
    """
    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self._clock = _Clock()
        self._flops_per_iter: Optional[int] = None
        self._iters = 0

    def _path(self, runner) -> str:
        return os.path.join(runner.work_dir, 'cost.json')

    def before_train(self, runner) -> None:
        path = self._path(runner)
        if runner.iter > 0 and os.path.exists(path):  # resumed: keep counting
            with open(path) as f:
                done = json.load(f)
            self._clock = _Clock(done['wall_s'], done['process_s'])
            self._iters, self._flops_per_iter = done['iters'], done['flops_per_iter']
        self._clock.start()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._flops_per_iter is None and data_batch is not None:
            self._clock.stop()
            model = runner.model.module if hasattr(runner.model, 'module') else runner.model
            inputs = model.data_preprocessor(data_batch, True)['inputs']
            self._flops_per_iter = TRAIN_FLOPS_PER_FORWARD_FLOP * forward_flops(model, inputs)
            self._clock.start()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._iters += 1

    def before_val(self, runner) -> None:
        self._clock.stop()

    def after_val(self, runner) -> None:
        if runner.train_loop is not None and runner.iter < runner.max_iters:
            self._clock.start()

    def after_train(self, runner) -> None:
        self._clock.stop()
        record = dict(wall_s=round(self._clock.wall, 3), process_s=round(self._clock.process, 3),
                      iters=self._iters, flops_per_iter=self._flops_per_iter,
                      train_flops=(self._flops_per_iter or 0) * self._iters)
        if runner.rank == 0:
            with atomic_write(self._path(runner)) as f:
                json.dump(record, f, indent=2)

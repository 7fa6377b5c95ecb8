"""A segmentor's training step and inference, from its config (tools/benchmark_backbone.py)."""
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch._dynamo.utils import counters
from mmengine.config import Config
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData

from .memory import PeakMemory, optimizer_state_tensors, tensor_bytes


def build_segmentor(config: str, crop_size: int = 512, device: str = 'cpu',
                    options: Optional[dict] = None) -> torch.nn.Module:
    """The config's segmentor with random weights (nothing downloaded). SyncBN stays SyncBN
    on GPUs; on the CPU it is ``CPUSyncBN`` in a process group and BN outside one, where
    there is nothing to synchronise over. ``options`` are merged into the config first, as
    ``--cfg-options`` would be."""
    from rmoe_plugin.engine.launch import replace_cuda_sync_bn
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options or {})
    cfg.model.data_preprocessor.size = (crop_size, crop_size)
    distributed = torch.distributed.is_initialized()
    if distributed and torch.device(device).type == 'cpu':
        replace_cuda_sync_bn(cfg.model)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    from mmseg.registry import MODELS
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    if not distributed:
        model = revert_sync_batchnorm(model)
    model.init_weights()
    model.optim_cfg = cfg.optim_wrapper
    return model.to(device)


def synthetic_batch(batch_size: int, size: int, num_classes: int = 150, seed: int = 0) -> dict:
    """What a dataloader of ``batch_size`` ADE20K crops hands to ``train_step``."""
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        label = torch.randint(0, num_classes, (1, size, size), generator=g)
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def optim_wrapper_for(model: torch.nn.Module, amp: str = None):
    """The config's optimiser; with ``amp`` ('bf16' or 'fp16') as mmengine's ``--amp`` sets it
    on a GPU (``AmpOptimWrapper``), and as plain autocast on the CPU (which mmengine's AMP
    wrapper does not serve)."""
    cfg = dict(model.optim_cfg)
    device = next(model.parameters()).device
    if amp and device.type == 'cuda':
        cfg.update(type='AmpOptimWrapper', dtype={'bf16': 'bfloat16', 'fp16': 'float16'}[amp],
                   loss_scale='dynamic')
    return build_optim_wrapper(model, cfg)


def cpu_autocast(model: torch.nn.Module, amp: str = None):
    """bf16 autocast where ``amp`` is asked for on the CPU (a GPU's comes from the wrapper)."""
    device = next(model.parameters()).device
    return (torch.autocast('cpu', dtype=torch.bfloat16) if amp and device.type == 'cpu'
            else contextlib.nullcontext())


def step_functions(model: torch.nn.Module, batch: dict,
                   amp: str = None) -> Dict[str, Callable[[], None]]:
    """``train step`` (forward, backward, optimiser step) and ``inference`` (predict)."""
    optim_wrapper = optim_wrapper_for(model, amp)

    def train_step():
        model.train()
        with cpu_autocast(model, amp):
            model.train_step(batch, optim_wrapper)

    def inference():
        model.eval()
        with torch.no_grad(), cpu_autocast(model, amp):
            model.test_step(batch)
    functions = {'train step': train_step, 'inference': inference}
    functions['optim_wrapper'] = optim_wrapper
    return functions


def training_memory(model: torch.nn.Module, steps: Dict[str, Callable]) -> Dict[str, int]:
    """Bytes of parameters, optimiser state and the peak a training step adds to them
    (activations, gradients, temporaries), measured on a step after the first."""
    steps['train step']()  # the optimiser's state exists from here on
    device = next(model.parameters()).device
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        steps['train step']()
        torch.cuda.synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with PeakMemory() as memory:
            steps['train step']()
        step_peak = memory.peak
    optimizer = steps['optim_wrapper'].optimizer
    return dict(parameters=tensor_bytes(*model.parameters()),
                optimizer_state=tensor_bytes(*optimizer_state_tensors(optimizer)),
                step_peak=step_peak)


@dataclass
class CompiledSteps:
    """A compiled training step and what compiling it took.

    Attributes:
        first_steps_s: wall time of the first steps, on different batches, compilation
            included.
        graphs: graphs compiled in the first step.
        recompiled: graphs compiled in the steps after the first (0 when nothing
            recompiles).
        graph_breaks: graph breaks dynamo counted.
        eager_step: one eager training step (on the next batch of the cycle).
        compiled_step: one compiled training step (on the next batch of the cycle).
    """
    first_steps_s: float
    graphs: int
    recompiled: int
    graph_breaks: int
    eager_step: Callable[[], None]
    compiled_step: Callable[[], None]


def compile_train_step(model: torch.nn.Module, batches: Sequence[dict], amp: str = None,
                       backend: str = 'inductor') -> CompiledSteps:
    """Compile ``model.train_step`` as mmengine's ``compile=True`` does (``torch.compile`` of
    the bound method) and run it once on each of ``batches``, timing and counting.

    The eager and compiled steps share the model and its optimiser, and cycle through
    ``batches``, whose routing differs.
    """
    optim_wrapper = optim_wrapper_for(model, amp)
    device = next(model.parameters()).device
    counters.clear()
    compiled = torch.compile(model.train_step, backend=backend)
    model.train()
    graphs = []
    start = time.perf_counter()
    for batch in batches:
        with cpu_autocast(model, amp):
            compiled(batch, optim_wrapper)
        graphs.append(counters['stats']['unique_graphs'])
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    first_steps_s = time.perf_counter() - start
    cycle = itertools.cycle(batches)

    def step(train_step):
        def run():
            with cpu_autocast(model, amp):
                train_step(next(cycle), optim_wrapper)
        return run
    return CompiledSteps(first_steps_s, graphs[0], graphs[-1] - graphs[0],
                         sum(counters['graph_break'].values()), step(model.train_step),
                         step(compiled))

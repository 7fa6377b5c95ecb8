"""A dense FFN against its RMoE conversion, in one interleaved run (tools/benchmark_moe.py).

With mmcv installed the pair is mmcv's ``FFN`` and ``RMoEFFN``; without it (the GPU machine,
a plain PyTorch user) the same Linear-GELU-Linear and ``MoEFeedForward``.
"""
import contextlib
from typing import Dict, Tuple

import torch
from torch import nn

from ..moe import MoEFeedForward
from .memory import PeakMemory
from .timing import interleaved_times, median_ms

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
MODES = ('inference', 'forward', 'forward+backward')


def build_pair(embed_dims: int, hidden: int, moe_args: dict,
               device: str) -> Tuple[nn.Module, nn.Module, str]:
    """(dense FFN, its RMoE conversion, what the dense one is)."""
    try:
        from mmcv.cnn.bricks.transformer import FFN

        from ..models import RMoEFFN
    except ImportError:
        dense = nn.Sequential(nn.Linear(embed_dims, hidden), nn.GELU(),
                              nn.Linear(hidden, embed_dims))
        moe = MoEFeedForward(embed_dims, hidden, **moe_args)
        moe.experts.load_core([dense[0].weight, dense[2].weight],
                              [dense[0].bias, dense[2].bias])
        kind = 'Linear-GELU-Linear'
    else:
        dense = FFN(embed_dims, hidden, act_cfg=dict(type='GELU'), add_identity=False)
        moe = RMoEFFN.from_dense(dense, **moe_args)
        kind = "mmcv's FFN"
    return dense.to(device), moe.to(device), kind


def _autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _step(layer: nn.Module, x: torch.Tensor, mode: str, autocast):
    def run():
        layer.train(mode != 'inference')
        with autocast, torch.set_grad_enabled(mode != 'inference'):
            out = layer(x)
        if mode == 'forward+backward':
            layer.zero_grad(set_to_none=True)  # as an optimizer step would leave them
            out.float().sum().backward()
    return run


def peak_step_bytes(run, device: str) -> int:
    """Peak bytes allocated by ``run()`` above what was allocated before it."""
    run()  # gradients and caches as they are in steady state
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakMemory() as memory:
        run()
    return memory.peak


def measure_ffn_pair(tokens: int, embed_dims: int, hidden: int, num_experts: int, top_k: int,
                     capacity_factor: float, repeats: int = 20, warmup: int = 3,
                     device: str = 'cpu', dtype: str = 'fp32', backend: str = 'auto',
                     memory: bool = False) -> Dict[str, object]:
    """Median ms of dense and RMoE per mode (``inference``, ``forward``,
    ``forward+backward``), the drop fraction, and with ``memory`` the peak bytes of a
    forward+backward (activations, gradients and temporaries; parameters excluded)."""
    torch.manual_seed(0)
    moe_args = dict(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                    residual_init_std=0.005, expert_backend=backend)
    dense, moe, kind = build_pair(embed_dims, hidden, moe_args, device)
    x = torch.randn(2, tokens // 2, embed_dims, device=device, requires_grad=True)
    autocast = _autocast(device, DTYPES[dtype])
    results: Dict[str, object] = dict(dense_kind=kind)
    for mode in MODES:
        times = interleaved_times({'dense': _step(dense, x, mode, autocast),
                                   'rmoe': _step(moe, x, mode, autocast)},
                                  repeats, warmup, torch.device(device))
        results[mode] = (median_ms(times['dense']), median_ms(times['rmoe']))
    if memory:
        results['peak_bytes'] = tuple(
            peak_step_bytes(_step(layer, x, 'forward+backward', autocast), device)
            for layer in (dense, moe))
    stats = (moe.moe if hasattr(moe, 'moe') else moe).last_stats
    results['drop_fraction'] = stats['drop_fraction'].item()
    return results

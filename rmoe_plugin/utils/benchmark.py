"""Dense FFN against RMoEFFN in one interleaved run (tools/benchmark_moe.py, the layer demo)."""
from typing import Dict

import torch
from mmcv.cnn.bricks.transformer import FFN

from ..models import RMoEFFN
from .timing import interleaved_times, median_ms


def measure_ffn_pair(tokens: int, embed_dims: int, hidden: int, num_experts: int, top_k: int,
                     capacity_factor: float, repeats: int = 20, warmup: int = 3,
                     device: str = 'cpu') -> Dict[str, object]:
    """Median ms of dense and RMoE for inference, training forward and forward+backward."""
    torch.manual_seed(0)
    dense = FFN(embed_dims, hidden, act_cfg=dict(type='GELU')).to(device)
    moe = RMoEFFN.from_dense(dense, num_experts=num_experts, top_k=top_k,
                             capacity_factor=capacity_factor, residual_init_std=0.005)
    x = torch.randn(2, tokens // 2, embed_dims, device=device, requires_grad=True)

    def inference(layer):
        def run():
            layer.eval()
            with torch.no_grad():
                layer(x)
        return run

    def forward(layer):
        def run():
            layer.train()
            layer(x)
        return run

    def forward_backward(layer):
        def run():
            layer.train()
            layer.zero_grad(set_to_none=True)  # as an optimizer step would leave them
            layer(x).sum().backward()
        return run

    results = {}
    for mode, make in (('inference', inference), ('forward', forward),
                       ('forward+backward', forward_backward)):
        times = interleaved_times({'dense': make(dense), 'rmoe': make(moe)}, repeats, warmup,
                                  torch.device(device))
        results[mode] = (median_ms(times['dense']), median_ms(times['rmoe']))
    moe.train()(x)
    results['drop_fraction'] = moe.moe.last_stats['drop_fraction'].item()
    return results

"""The RMoE layer in one minute (`python tools/demo_layer.py`): convert a trained dense FFN,
check it is unchanged, train the residuals, and time the layer against the dense FFN.

The toy task has tokens drawn from a few clusters, each with its own target map, so a single
dense FFN is a compromise and experts can specialise: the situation RMoE is built for.
"""
import argparse

import torch
from mmcv.cnn.bricks.transformer import FFN

from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.utils.known_warnings import ignore_known_warnings
from rmoe_plugin.utils.layer_benchmark import measure_ffn_pair


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=300, help='steps per training stage')
    p.add_argument('--num-experts', type=int, default=8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--skip-benchmark', action='store_true')
    return p.parse_args()


def clustered_task(num_clusters=8, dims=32, seed=0):
    """A sampler of (tokens, targets): each cluster of inputs has its own random target map."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dims, generator=g) * 2
    maps = torch.randn(num_clusters, dims, dims, generator=g) / dims ** 0.5

    def sample(num_tokens, generator):
        cluster = torch.randint(num_clusters, (num_tokens,), generator=generator)
        x = centres[cluster] + 0.5 * torch.randn(num_tokens, dims, generator=generator)
        y = torch.tanh(torch.einsum('nd,nde->ne', x, maps[cluster]))
        return x[None], y[None]
    return sample


def train(layer, sample, steps, seed, lr=3e-3):
    g = torch.Generator().manual_seed(seed)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    layer.train()
    for _ in range(steps):
        x, y = sample(512, g)
        loss = (layer(x) - y).square().mean() + sum(collect_moe_losses(layer).values())
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(layer, sample):
    x, y = sample(4096, torch.Generator().manual_seed(12345))
    return (layer.eval()(x) - y).square().mean().item()


def main():
    ignore_known_warnings()
    args = parse_args()
    torch.manual_seed(args.seed)
    sample = clustered_task(seed=args.seed)
    dense = FFN(32, 128, act_cfg=dict(type='GELU'), add_identity=False)
    train(dense, sample, args.steps, seed=1)
    print(f'1. dense FFN trained {args.steps} steps: test MSE {evaluate(dense, sample):.4f}')

    rmoe = RMoEFFN.from_dense(dense, num_experts=args.num_experts, top_k=1,
                              router_noise_std=1.0 / args.num_experts)
    x, _ = sample(4096, torch.Generator().manual_seed(7))
    diff = (rmoe.eval()(x) - dense.eval()(x)).abs().max().item()
    print(f'2. converted to RMoE ({args.num_experts} experts = core + residual, top-1, '
          f'straight-through gate): max |RMoE - dense| = {diff:.2e}')

    more_dense = FFN(32, 128, act_cfg=dict(type='GELU'), add_identity=False)
    more_dense.load_state_dict(dense.state_dict())
    train(more_dense, sample, args.steps, seed=2)
    train(rmoe, sample, args.steps, seed=2)
    print(f'3. {args.steps} more steps: dense test MSE {evaluate(more_dense, sample):.4f}, '
          f'RMoE test MSE {evaluate(rmoe, sample):.4f}')
    load = rmoe.moe.last_stats['expert_load'].tolist()
    print(f'   expert load on the test batch: {load}')

    if not args.skip_benchmark:
        print('4. layer cost at the Swin-T stage-3 shape (2048 tokens, 384 -> 1536 -> 384, '
              f'{args.num_experts} experts, top-1, capacity 1.25), median of 10:')
        result = measure_ffn_pair(2048, 384, 1536, args.num_experts, 1, 1.25, repeats=10)
        for mode in ('inference', 'forward', 'forward+backward'):
            dense_ms, moe_ms = result[mode]
            print(f'   {mode:17s} dense {dense_ms:6.1f} ms   RMoE {moe_ms:6.1f} ms   '
                  f'{moe_ms / dense_ms:.2f}x')


if __name__ == '__main__':
    main()

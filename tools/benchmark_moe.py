"""Time RMoEFFN against mmcv's dense FFN of the same width, interleaved in one run.

Default shape: Swin-T stage 3 on an ADE20K batch (2 images of 512x512 -> 2 x 32 x 32 = 2048
tokens, width 384, hidden 1536), 8 experts, top-1, capacity factor 1.25.

    python tools/benchmark_moe.py                 # the main shape
    python tools/benchmark_moe.py --sweep         # plus experts 1..32 and token counts
"""
import argparse

import torch

from rmoe_plugin.utils import measure_ffn_pair


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tokens', type=int, default=2048)
    p.add_argument('--embed-dims', type=int, default=384)
    p.add_argument('--feedforward-channels', type=int, default=1536)
    p.add_argument('--num-experts', type=int, default=8)
    p.add_argument('--top-k', type=int, default=1)
    p.add_argument('--capacity-factor', type=float, default=1.25)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--sweep', action='store_true',
                   help='also sweep num_experts (1..32) and tokens (512..8192)')
    return p.parse_args()


def print_rows(title, rows):
    print(f'\n{title}\n')
    print('| tokens | experts | mode | dense FFN (ms) | RMoEFFN (ms) | ratio | dropped |')
    print('|---:|---:|---|---:|---:|---:|---:|')
    for (tokens, experts), result in rows:
        for mode in ('inference', 'forward', 'forward+backward'):
            dense_ms, moe_ms = result[mode]
            print(f'| {tokens} | {experts} | {mode} | {dense_ms:.1f} | {moe_ms:.1f} | '
                  f'{moe_ms / dense_ms:.2f}x | {result["drop_fraction"]:.1%} |')


def main():
    args = parse_args()
    common = dict(embed_dims=args.embed_dims, hidden=args.feedforward_channels,
                  top_k=args.top_k, capacity_factor=args.capacity_factor,
                  repeats=args.repeats, warmup=args.warmup, device=args.device)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; '
          f'width {args.embed_dims}, hidden {args.feedforward_channels}, top-{args.top_k}, '
          f'capacity factor {args.capacity_factor}; median of {args.repeats} interleaved runs')
    main_row = ((args.tokens, args.num_experts),
                measure_ffn_pair(args.tokens, num_experts=args.num_experts, **common))
    print_rows('Main shape', [main_row])
    if args.sweep:
        rows = [((args.tokens, e), measure_ffn_pair(args.tokens, num_experts=e, **common))
                for e in (1, 2, 4, 8, 16, 32)]
        print_rows('Sweep over experts', rows)
        rows = [((t, args.num_experts), measure_ffn_pair(t, num_experts=args.num_experts, **common))
                for t in (512, 2048, 8192)]
        print_rows('Sweep over tokens', rows)


if __name__ == '__main__':
    main()

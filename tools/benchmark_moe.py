"""Time (and with --memory, measure) the RMoE layer against the dense FFN it replaces.

Dense and RMoE run interleaved in one process on the same input: mmcv's ``FFN`` against
``RMoEFFN`` where mmcv is installed, else the same Linear-GELU-Linear against
``MoEFeedForward`` (nothing but PyTorch needed). Every value of each list is measured.

    python tools/benchmark_moe.py                       # Swin-T stage 3, 2048 tokens, 8 experts
    python tools/benchmark_moe.py --num-experts 1 2 4 8 16 32 --tokens 512 2048 8192
    python tools/benchmark_moe.py --grid gpu --device cuda --dtype bf16 --memory
"""
import argparse
import json
import math
import platform

import torch

from rmoe_plugin.fileio import atomic_write
from rmoe_plugin.moe.grouped_linear import choose_backend
from rmoe_plugin.utils.layer_benchmark import DTYPES, MODES, measure_ffn_pair

# Swin-T and Swin-L stage-3 widths (embed_dims:feedforward_channels), as the grid.
GPU_GRID = dict(widths=['384:1536', '768:3072'], tokens=[4096, 16384, 65536],
                num_experts=[8, 32], top_k=[1, 2])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--grid', choices=['gpu'], help='the GPU grid: widths 384:1536 and '
                   '768:3072, 4k-64k tokens, 8 and 32 experts, top-1 and top-2')
    p.add_argument('--widths', nargs='+', default=['384:1536'],
                   help='embed_dims:feedforward_channels pairs')
    p.add_argument('--tokens', nargs='+', type=int, default=[2048])
    p.add_argument('--num-experts', nargs='+', type=int, default=[8])
    p.add_argument('--top-k', nargs='+', type=int, default=[1])
    p.add_argument('--capacity-factor', type=float, default=1.25)
    p.add_argument('--dtype', choices=sorted(DTYPES), default='fp32',
                   help='fp32, or bf16/fp16 under autocast')
    p.add_argument('--backend', default='auto', choices=['auto', 'grouped_mm', 'loop'])
    p.add_argument('--device', default='cpu')
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--memory', action='store_true',
                   help='also the peak memory of a forward+backward')
    p.add_argument('--json', help='also write the rows to this JSON file')
    args = p.parse_args()
    if args.grid == 'gpu':
        for key, value in GPU_GRID.items():
            setattr(args, key, value)
    try:
        args.widths = [tuple(int(v) for v in w.split(':')) for w in args.widths]
    except ValueError:
        p.error(f'--widths takes embed_dims:feedforward_channels pairs, got {args.widths}')
    return args


def machine(device: str) -> str:
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(device)
    return f'{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads'


def main():
    args = parse_args()
    backend = choose_backend(args.backend, torch.device(args.device), DTYPES[args.dtype])
    print(f'torch {torch.__version__} on {machine(args.device)}; {args.dtype}, capacity factor '
          f'{args.capacity_factor}, expert backend {backend}; median of {args.repeats} '
          'interleaved runs; ratio = RMoE / dense')
    header = '| width | tokens | experts | top-k | ' + ' | '.join(MODES)
    header += ' | peak memory, fwd+bwd (MiB) |' if args.memory else ' |'
    print('\n' + header + ' dropped |')
    print('|---' * (header.count('|') - 1 + 1) + '|')
    rows = []
    for (dims, hidden) in args.widths:
        for tokens in args.tokens:
            for experts in args.num_experts:
                for top_k in args.top_k:
                    rows.append(measure_row(args, dims, hidden, tokens, experts, top_k))
    fwd_bwd = [r['forward+backward'][1] / r['forward+backward'][0] for r in rows]
    print(f'\nforward+backward, geometric mean over {len(rows)} rows: '
          f'{math.exp(sum(map(math.log, fwd_bwd)) / len(rows)):.2f}x; dense is '
          f'{rows[0]["dense_kind"]}')
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(dict(torch=torch.__version__, machine=machine(args.device),
                           dtype=args.dtype, backend=backend, rows=rows), f, indent=1)


def measure_row(args, dims, hidden, tokens, experts, top_k) -> dict:
    result = measure_ffn_pair(tokens, dims, hidden, experts, top_k, args.capacity_factor,
                              args.repeats, args.warmup, args.device, args.dtype,
                              args.backend, args.memory)
    cells = [f'{dims}->{hidden}', str(tokens), str(experts), str(top_k)]
    for mode in MODES:
        dense_ms, moe_ms = result[mode]
        cells.append(f'{dense_ms:.1f} / {moe_ms:.1f} ms = {moe_ms / dense_ms:.2f}x')
    if args.memory:
        dense_b, moe_b = result['peak_bytes']
        cells.append(f'{dense_b / 2**20:.0f} / {moe_b / 2**20:.0f} = {moe_b / dense_b:.2f}x')
    cells.append(f'{result["drop_fraction"]:.1%}')
    print('| ' + ' | '.join(cells) + ' |', flush=True)
    return dict(result, width=[dims, hidden], tokens=tokens, num_experts=experts, top_k=top_k)


if __name__ == '__main__':
    main()

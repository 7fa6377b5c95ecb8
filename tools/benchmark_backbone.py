"""Time a UperNet training step and inference with RMoE-Swin-T against dense Swin-T, interleaved.

Both models come from their configs (the upstream mmseg one and ours) with random weights;
the batch is ADE20K-shaped (default: 2 images of 512x512, as one GPU of the 8xb2 schedule).

    python tools/benchmark_backbone.py
    python tools/benchmark_backbone.py --size 256 --repeats 10
"""
import argparse
import os

import torch

import rmoe_plugin  # noqa: F401
from rmoe_plugin.utils import interleaved_times, median_ms
from rmoe_plugin.utils.backbone_benchmark import build_segmentor, step_functions, synthetic_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
RMOE = os.path.join(ROOT, 'configs', 'ade20k',
                    'rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dense-config', default=DENSE)
    p.add_argument('--rmoe-config', default=RMOE)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--modes', nargs='+', default=['train step', 'inference'],
                   choices=['train step', 'inference'])
    args = p.parse_args()
    from mmengine.config import Config
    dense_cfg = args.dense_config
    if dense_cfg.startswith('mmseg::'):  # resolve through mmengine, as _base_ would
        dense_cfg = Config._get_cfg_path(dense_cfg, '.')[0]
    torch.manual_seed(0)
    batch = synthetic_batch(args.batch_size, args.size)
    steps = {name: step_functions(build_segmentor(cfg, args.size), batch)
             for name, cfg in (('dense', dense_cfg), ('rmoe', args.rmoe_config))}
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; UperNet, batch '
          f'{args.batch_size} x {args.size}x{args.size}; median of {args.repeats} interleaved')
    print('\n| mode | dense Swin-T (s) | RMoE-Swin-T (s) | ratio |\n|---|---:|---:|---:|')
    for mode in args.modes:
        times = interleaved_times({n: s[mode] for n, s in steps.items()}, args.repeats,
                                  args.warmup)
        dense, rmoe = median_ms(times['dense']) / 1e3, median_ms(times['rmoe']) / 1e3
        print(f'| {mode} | {dense:.2f} | {rmoe:.2f} | {rmoe / dense:.2f}x |')


if __name__ == '__main__':
    main()

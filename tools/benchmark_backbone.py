"""UperNet with RMoE-Swin-T against UperNet with Swin-T: a training step's time and peak
memory, and inference time, interleaved in one run.

Both models come from their configs (the upstream mmseg one and ours) with random weights;
the batch is ADE20K-shaped (default: 2 images of 512x512, as one GPU of the 8xb2 schedule).

    python tools/benchmark_backbone.py                       # CPU, fp32
    python tools/benchmark_backbone.py --memory --repeats 3
    python tools/benchmark_backbone.py --device cuda --amp bf16 --batch-size 8 --memory
"""
import argparse
import os
import platform

import torch

import rmoe_plugin  # noqa: F401
from rmoe_plugin.utils.known_warnings import ignore_known_warnings
from rmoe_plugin.utils import interleaved_times, median_ms
from rmoe_plugin.utils.backbone_benchmark import (build_segmentor, step_functions,
                                                  synthetic_batch, training_memory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
RMOE = os.path.join(ROOT, 'configs', 'ade20k',
                    'rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py')
MODES = ['train step', 'inference']


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dense-config', default=DENSE)
    p.add_argument('--rmoe-config', default=RMOE)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['bf16', 'fp16'],
                   help='mixed precision (AmpOptimWrapper on a GPU, bf16 autocast on the CPU)')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--modes', nargs='+', default=MODES, choices=MODES)
    p.add_argument('--memory', action='store_true',
                   help="also a training step's peak memory")
    return p.parse_args()


def resolve(config: str) -> str:
    from mmengine.config import Config
    if '::' in config:  # a package config, resolved through mmengine as _base_ would
        return Config._get_cfg_path(config, '.')[0]
    return config


def main():
    ignore_known_warnings()
    args = parse_args()
    torch.manual_seed(0)
    batch = synthetic_batch(args.batch_size, args.size)
    models = {name: build_segmentor(resolve(cfg), args.size, args.device)
              for name, cfg in (('dense', args.dense_config), ('rmoe', args.rmoe_config))}
    steps = {name: step_functions(model, batch, args.amp) for name, model in models.items()}
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith('cuda')
             else f'{platform.machine()} CPU, {torch.get_num_threads()} threads')
    print(f'torch {torch.__version__} on {where}; UperNet, batch {args.batch_size} x '
          f'{args.size}x{args.size}, {args.amp or "fp32"}; median of {args.repeats} interleaved')
    print('\n| mode | dense Swin-T (s) | RMoE-Swin-T (s) | ratio |\n|---|---:|---:|---:|')
    for mode in args.modes:
        times = interleaved_times({n: s[mode] for n, s in steps.items()}, args.repeats,
                                  args.warmup, torch.device(args.device))
        dense, rmoe = median_ms(times['dense']) / 1e3, median_ms(times['rmoe']) / 1e3
        print(f'| {mode} | {dense:.2f} | {rmoe:.2f} | {rmoe / dense:.2f}x |', flush=True)
    if args.memory:
        print_memory({name: training_memory(models[name], steps[name]) for name in models})


def print_memory(memory):
    mib = {name: {k: v / 2**20 for k, v in m.items()} for name, m in memory.items()}
    for m in mib.values():
        m['total'] = sum(m.values())
    print('\n| training step, MiB | dense Swin-T | RMoE-Swin-T | RMoE - dense |\n'
          '|---|---:|---:|---:|')
    for key in ('parameters', 'optimizer_state', 'step_peak', 'total'):
        dense, rmoe = mib['dense'][key], mib['rmoe'][key]
        print(f'| {key.replace("_", " ")} | {dense:.0f} | {rmoe:.0f} | {rmoe - dense:+.0f} |')
    extra_params = mib['rmoe']['parameters'] - mib['dense']['parameters']
    over = mib['rmoe']['step_peak'] - mib['dense']['step_peak']
    print(f'\nstep peak over dense: {over:+.0f} MiB (the extra parameters\' gradients alone: '
          f'{extra_params:.0f} MiB)')


if __name__ == '__main__':
    main()

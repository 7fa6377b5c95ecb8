"""UperNet with RMoE-Swin-T against UperNet with Swin-T: a training step's time and peak
memory, and inference time, interleaved in one run; with --compile, torch.compile's cost and
gain for both.

Both models come from their configs (the upstream mmseg one and ours) with random weights;
the batch is ADE20K-shaped (default: 2 images of 512x512, as one GPU of the 8xb2 schedule).

    python tools/benchmark_backbone.py                       # CPU, fp32
    python tools/benchmark_backbone.py --modes --memory      # peak memory, with_cp off and on
    python tools/benchmark_backbone.py --modes --compile --compile-steps 3
    python tools/benchmark_backbone.py --device cuda --amp bf16 --batch-size 8 --memory

--compile compiles each model's ``train_step`` as mmengine's ``compile=True`` does, in a
process of its own with an empty inductor cache (so neither model reuses what the other
compiled), and reports the wall time of the first --compile-steps steps (different batches:
the routing differs), the graphs compiled and recompiled, the graph breaks, and the steady
training step compiled and eager, interleaved.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
from mmengine.config import DictAction

import rmoe_plugin  # noqa: F401
from rmoe_plugin.fileio import atomic_write
from rmoe_plugin.utils import interleaved_times, median_ms
from rmoe_plugin.utils.backbone_benchmark import (build_segmentor, compile_train_step,
                                                  step_functions, synthetic_batch,
                                                  training_memory)
from rmoe_plugin.utils.known_warnings import ignore_known_warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
RMOE = os.path.join(ROOT, 'configs', 'ade20k',
                    'rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py')
MODES = ['train step', 'inference']
NAMES = {'dense': 'dense Swin-T', 'rmoe': 'RMoE-Swin-T'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dense-config', default=DENSE)
    p.add_argument('--rmoe-config', default=RMOE)
    p.add_argument('--dense-options', nargs='+', action=DictAction, default={},
                   help='key=value overrides of the dense config (as --cfg-options)')
    p.add_argument('--rmoe-options', nargs='+', action=DictAction, default={},
                   help='key=value overrides of the RMoE config')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['bf16', 'fp16'],
                   help='mixed precision (AmpOptimWrapper on a GPU, bf16 autocast on the CPU)')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--modes', nargs='*', default=MODES, choices=MODES,
                   help='what to time, interleaved (none: only --memory / --compile)')
    p.add_argument('--memory', action='store_true',
                   help="also a training step's peak memory, without and with with_cp")
    p.add_argument('--compile', action='store_true',
                   help='also torch.compile: compile time and steady step, compiled and eager')
    p.add_argument('--compile-backend', default='inductor',
                   help="torch.compile backend (inductor, aot_eager, ...). Default: inductor")
    p.add_argument('--compile-steps', type=int, default=3,
                   help='the first steps whose time includes compilation. Default: 3')
    p.add_argument('--compile-one', choices=sorted(NAMES), help=argparse.SUPPRESS)
    p.add_argument('--compile-result', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(config: str) -> str:
    from mmengine.config import Config
    if '::' in config:  # a package config, resolved through mmengine as _base_ would
        return Config._get_cfg_path(config, '.')[0]
    return config


def build(name: str, args, **options):
    config, own = ((args.dense_config, args.dense_options) if name == 'dense'
                   else (args.rmoe_config, args.rmoe_options))
    return build_segmentor(resolve(config), args.size, args.device, {**own, **options})


def where(args) -> str:
    device = (torch.cuda.get_device_name(args.device) if args.device.startswith('cuda')
              else f'{platform.machine()} CPU, {torch.get_num_threads()} threads')
    return (f'torch {torch.__version__} on {device}; UperNet, batch {args.batch_size} x '
            f'{args.size}x{args.size}, {args.amp or "fp32"}')


def main():
    ignore_known_warnings()
    args = parse_args()
    if args.compile_one:
        return compile_one(args)
    torch.manual_seed(0)
    print(f'{where(args)}; median of {args.repeats} interleaved')
    if args.modes:
        batch = synthetic_batch(args.batch_size, args.size)
        models = {name: build(name, args) for name in NAMES}
        steps = {name: step_functions(model, batch, args.amp) for name, model in models.items()}
        print('\n| mode | dense Swin-T (s) | RMoE-Swin-T (s) | ratio |\n|---|---:|---:|---:|')
        for mode in args.modes:
            times = interleaved_times({n: s[mode] for n, s in steps.items()}, args.repeats,
                                      args.warmup, torch.device(args.device))
            dense, rmoe = median_ms(times['dense']) / 1e3, median_ms(times['rmoe']) / 1e3
            print(f'| {mode} | {dense:.2f} | {rmoe:.2f} | {rmoe / dense:.2f}x |', flush=True)
        del models, steps
    if args.memory:
        print_memory({(name, with_cp): measure_memory(name, args, with_cp)
                      for with_cp in (False, True) for name in NAMES})
    if args.compile:
        print_compile({name: compile_in_own_process(name) for name in NAMES}, args)


def measure_memory(name: str, args, with_cp: bool) -> dict:
    torch.manual_seed(0)
    model = build(name, args, **{'model.backbone.with_cp': with_cp})
    batch = synthetic_batch(args.batch_size, args.size)
    return training_memory(model, step_functions(model, batch, args.amp))


def print_memory(memory):
    mib = {key: {k: v / 2**20 for k, v in m.items()} for key, m in memory.items()}
    for m in mib.values():
        m['total'] = sum(m.values())
    print('\n| training step, MiB | dense Swin-T | RMoE-Swin-T | RMoE - dense | dense, with_cp '
          '| RMoE, with_cp | RMoE - dense, with_cp |\n|---|---:|---:|---:|---:|---:|---:|')
    for key in ('parameters', 'optimizer_state', 'step_peak', 'total'):
        cells = []
        for with_cp in (False, True):
            dense, rmoe = mib['dense', with_cp][key], mib['rmoe', with_cp][key]
            cells += [f'{dense:.0f}', f'{rmoe:.0f}', f'{rmoe - dense:+.0f}']
        print(f'| {key.replace("_", " ")} | ' + ' | '.join(cells) + ' |')
    for with_cp in (False, True):
        extra_params = mib['rmoe', with_cp]['parameters'] - mib['dense', with_cp]['parameters']
        over = mib['rmoe', with_cp]['step_peak'] - mib['dense', with_cp]['step_peak']
        print(f'\nwith_cp={with_cp}: step peak over dense: {over:+.0f} MiB (the extra '
              f'parameters\' gradients alone: {extra_params:.0f} MiB)', end='')
    saving = {name: mib[name, False]['step_peak'] - mib[name, True]['step_peak']
              for name in NAMES}
    print(f'\nwith_cp saves {saving["dense"]:.0f} MiB of the dense step peak, '
          f'{saving["rmoe"]:.0f} MiB of the RMoE one')


def compile_in_own_process(name: str) -> dict:
    """:func:`compile_one` of ``name`` in a fresh process, with a fresh inductor cache."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        result = os.path.join(out, 'result.json')
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                   '--compile-one', name, '--compile-result', result]
        subprocess.run(command, env=env, check=True)
        with open(result) as f:
            return json.load(f)


def compile_one(args) -> None:
    """Compile one model's training step; its timings go to --compile-result."""
    torch.manual_seed(0)
    model = build(args.compile_one, args)
    batches = [synthetic_batch(args.batch_size, args.size, seed=i)
               for i in range(args.compile_steps)]
    run = compile_train_step(model, batches, args.amp, args.compile_backend)
    times = interleaved_times({'eager': run.eager_step, 'compiled': run.compiled_step},
                              args.repeats, args.warmup, torch.device(args.device))
    result = dict(first_steps_s=run.first_steps_s, graphs=run.graphs,
                  recompiled=run.recompiled, graph_breaks=run.graph_breaks,
                  eager_s=median_ms(times['eager']) / 1e3,
                  compiled_s=median_ms(times['compiled']) / 1e3)
    with atomic_write(args.compile_result) as f:
        json.dump(result, f)


def print_compile(results: dict, args) -> None:
    print(f'\ntorch.compile ({args.compile_backend}) of train_step, each model in its own '
          f'process with an empty cache; first {args.compile_steps} steps on different '
          f'batches, then the median of {args.repeats} interleaved steps\n')
    print('| | dense Swin-T | RMoE-Swin-T | RMoE / dense |\n|---|---:|---:|---:|')
    rows = [('first steps, compiling (s)', 'first_steps_s', '{:.1f}'),
            ('graphs compiled in step 1', 'graphs', '{}'),
            ('graphs compiled in steps 2+', 'recompiled', '{}'),
            ('graph breaks', 'graph_breaks', '{}'), ('eager step (s)', 'eager_s', '{:.2f}'),
            ('compiled step (s)', 'compiled_s', '{:.2f}')]
    for label, key, form in rows:
        dense, rmoe = results['dense'][key], results['rmoe'][key]
        ratio = f'{rmoe / dense:.2f}x' if isinstance(dense, float) and dense else ''
        print(f'| {label} | {form.format(dense)} | {form.format(rmoe)} | {ratio} |')
    speedup = {name: r['eager_s'] / r['compiled_s'] for name, r in results.items()}
    print(f'| compiled speed-up (eager / compiled) | {speedup["dense"]:.2f}x | '
          f'{speedup["rmoe"]:.2f}x | |')


if __name__ == '__main__':
    main()

"""`make demo`: the four RMoE pipelines in miniature on the CPU, compared on accuracy and cost.

1. writes small ImageNet-layout (classification) and ADE20K-layout (segmentation) datasets;
2. checks that converting a dense model to RMoE leaves its output unchanged;
3. runs dense, RMoE-D, RMoE-I and MoE (upstream classification -> downstream UperNet) from
   the configs in configs/pipeline/, same data, seeds and schedule proportions for all;
4. prints the comparison and writes work_dirs/demo/report.md and pipelines.png.

Finished stages are reused, so running it again only redoes what is missing.
"""
import argparse
import os
import time

import torch

import rmoe_plugin  # noqa: F401
from rmoe_plugin.datasets import make_ade20k, make_imagenet
from rmoe_plugin.fileio import atomic_write
from rmoe_plugin.pipeline import (load_runs, make_pipelines, markdown_table, plot, print_stage,
                                  run_pipeline, summarise)
from rmoe_plugin.utils.known_warnings import (KnownLogMessages, hide_known_prints,
                                              ignore_known_warnings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(ROOT, 'configs', 'pipeline')
CONFIGS = dict(cls_dense=f'{PIPE}/swin-mini_dense_cls-imagenet-64x64.py',
               cls_rmoe=f'{PIPE}/swin-mini_rmoe-e4_cls-imagenet-64x64.py',
               seg_dense=f'{PIPE}/swin-mini_dense_upernet_seg-ade20k-64x64.py',
               seg_rmoe=f'{PIPE}/swin-mini_rmoe-e4_upernet_seg-ade20k-64x64.py')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--work-dir', default=os.path.join(ROOT, 'work_dirs', 'demo'))
    p.add_argument('--iters', type=int, nargs=3, default=[300, 15, 150],
                   metavar=('UPSTREAM', 'INTERMEDIATE', 'DOWNSTREAM'),
                   help='stage lengths; the intermediate stage is 5%% of upstream, as short '
                        'as the paper keeps it relative to pre-training')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    return p.parse_args()


def make_data(root):
    imagenet = os.path.join(root, 'imagenet')
    ade = os.path.join(root, 'ade', 'ADEChallengeData2016')
    start, made = time.perf_counter(), not (os.path.isdir(imagenet) and os.path.isdir(ade))
    if not os.path.isdir(imagenet):
        make_imagenet(root, num_train=80, num_val=20, seed=0, progress=False)
    if not os.path.isdir(ade):
        make_ade20k(root, num_train=200, num_val=50, seed=1, progress=False)
    print(f'datasets {"written" if made else "reused"} in {root}: ImageNet layout (5 classes, '
          f'80 + 20 images each), ADE20K layout (200 + 50) ({time.perf_counter() - start:.0f} s)')

    def roots(path):  # and the Runner's log kept to warnings: the demo prints its own lines
        return dict(log_level='WARNING', **{
            f'{d}.dataset.data_root': path
            for d in ('train_dataloader', 'val_dataloader', 'test_dataloader')})
    return {CONFIGS['cls_dense']: roots(imagenet), CONFIGS['cls_rmoe']: roots(imagenet),
            CONFIGS['seg_dense']: roots(ade), CONFIGS['seg_rmoe']: roots(ade)}


def check_conversion():
    from mmcv.cnn.bricks.transformer import FFN
    from rmoe_plugin import RMoEFFN
    dense = FFN(64, 256, act_cfg=dict(type='GELU')).eval()
    rmoe = RMoEFFN.from_dense(dense, num_experts=8).eval()
    x = torch.randn(4, 100, 64)
    diff = (rmoe(x) - dense(x)).abs().max().item()
    print(f'dense FFN -> RMoE layer (8 experts = core + residual): max |difference| {diff:.1e}')


def main():
    ignore_known_warnings()
    args = parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    options = make_data(os.path.join(args.work_dir, 'data'))
    check_conversion()
    pipelines = make_pipelines(CONFIGS, *args.iters)
    with hide_known_prints():
        for seed in args.seeds:
            for name in ('dense', 'rmoe_d', 'rmoe_i', 'moe'):
                run_pipeline(name, pipelines[name], args.work_dir, seed, options,
                             on_stage=print_stage, log_filter=KnownLogMessages())
    rows = summarise(load_runs(args.work_dir), 'mIoU')
    table = markdown_table(rows, 'mIoU')
    plot(rows, 'mIoU', os.path.join(args.work_dir, 'pipelines.png'))
    up, inter, down = args.iters
    text = (f'# RMoE pipelines in miniature\n\nUpstream: 5-class classification, 64x64, '
            f'{up} iterations; intermediate (RMoE-I): {inter}; downstream: UperNet on a '
            f'synthetic ADE20K, {down} iterations; Swin of width 32, 4 experts in the second '
            f'block of each of the last two stages; seeds {args.seeds}. Costs add up every '
            f'stage a pipeline needs (the shared dense upstream counts in each).\n\n'
            f'{table}\n\n'
            '![accuracy against cost](pipelines.png)\n')
    with atomic_write(os.path.join(args.work_dir, 'report.md')) as f:
        f.write(text)
    print('\n' + table)
    print(f'\nwrote {args.work_dir}/report.md and pipelines.png')


if __name__ == '__main__':
    main()

"""Choose which blocks become MoE by a first-order estimate of what splitting each FFN into
experts gains (the variance of per-image gradients of its weights), on a few batches.

Any RMoE backbone (RMoESwinTransformer, RMoECvT, RMoEBackbone over BEiT, ViT, timm, ...) or a
dense one: the FFNs are scored dense, in the block lists ``moe_blocks`` counts.

Writes a config that inherits CONFIG and sets ``model.backbone.moe_blocks``:

    python tools/select_moe_blocks.py CONFIG --checkpoint dense.pth --num-blocks 4 \
        --max-images 16 --out configs/ade20k/my_selected.py
"""
import argparse
import os
import sys

import torch
from mmengine.config import Config, DictAction
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

import rmoe_plugin  # noqa: F401
from rmoe_plugin.fileio import atomic_write
from rmoe_plugin.pipeline.select import block_list_depths, choose_blocks, score_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a segmentation or detection config')
    p.add_argument('--checkpoint', help='dense weights to score (default: the config init)')
    p.add_argument('--num-blocks', type=int, default=4)
    p.add_argument('--max-images', type=int, default=16)
    p.add_argument('--out', required=True, help='config file to write (must not exist)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p.parse_args()


def build_dense(cfg, checkpoint):
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    backbone = cfg.model.backbone
    if 'moe_cfg' in backbone or 'moe_blocks' in backbone:  # score the same FFNs dense
        backbone.moe_blocks = 'none'
    if checkpoint:
        backbone.init_cfg = dict(type='Pretrained', checkpoint=checkpoint)
    model = revert_sync_batchnorm(registry.build(cfg.model))
    model.init_weights()
    return model


def write_config(path, base, moe_blocks, scores, images):
    rel = os.path.relpath(os.path.abspath(base), os.path.dirname(os.path.abspath(path)))
    lines = [f'# Written by tools/select_moe_blocks.py on {images} images. Score of each',
             '# (block list, block): variance of per-image FFN gradients, the first-order',
             '# loss decrease splitting it into experts could buy.']
    lines += [f'#   list {s} block {b}: {v:.4g}' for (s, b), v in
              sorted(scores.items(), key=lambda kv: -kv[1])]
    lines += [f"_base_ = ['{rel}']", f'model = dict(backbone=dict(moe_blocks={moe_blocks!r}))',
              '']
    with atomic_write(path) as f:
        f.write('\n'.join(lines))


def main():
    args = parse_args()
    if os.path.exists(args.out):
        sys.exit(f'error: --out {args.out} exists; choose a new file')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    torch.manual_seed(0)
    model = build_dense(cfg, args.checkpoint)
    loader = Runner.build_dataloader(cfg.train_dataloader)
    scores = score_model(model, loader, args.max_images)
    depths = block_list_depths(model.backbone)
    try:
        moe_blocks = choose_blocks(scores, args.num_blocks, depths)
    except ValueError as e:
        sys.exit(f'error: --num-blocks: {e}')
    for (s, b), v in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f'list {s} block {b}: {v:.4g}')
    write_config(args.out, args.config, moe_blocks, scores, args.max_images)
    print(f'moe_blocks = {moe_blocks}\nwrote {args.out}')


if __name__ == '__main__':
    main()

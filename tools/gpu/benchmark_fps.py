"""mmdet's own inference benchmark on a config, with random weights (nothing downloaded).

Writes the config's model with random weights to WORK_DIR/random.pth, then runs
``mim run mmdet benchmark CONFIG --checkpoint random.pth --task inference`` in the current
folder (whose data/coco/ the config's dataloader reads), printing its fps lines.

    python tools/gpu/benchmark_fps.py mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py \
        --max-iter 60 --work-dir fps-dense
"""
import argparse
import os
import subprocess
import sys

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import rmoe_plugin  # noqa: F401


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='a config path, or mmdet::<path> of an upstream one')
    p.add_argument('--data-root', default='data/coco/')
    p.add_argument('--max-iter', type=int, default=60)
    p.add_argument('--work-dir', required=True)
    args = p.parse_args()
    config = Config._get_cfg_path(args.config, '.')[0] if '::' in args.config else args.config
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.init_weights()
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint = os.path.join(args.work_dir, 'random.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), checkpoint)
    command = [sys.executable, '-m', 'mim', 'run', 'mmdet', 'benchmark', config,
               '--checkpoint', checkpoint, '--task', 'inference', '--max-iter',
               str(args.max_iter), '--work-dir', args.work_dir, '--cfg-options',
               'model.backbone.init_cfg=None', f'test_dataloader.dataset.data_root={args.data_root}']
    sys.exit(subprocess.call(command))


if __name__ == '__main__':
    main()

"""`mim train` of the tiny Swin-MoE configs (the shipped ones' backbone at width 16, 4 experts)
initialised from a converted Swin-MoE checkpoint, downloaded by URL from a loopback server:
the runs train, validate and log the balance loss."""
import os

import pytest
import torch

from rmoe_plugin.engine.swin_moe import convert_released
from swin_moe_reference import SwinMoE, save_released
from test_e2e import det_data, run, seg_data

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_moe_upernet_ade20k.py')
DET = os.path.join(ROOT, 'tests', 'configs', 'tiny_swin_moe_mask-rcnn_coco.py')


def served_checkpoint(tmp_path, server):
    """A random Swin-MoE of the tiny configs' sizes, released on 2 ranks, converted, served."""
    torch.manual_seed(0)
    model = SwinMoE(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4),
                    window=4)
    save_released(model.state_dict(), str(tmp_path / 'swin_moe_tiny_2gpu.pth'), 2)
    checkpoint, _ = convert_released(str(tmp_path / 'swin_moe_tiny_2gpu.pth'))
    return server.serve('swin_moe_tiny.pth', checkpoint)


# 4 iterations of Mask R-CNN detect nothing yet: its evaluation runs on an empty result
@pytest.mark.parametrize('config,data,metric', [(SEG, seg_data, 'mIoU'),
                                                (DET, det_data, 'Evaluating bbox')],
                         ids=['ade20k-upernet', 'coco-mask-rcnn'])
def test_mim_train_starts_from_a_converted_swin_moe_by_url(config, data, metric, tiny_data,
                                                           tmp_path, server, hub):
    url = served_checkpoint(tmp_path, server)
    scope = 'mmseg' if config == SEG else 'mmdet'
    root = tiny_data['ade20k' if config == SEG else 'coco']
    out = run('train', scope, config, '--gpus', '0', '--work-dir', str(tmp_path / 'work'),
              '--cfg-options', f'model.backbone.init_cfg.checkpoint={url}', *data(root),
              cwd=tmp_path)
    assert f'loaded a Swin-MoE checkpoint from {url}' in out
    assert '2 loaded MoE experts (core: their mean, residuals: each expert minus it)' in out
    train_lines = [line for line in out.splitlines() if '(train)' in line and 'loss' in line]
    assert train_lines and all('loss_moe_importance' in line for line in train_lines)
    assert 'Epoch(val) [1][4/4]' in out or 'Iter(val) [4/4]' in out
    assert metric in out
    assert server.requests == ['/swin_moe_tiny.pth'] and os.listdir(hub) == ['swin_moe_tiny.pth']

"""The balance losses reach mmengine's loss parsing for segmentors and detectors."""
import os

import pytest
import torch
from mmdet.models.detectors import RetinaNet
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.registry import init_default_scope

from rmoe_plugin import rmoe_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SWIN = dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4,
                 pretrain_img_size=64, init_cfg=None, moe_cfg=dict(num_experts=4))


def tiny_detector(config):
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'coco', config))
    cfg.merge_from_dict(dict(model=dict(
        backbone=TINY_SWIN, neck=dict(in_channels=[16, 32, 64, 128], out_channels=16),
        rpn_head=dict(in_channels=16, feat_channels=16))))
    for key in ('bbox_roi_extractor', 'mask_roi_extractor'):
        cfg.model.roi_head[key].out_channels = 16
    heads = cfg.model.roi_head.bbox_head
    for head in heads if isinstance(heads, list) else [heads]:
        head.update(in_channels=16, fc_out_channels=32)
    cfg.model.roi_head.mask_head.update(in_channels=16, conv_out_channels=16)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


@pytest.mark.parametrize('config', ['mask-rcnn_rmoe-swin-t-p4-w7-e8_fpn_1x_coco.py',
                                    'cascade-mask-rcnn_rmoe-swin-t-p4-w7-e8_fpn_ms-3x_coco.py'])
def test_detector_loss_dict_holds_the_balance_loss_and_it_is_optimised(config):
    model = tiny_detector(config)
    data = model.data_preprocessor(
        demo_mm_inputs(2, image_shapes=(3, 64, 64), num_classes=80, with_mask=True), True)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert losses['loss_moe_importance'].requires_grad
    total, log_vars = model.parse_losses(losses)
    assert 'loss_moe_importance' in log_vars
    task_only, _ = model.parse_losses(
        {k: v for k, v in losses.items() if k != 'loss_moe_importance'})
    torch.testing.assert_close(total, task_only + losses['loss_moe_importance'])
    total.backward()
    router = model.backbone.moe_layers()[0].moe.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_one_line_registers_another_detector():
    cls = rmoe_model(RetinaNet)
    assert cls.__name__ == 'RMoERetinaNet' and issubclass(cls, RetinaNet)
    assert cls.loss is not RetinaNet.loss

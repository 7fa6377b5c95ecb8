"""Every shipped config builds its model through the framework's registry."""
import glob
import os

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.backbones import RMoEBackboneMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True))
BEIT_L = 'rmoe-beit-large-e8_upernet_8xb1-amp-160k_ade20k-640x640.py'
# RMoE-BEiT-L is 1247M parameters (6 GB, half a minute to build here): its structure is built
# with 4 layers of width 64.
SHRUNK = {BEIT_L: dict(model=dict(
    backbone=dict(embed_dims=64, num_heads=4, num_layers=4, out_indices=[0, 1, 2, 3]),
    neck=dict(embed_dim=64), decode_head=dict(in_channels=[64] * 4, channels=64),
    auxiliary_head=dict(in_channels=64)))}
RMOE_OF_DENSE = [  # (RMoE config, its dense config, the tiny RMoE config of the tests)
    ('configs/ade20k/rmoe-cvt-13-e8_upernet_8xb2-160k_ade20k-512x512.py',
     'configs/ade20k/cvt-13_upernet_8xb2-160k_ade20k-512x512.py',
     'tests/configs/tiny_rmoe_cvt_upernet_ade20k.py'),
    ('configs/coco/mask-rcnn_rmoe-cvt-13-e8_fpn_1x_coco.py',
     'configs/coco/mask-rcnn_cvt-13_fpn_1x_coco.py',
     'tests/configs/tiny_rmoe_cvt_mask-rcnn_coco.py'),
]


def is_dense(path):
    return 'moe' not in os.path.basename(path)  # rmoe-*, swin-moe-*


def test_there_are_configs_for_both_datasets():
    names = [os.path.relpath(c, ROOT) for c in CONFIGS]
    assert sum(n.startswith('configs/ade20k/rmoe-swin-') for n in names) == 4
    assert {n for n in names if n.startswith('configs/ade20k/') and 'swin' not in n} == {
        'configs/ade20k/cvt-13_upernet_8xb2-160k_ade20k-512x512.py',
        'configs/ade20k/rmoe-cvt-13-e8_upernet_8xb2-160k_ade20k-512x512.py',
        f'configs/ade20k/{BEIT_L}'}
    assert sum(n.startswith('configs/coco/') for n in names) == 9
    assert [n for n in names if 'swin-moe-small-' in n] == [
        'configs/ade20k/ablations/'
        'swin-moe-small-patch4-window12-e32-frozencore_upernet_8xb2-160k_ade20k-512x512.py',
        'configs/ade20k/swin-moe-small-cosine-patch4-window12-e32-in22k-192x192-pre_upernet_'
        '8xb2-160k_ade20k-512x512.py',
        'configs/ade20k/swin-moe-small-patch4-window12-e32-in22k-192x192-pre_upernet_'
        '8xb2-160k_ade20k-512x512.py',
        'configs/coco/swin-moe-small-p4-w12-e32-in22k-192-pre_mask-rcnn_fpn_1x_coco.py']
    assert sum('ablations' in n for n in names) >= 10
    assert sum(n.startswith('configs/pipeline/') for n in names) == 4


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_builds(path):
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(SHRUNK.get(os.path.basename(path), {}))
    init_default_scope(cfg.default_scope)
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, RMoEFFN)]
    if is_dense(path):  # the dense CvT configs and the dense halves of the pipelines
        assert not layers
        return
    assert type(model).__name__.startswith('RMoE')
    assert isinstance(model.backbone, RMoEBackboneMixin)
    assert type(model.backbone).__name__.startswith('RMoE')
    expected = cfg.model.backbone.moe_cfg.get('num_experts', 8)
    assert layers and all(layer.num_experts == expected for layer in layers)
    assert collect_moe_losses(model) == {}


def rmoe_part(cfg):
    return dict(model=cfg.model.type, backbone=cfg.model.backbone.type,
                moe_cfg=cfg.model.backbone.moe_cfg,
                router=cfg.optim_wrapper.paramwise_cfg.custom_keys.router)


@pytest.mark.parametrize('rmoe, dense, tiny', RMOE_OF_DENSE, ids=['upernet', 'mask-rcnn'])
def test_rmoe_cvt_configs_are_their_dense_recipe_plus_the_rmoe_lines(rmoe, dense, tiny):
    rmoe_cfg, dense_cfg = (Config.fromfile(os.path.join(ROOT, p)) for p in (rmoe, dense))
    assert dense_cfg.model.backbone.type == 'CvT'
    assert rmoe_cfg.model.backbone.arch == 'cvt-13' and 'moe_cfg' not in dense_cfg.model.backbone
    for cfg in (rmoe_cfg, dense_cfg):
        cfg.model.pop('type')
        cfg.model.backbone.pop('type')
        cfg.model.backbone.pop('moe_cfg', None)
        cfg.optim_wrapper.paramwise_cfg.custom_keys.pop('router', None)
    assert rmoe_cfg.to_dict() == dense_cfg.to_dict()
    shipped = rmoe_part(Config.fromfile(os.path.join(ROOT, rmoe)))
    tested = rmoe_part(Config.fromfile(os.path.join(ROOT, tiny)))
    assert tested['moe_cfg'].pop('num_experts') == 4
    shipped['moe_cfg'].pop('num_experts')
    assert tested == shipped



SWIN_MOE = {  # shipped config: the tiny test config with its backbone at other sizes
    'configs/ade20k/swin-moe-small-patch4-window12-e32-in22k-192x192-pre_upernet_8xb2-160k_'
    'ade20k-512x512.py': 'tests/configs/tiny_swin_moe_upernet_ade20k.py',
    'configs/coco/swin-moe-small-p4-w12-e32-in22k-192-pre_mask-rcnn_fpn_1x_coco.py':
        'tests/configs/tiny_swin_moe_mask-rcnn_coco.py'}
SIZES = ('pretrain_img_size', 'embed_dims', 'depths', 'num_heads', 'window_size')


def swin_moe_part(path):
    """What makes a backbone Swin-MoE: everything of it but its sizes and checkpoint."""
    backbone = Config.fromfile(os.path.join(ROOT, path)).model.backbone
    part = {k: backbone[k] for k in ('type', 'moe_blocks', 'moe_cfg')}
    part['moe_cfg'] = {k: v for k, v in part['moe_cfg'].items() if k != 'num_experts'}
    part['init_cfg'] = backbone.init_cfg.type
    return part, {k: backbone[k] for k in SIZES}, backbone.moe_cfg.num_experts


def test_the_swin_moe_configs_share_one_backbone_and_the_tests_use_it():
    parts = {}
    for shipped, tiny in SWIN_MOE.items():
        (part, sizes, experts), (tiny_part, tiny_sizes, tiny_experts) = map(
            swin_moe_part, (shipped, tiny))
        assert part == tiny_part and experts == 32 and tiny_experts == 4
        assert sizes == dict(pretrain_img_size=192, embed_dims=96, depths=[2, 2, 18, 2],
                             num_heads=[3, 6, 12, 24], window_size=12)
        parts[shipped] = part
    assert len({repr(p) for p in parts.values()}) == 1  # ADE20K's and COCO's are one
    cosine, _, _ = swin_moe_part('configs/ade20k/swin-moe-small-cosine-patch4-window12-e32-'
                                 'in22k-192x192-pre_upernet_8xb2-160k_ade20k-512x512.py')
    assert cosine['moe_cfg'] == dict(part['moe_cfg'], router_type='cosine', cosine_router_dims=256,
                                     cosine_router_init_temperature=0.5)

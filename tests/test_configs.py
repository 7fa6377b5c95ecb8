"""Every shipped config builds its model through the framework's registry."""
import glob
import os

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

from rmoe_plugin import RMoEFFN, collect_moe_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True))


def test_there_are_configs_for_both_datasets():
    names = [os.path.relpath(c, ROOT) for c in CONFIGS]
    assert sum(n.startswith('configs/ade20k/rmoe-swin-') for n in names) == 4
    assert sum(n.startswith('configs/coco/') for n in names) == 6
    assert sum('ablations' in n for n in names) >= 10
    assert sum(n.startswith('configs/pipeline/') for n in names) == 4


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_builds(path):
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, RMoEFFN)]
    if '_dense_' in os.path.basename(path):  # the dense halves of the pipeline configs
        assert not layers
        return
    assert type(model).__name__.startswith('RMoE')
    assert type(model.backbone).__name__.startswith('RMoESwinTransformer')
    expected = cfg.model.backbone.moe_cfg.get('num_experts', 8)
    assert layers and all(layer.num_experts == expected for layer in layers)
    assert collect_moe_losses(model) == {}

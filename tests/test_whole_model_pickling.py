"""Whole models with RMoE backbones made at build time pickle: ``copy.deepcopy``, ``pickle``
and ``torch.save(model)``, loaded again in a process that has built nothing."""
import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from openmmlab_helpers import build
from rmoe_plugin.backbones import RMoEBackboneMixin
from rmoe_plugin.backbones.checkpointing import CheckpointWithoutReentryMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEIT_SEGMENTOR = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_beit_upernet_ade20k.py')
TIMM_VIT = dict(type='RMoEBackbone', backbone_type='TIMMBackbone',
                model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=16,
                depth=4, num_heads=2, moe_cfg=dict(num_experts=2), with_cp=True)


def beit_segmentor():
    """The tiny RMoE-BEiT UperNet (``RMoEBackbone``), its blocks checkpointed."""
    cfg = Config.fromfile(BEIT_SEGMENTOR)
    cfg.model.backbone.with_cp = True
    torch.manual_seed(0)
    model = build('mmseg', cfg.model)
    model.init_weights()
    model.eval()
    return model


def timm_backbone():
    torch.manual_seed(0)
    model = build('mmpretrain', TIMM_VIT)
    model.eval()  # (returns None)
    return model


MODELS = {'beit-segmentor': (beit_segmentor, (1, 3, 64, 64)),
          'timm-backbone': (timm_backbone, (1, 3, 32, 32))}


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def made_at_build_time(model):
    return [m for m in model.modules()
            if isinstance(m, (RMoEBackboneMixin, CheckpointWithoutReentryMixin))
            and type(m).__qualname__.startswith('RMoE')]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_the_classes_made_at_build_time_are_found_by_name(name):
    model = MODELS[name][0]()
    classes = {type(m) for m in made_at_build_time(model)}
    assert len(classes) == 2  # the backbone and its blocks
    for cls in classes:
        assert pickle.loads(pickle.dumps(cls)) is cls
        assert '[' in cls.__qualname__ and cls.__name__.startswith('RMoE')


@pytest.mark.parametrize('name', sorted(MODELS))
def test_deepcopy_and_pickle_give_the_same_model(name):
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(shape)
    want = outputs(model, x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(twin) is type(model)
        for got, expected in zip(outputs(twin, x), want):
            torch.testing.assert_close(got, expected)


FRESH_PROCESS = '''
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)  # a whole model: a trusted file
x = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(x)
torch.save(list(out) if isinstance(out, (tuple, list)) else [out], sys.argv[3])
print(type(model).__name__, 'rmoe_plugin' in sys.modules)
'''


@pytest.mark.parametrize('name', sorted(MODELS))
def test_torch_save_of_a_whole_model_loads_in_a_fresh_process(name, tmp_path):
    make, shape = MODELS[name]
    model = make()
    x = torch.randn(shape)
    paths = [str(tmp_path / f) for f in ('model.pth', 'x.pth', 'out.pth')]
    torch.save(model, paths[0])
    torch.save(x, paths[1])
    # the fresh process imports nothing of the plugin itself: unpickling finds the classes
    result = subprocess.run([sys.executable, '-c', FRESH_PROCESS, *paths], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == [type(model).__name__, 'True']
    for got, want in zip(torch.load(paths[2]), outputs(model, x)):
        torch.testing.assert_close(got, want)

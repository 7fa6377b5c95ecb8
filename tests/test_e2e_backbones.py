"""`mim train` on the tiny RMoE-CvT and RMoE-BEiT configs, and the block selection and
expert tools on them: the other backbones go through the same pipeline as Swin."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIM = os.path.join(os.path.dirname(sys.executable), 'mim')
CONFIGS = {name: os.path.join(ROOT, 'tests', 'configs', f'{name}.py') for name in (
    'tiny_rmoe_cvt_upernet_ade20k', 'tiny_rmoe_beit_upernet_ade20k',
    'tiny_rmoe_cvt_mask-rcnn_coco')}


def run(args, cwd):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def data_options(scope, root):
    options = [f'{d}.dataset.data_root={root}'
               for d in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    if scope == 'mmdet':
        ann = root + 'annotations/instances_val2017.json'
        options += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    return options


def initial_checkpoint(config, scope, path):
    """The config's model as the runner initialises it, saved, so that training can start
    from known router weights (``load_from``)."""
    cfg = Config.fromfile(config)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict()}, path)
    return model.state_dict()


def moe_tensors(state_dict, kind):
    return {k: v for k, v in state_dict.items() if f'.moe.{kind}' in k}


@pytest.mark.parametrize('name, scope, dataset, extra', [
    ('tiny_rmoe_cvt_upernet_ade20k', 'mmseg', 'ade20k', []),
    # BEiT's recipe decays every weight matrix, routers included: without decay, a router
    # that moved was moved by its gradient.
    ('tiny_rmoe_beit_upernet_ade20k', 'mmseg', 'ade20k',
     ['optim_wrapper.optimizer.weight_decay=0.']),
    ('tiny_rmoe_cvt_mask-rcnn_coco', 'mmdet', 'coco', []),
], ids=['cvt-upernet', 'beit-upernet', 'cvt-mask-rcnn'])
def test_mim_train_trains_routers_and_residuals(tiny_data, tmp_path, name, scope, dataset,
                                                extra):
    config = CONFIGS[name]
    start = initial_checkpoint(config, scope, str(tmp_path / 'start.pth'))
    out = run([MIM, 'train', scope, config, '--gpus', '0', '--work-dir', str(tmp_path),
               '--cfg-options', f'load_from={tmp_path / "start.pth"}',
               *data_options(scope, tiny_data[dataset]), *extra], cwd=tmp_path)
    train_lines = [line for line in out.splitlines() if '(train)' in line]
    assert train_lines and all('loss_moe_importance' in line for line in train_lines)
    last = sorted(glob.glob(str(tmp_path / '*_*.pth')), key=os.path.getmtime)[-1]
    end = torch.load(last, map_location='cpu')['state_dict']
    for kind in ('router', 'experts.residual_weights'):
        before, after = moe_tensors(start, kind), moe_tensors(end, kind)
        assert before and before.keys() == after.keys()
        unchanged = [k for k in before if torch.equal(before[k], after[k])]
        assert not unchanged, f'no gradient reached {unchanged}'
    if 'beit' in name:  # its config logs the routing statistics every iteration
        assert 'moe/backbone.layers.1.ffn/load/0' in out
        assert 'moe/backbone.layers.3.ffn/router_entropy' in out


def test_select_moe_blocks_on_rmoe_cvt_and_the_expert_tools_on_rmoe_beit(tiny_data, tmp_path):
    out = tmp_path / 'selected.py'
    output = run([sys.executable, os.path.join(ROOT, 'tools', 'select_moe_blocks.py'),
                  CONFIGS['tiny_rmoe_cvt_upernet_ade20k'], '--num-blocks', '2',
                  '--max-images', '3', '--out', str(out), '--cfg-options',
                  f'train_dataloader.dataset.data_root={tiny_data["ade20k"]}'], cwd=tmp_path)
    assert 'list 2 block 1' in output  # the tiny CvT's block lists: 1, 1 and 2 blocks
    chosen = Config.fromfile(str(out)).model.backbone.moe_blocks
    assert len(chosen) == 3 and sum(len(b) for b in chosen) == 2

    config = CONFIGS['tiny_rmoe_beit_upernet_ade20k']
    checkpoint = str(tmp_path / 'beit.pth')
    initial_checkpoint(config, 'mmseg', checkpoint)
    image = sorted(glob.glob(os.path.join(tiny_data['ade20k'], 'images', 'validation',
                                          '*.jpg')))[0]
    output = run([sys.executable, os.path.join(ROOT, 'tools', 'visualize_experts.py'), config,
                  checkpoint, image, '--out', str(tmp_path / 'vis')], cwd=tmp_path)
    assert 'backbone.layers.1.ffn, backbone.layers.3.ffn' in output
    assert (tmp_path / 'vis' / 'expert_maps.png').stat().st_size > 0
    output = run([sys.executable, os.path.join(ROOT, 'tools', 'analyze_experts.py'), checkpoint,
                  '--out', str(tmp_path / 'analysis')], cwd=tmp_path)
    assert (tmp_path / 'analysis' / 'expert_weights.json').exists()

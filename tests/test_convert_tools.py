import hashlib
import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py')


def tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', name), *args],
                          capture_output=True, text=True, timeout=300)


def tiny_cfg():
    return Config.fromfile(SEG)


def dense_backbone():
    cfg = tiny_cfg().model.backbone
    cfg = dict(cfg, type='SwinTransformer')
    cfg.pop('moe_cfg')
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg)
    model.init_weights()
    model.eval()
    return model


def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.fixture
def dense_segmentor_ckpt(tmp_path):
    torch.manual_seed(0)
    dense = dense_backbone()
    path = str(tmp_path / 'dense.pth')
    state = {f'backbone.{k}': v for k, v in dense.state_dict().items()}
    state['decode_head.conv_seg.bias'] = torch.arange(150.0)
    torch.save({'state_dict': state, 'meta': {'note': 'dense'}}, path)
    return dense, path


def test_dense_to_rmoe_and_back(dense_segmentor_ckpt, tmp_path):
    dense, path = dense_segmentor_ckpt
    before = sha(path)
    out = str(tmp_path / 'rmoe.pth')
    result = tool('convert_dense_to_rmoe.py', path, out, '--config', SEG)
    assert result.returncode == 0, result.stderr
    assert '2 FFNs became RMoE layers' in result.stdout and 'stages.2.blocks.1.ffn' in result.stdout
    assert sha(path) == before

    with DefaultScope.overwrite_default_scope('mmseg'):
        segmentor = MODELS.build(tiny_cfg().model)
    missing, unexpected = segmentor.load_state_dict(torch.load(out)['state_dict'], strict=False)
    assert not unexpected and not [k for k in missing if k.startswith('backbone.')]
    torch.testing.assert_close(segmentor.decode_head.conv_seg.bias, torch.arange(150.0))
    segmentor.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(segmentor.backbone(x), dense(x)):
            torch.testing.assert_close(got, want)

    back = str(tmp_path / 'dense_again.pth')
    result = tool('convert_rmoe_to_dense.py', out, back)
    assert result.returncode == 0, result.stderr
    assert '2 RMoE layers folded' in result.stdout
    folded = torch.load(back)['state_dict']
    assert not any('.moe.' in k for k in folded)
    restored = dense_backbone()
    restored.load_state_dict({k[len('backbone.'):]: v for k, v in folded.items()
                              if k.startswith('backbone.')})
    with torch.no_grad():
        torch.testing.assert_close(restored(x)[-1], dense(x)[-1])


def test_converters_never_write_over_the_input_or_an_existing_file(dense_segmentor_ckpt,
                                                                    tmp_path):
    _, path = dense_segmentor_ckpt
    before = sha(path)
    result = tool('convert_dense_to_rmoe.py', path, path, '--config', SEG)
    assert result.returncode != 0 and 'is the input' in result.stderr
    existing = tmp_path / 'existing.pth'
    existing.write_bytes(b'keep me')
    result = tool('convert_rmoe_to_dense.py', path, str(existing))
    assert result.returncode != 0 and '--overwrite' in result.stderr
    assert existing.read_bytes() == b'keep me' and sha(path) == before
    result = tool('convert_rmoe_to_dense.py', path, str(tmp_path / 'x.pth'))
    assert result.returncode != 0 and 'holds no RMoE layer' in result.stderr
    assert sorted(os.listdir(tmp_path)) == ['dense.pth', 'existing.pth']


def test_converters_refuse_a_checkpoint_that_would_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ('touch should-not-exist',))
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {'a': Payload()}}, path)
    for name, extra in (('convert_rmoe_to_dense.py', []),
                        ('convert_dense_to_rmoe.py', ['--config', SEG])):
        result = tool(name, path, str(tmp_path / 'out.pth'), *extra)
        assert result.returncode != 0 and 'refusing checkpoint' in result.stderr
    assert not os.path.exists(tmp_path / 'out.pth')
    assert not os.path.exists('should-not-exist')


def test_bad_config_is_named(dense_segmentor_ckpt, tmp_path):
    _, path = dense_segmentor_ckpt
    dense_cfg = tmp_path / 'dense_cfg.py'
    dense_cfg.write_text("model = dict(backbone=dict(type='SwinTransformer'))\n")
    result = tool('convert_dense_to_rmoe.py', path, str(tmp_path / 'o.pth'),
                  '--config', str(dense_cfg))
    assert result.returncode != 0 and 'expected an RMoE backbone' in result.stderr


# ----------------------------------------------------------- other backbones: CvT, BEiT

CVT = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_cvt_upernet_ade20k.py')
BEIT = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_beit_upernet_ade20k.py')


def dense_segmentor_of(config, tmp_path):
    """The config's segmentor with a dense backbone (its RMoE type's dense one), saved."""
    cfg = Config.fromfile(config)
    backbone = dict(cfg.model.backbone)
    backbone.pop('moe_cfg')
    backbone.pop('moe_blocks', None)
    backbone['type'] = backbone.pop('backbone_type', None) or backbone['type'][len('RMoE'):]
    cfg.model.backbone = backbone
    cfg.model.type = 'EncoderDecoder'
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        dense = MODELS.build(cfg.model)
    dense.init_weights()
    with torch.no_grad():  # no zero biases or unit scales to hide a misplaced tensor
        for p in dense.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dense.eval()
    path = str(tmp_path / 'dense.pth')
    torch.save({'state_dict': dense.state_dict()}, path)
    return dense, path


def rmoe_segmentor(config, checkpoint):
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    result = model.load_state_dict(torch.load(checkpoint)['state_dict'], strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    return model.eval()


def backbone_outputs(model, x):
    with torch.no_grad():
        return model.backbone(x)


@pytest.mark.parametrize('config', [CVT, BEIT], ids=['cvt', 'beit'])
def test_dense_to_rmoe_and_back_for_other_backbones(config, tmp_path):
    dense, path = dense_segmentor_of(config, tmp_path)
    out = str(tmp_path / 'rmoe.pth')
    result = tool('convert_dense_to_rmoe.py', path, out, '--config', config)
    assert result.returncode == 0, result.stderr
    assert '2 FFNs became RMoE layers' in result.stdout
    rmoe = rmoe_segmentor(config, out)
    x = torch.randn(1, 3, 64, 64)
    for got, want in zip(backbone_outputs(rmoe, x), backbone_outputs(dense, x)):
        torch.testing.assert_close(got, want)

    back = str(tmp_path / 'dense_again.pth')
    result = tool('convert_rmoe_to_dense.py', out, back)
    assert result.returncode == 0, result.stderr
    assert '(the conversion record)' in result.stdout
    missing, unexpected = dense.load_state_dict(torch.load(back)['state_dict'])
    assert not missing and not unexpected


def test_fold_finds_the_dense_layout_from_neighbours_or_the_config(tmp_path):
    _, path = dense_segmentor_of(CVT, tmp_path)
    out = str(tmp_path / 'rmoe.pth')
    assert tool('convert_dense_to_rmoe.py', path, out, '--config', CVT).returncode == 0
    bare = str(tmp_path / 'bare.pth')  # as mim train writes it: no conversion record
    torch.save({'state_dict': torch.load(out)['state_dict']}, bare)

    result = tool('convert_rmoe_to_dense.py', bare, str(tmp_path / 'guessed.pth'))
    assert result.returncode == 0, result.stderr
    assert 'stage2.blocks.1.mlp: fc1, fc2 (the dense FFNs beside it)' in result.stdout
    # stage 1 of the tiny CvT has one block, an RMoE one: nothing beside it to go by.
    assert 'stage1.blocks.0.mlp: layers.0.0, layers.1 (assumed an mmcv FFN; give --config' \
        in result.stdout

    result = tool('convert_rmoe_to_dense.py', bare, str(tmp_path / 'exact.pth'),
                  '--config', CVT)
    assert result.returncode == 0, result.stderr
    assert 'stage1.blocks.0.mlp: fc1, fc2 (--config)' in result.stdout
    folded = torch.load(str(tmp_path / 'exact.pth'))['state_dict']
    assert 'backbone.stage1.blocks.0.mlp.fc1.weight' in folded


def test_a_config_without_moe_cfg_is_named(dense_segmentor_ckpt, tmp_path):
    _, path = dense_segmentor_ckpt
    cfg = tmp_path / 'no_moe_cfg.py'
    cfg.write_text(f"_base_ = ['{SEG}']\nmodel = dict(backbone=dict(moe_cfg=None))\n")
    result = tool('convert_dense_to_rmoe.py', path, str(tmp_path / 'o.pth'), '--config', str(cfg))
    assert result.returncode != 0 and 'model.backbone has no moe_cfg' in result.stderr
    assert 'KeyError' not in result.stderr and not os.path.exists(tmp_path / 'o.pth')

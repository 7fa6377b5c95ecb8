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

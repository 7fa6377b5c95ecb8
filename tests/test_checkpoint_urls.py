"""Checkpoints by URL, as the shipped configs name them: served from a loopback HTTP server
and loaded through a shipped config's own ``init_cfg``, through ``load_from`` and through the
converter, the RMoE model equals the upstream dense model loaded the same way.

The shipped configs are loaded as they are, their checkpoint URL swapped for the loopback one
and only their widths shrunk (``embed_dims``, heads, head channels) for the CPU; depths,
window sizes, ``convert_weights`` and the MoE blocks stay. The download cache is the test's.
"""
import copy
import os
import socket
import subprocess
import sys

import pytest
import timm
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mmengine_checkpoint

from openmmlab_helpers import build
import rmoe_plugin  # noqa: F401  (registers the RMoE modules)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADE20K = os.path.join(
    ROOT, 'configs', 'ade20k',
    'rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py')
COCO = os.path.join(ROOT, 'configs', 'coco', 'mask-rcnn_rmoe-swin-t-p4-w7-e8_fpn_1x_coco.py')
UPSTREAM_URLS = {ADE20K: 'https://download.openmmlab.com/', COCO: 'https://github.com/'}
SMALL = dict(embed_dims=16, num_heads=[1, 2, 4, 8])  # Swin-T's depths and windows, narrower
SMALL_HEADS = dict(
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16),
    auxiliary_head=dict(in_channels=64, channels=16))


def shipped_config(path, url):
    """The shipped config, its backbone narrowed and its checkpoint URL swapped for ``url``."""
    cfg = Config.fromfile(path)
    backbone = cfg.model.backbone
    assert backbone.init_cfg.checkpoint.startswith(UPSTREAM_URLS[path])
    backbone.update(SMALL)
    backbone.init_cfg.checkpoint = url
    if path == ADE20K:
        cfg.merge_from_dict(dict(model=SMALL_HEADS))
    return cfg


def dense_of(model_cfg):
    """The upstream dense model of an RMoE model config: same arguments, no MoE."""
    dense = copy.deepcopy(model_cfg)
    dense.backbone.type = 'SwinTransformer'
    dense.backbone.pop('moe_cfg')
    dense.type = dict(RMoEEncoderDecoder='EncoderDecoder', RMoEMaskRCNN='MaskRCNN')[dense.type]
    return dense


def images():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


def assert_same_outputs(got, want, **forward):
    """Equal outputs in float64 (in float32 the two sum in different orders; a weight that
    failed to load differs by far more than either's rounding)."""
    got.double().eval()
    want.double().eval()
    with torch.no_grad():
        a, b = got(images(), **forward), want(images(), **forward)
    for x, y in zip(*[[a] if torch.is_tensor(a) else a, [b] if torch.is_tensor(b) else b]):
        torch.testing.assert_close(x, y)


def random_dense(scope, cfg):
    torch.manual_seed(1)
    model = build(scope, cfg)
    with torch.no_grad():  # away from the initial values, norms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def official_swin_state_dict():
    """A randomly initialised Swin-T of the narrow widths, in microsoft/Swin-Transformer's
    layout (what the COCO config's URL holds): timm's keys, PatchMerging one stage up."""
    torch.manual_seed(2)
    model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                              embed_dim=SMALL['embed_dims'], num_heads=SMALL['num_heads'])
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split('.')
        if parts[0] == 'layers' and parts[2] == 'downsample':
            parts[1] = str(int(parts[1]) - 1)
        out['.'.join(parts).replace('head.fc.', 'head.')] = value
    return out


def test_the_ade20k_config_loads_its_url_into_the_cores_once(server, hub):
    dense_backbone = random_dense('mmseg', dict(
        dense_of(shipped_config(ADE20K, '').model).backbone, init_cfg=None))
    served = dense_backbone.state_dict()
    url = server.serve('swin_tiny_patch4_window7_224.pth', served)  # the upstream's layout
    cfg = shipped_config(ADE20K, url)
    rmoe = build('mmseg', cfg.model.backbone)
    rmoe.init_weights()
    dense = build('mmseg', dense_of(cfg.model).backbone)
    dense.init_weights()  # upstream mmseg's own loading of the same URL
    assert server.requests == ['/swin_tiny_patch4_window7_224.pth']  # the second: from cache
    assert os.listdir(hub) == ['swin_tiny_patch4_window7_224.pth']
    assert rmoe.moe_layer_names == ['stages.2.blocks.1.ffn', 'stages.2.blocks.3.ffn',
                                    'stages.2.blocks.5.ffn', 'stages.3.blocks.1.ffn']
    core = rmoe.stages[3].blocks[1].ffn.moe.experts.core_weights[0]
    torch.testing.assert_close(core, served['stages.3.blocks.1.ffn.layers.0.0.weight'])
    assert_same_outputs(rmoe, dense)
    assert_same_outputs(dense, dense_backbone)


def test_the_coco_config_loads_its_official_layout_url(server, hub):
    official = official_swin_state_dict()
    url = server.serve('swin_tiny_patch4_window7_224.pth', {'model': official})
    cfg = shipped_config(COCO, url)
    assert cfg.model.backbone.convert_weights  # the URL holds the official layout
    rmoe = build('mmdet', cfg.model.backbone)
    rmoe.init_weights()
    dense = build('mmdet', dense_of(cfg.model).backbone)
    dense.init_weights()
    assert server.requests == ['/swin_tiny_patch4_window7_224.pth']
    core = rmoe.stages[2].blocks[5].ffn.moe.experts.core_weights[1]
    torch.testing.assert_close(core, official['layers.2.blocks.5.mlp.fc2.weight'])
    assert_same_outputs(rmoe, dense)


def dense_segmentor_checkpoint():
    """A dense UperNet of the narrowed ADE20K config, as ``{'state_dict': ...}``."""
    cfg = dense_of(shipped_config(ADE20K, '').model)
    cfg.backbone.init_cfg = None
    model = random_dense('mmseg', cfg)
    return model, {'state_dict': model.state_dict(), 'meta': {}}


def test_load_from_a_url_makes_the_dense_ffns_the_cores(server, hub, tmp_path):
    dense, checkpoint = dense_segmentor_checkpoint()
    cfg = shipped_config(ADE20K, 'unused')
    cfg.model.backbone.init_cfg = None
    cfg.work_dir = str(tmp_path / 'work')
    cfg.load_from = server.serve('upernet_swin.pth', checkpoint)
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()  # what runner.train() and runner.test() start with
    assert server.requests == ['/upernet_swin.pth']
    assert_same_outputs(runner.model, dense, mode='tensor')


def test_the_converter_reads_a_url(server, hub, tmp_path):
    dense, checkpoint = dense_segmentor_checkpoint()
    url = server.serve('upernet_swin.pth', checkpoint)
    config = tmp_path / 'narrow.py'  # the shipped config, narrowed as above
    config.write_text(f'_base_ = [{ADE20K!r}]\nmodel = dict(backbone={SMALL!r}, '
                      f'decode_head={SMALL_HEADS["decode_head"]!r}, '
                      f'auxiliary_head={SMALL_HEADS["auxiliary_head"]!r})\n')
    out = tmp_path / 'rmoe.pth'
    convert = [sys.executable, os.path.join(ROOT, 'tools', 'convert_dense_to_rmoe.py')]
    env = dict(os.environ, TORCH_HOME=os.environ['TORCH_HOME'])
    result = subprocess.run([*convert, url, str(out), '--config', str(config)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert server.requests == ['/upernet_swin.pth'] and os.listdir(hub) == ['upernet_swin.pth']
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None
    rmoe = build('mmseg', cfg.model)
    missing, unexpected = rmoe.load_state_dict(torch.load(out)['state_dict'])
    assert not missing and not unexpected
    assert rmoe.backbone.stages[2].blocks[1].ffn.num_experts == 8
    assert_same_outputs(rmoe, dense, mode='tensor')

    missing_url = server.url('missing.pth')
    result = subprocess.run([*convert, missing_url, str(tmp_path / 'x.pth'), '--config',
                             str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"error: checkpoint '{missing_url}' could not be downloaded: HTTP 404" in result.stderr
    assert not (tmp_path / 'x.pth').exists()


@pytest.fixture
def refused_url():
    """A URL on a port that is bound but not listening: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        yield f'http://127.0.0.1:{s.getsockname()[1]}/swin.pth'


def test_a_url_that_fails_is_named_with_its_reason(server, hub, refused_url):
    for url, reason in ((server.url('nowhere/swin.pth'), 'HTTP 404 Not Found'),
                        (refused_url, 'Connection refused')):
        rmoe = build('mmseg', shipped_config(ADE20K, url).model.backbone)
        with pytest.raises(FileNotFoundError) as error:
            rmoe.init_weights()
        assert f"checkpoint '{url}' could not be downloaded: " in str(error.value)
        assert reason in str(error.value)
    assert not hub.exists() or os.listdir(hub) == []  # nothing half downloaded is kept


class MakeFolder:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path, ))


def test_a_url_pickle_that_would_run_code_is_refused_everywhere(server, hub, tmp_path):
    marker = tmp_path / 'code-ran'
    url = server.serve('swin.pth', {'state_dict': {}, 'meta': MakeFolder(marker)})
    cfg = shipped_config(ADE20K, url)
    for backbone in (cfg.model.backbone, dense_of(cfg.model).backbone):  # ours, upstream's
        with pytest.raises(ValueError, match=f"refusing checkpoint '{url}'.*posix.mkdir"):
            build('mmseg', backbone).init_weights()
    cfg.model.backbone.init_cfg = None
    cfg.work_dir, cfg.load_from = str(tmp_path / 'work'), url
    with pytest.raises(ValueError, match='refusing checkpoint'):
        Runner.from_cfg(cfg).load_or_resume()
    assert not marker.exists() and server.requests == ['/swin.pth']
    mmengine_checkpoint.load_from_http(url)  # mmengine's own URL loader would have run it
    assert marker.exists()


def test_the_converter_gives_timm_a_checkpoint_served_by_url(server, hub):
    from rmoe_plugin.backbones.moe_conversion import dense_to_rmoe_checkpoint
    timm_args = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2)
    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', **timm_args)
    url = server.serve('vit.pth', dense.state_dict())
    cfg = dict(type='RMoEBackbone', backbone_type='TIMMBackbone',
               model_name='vit_tiny_patch16_224', **timm_args, moe_cfg=dict(num_experts=4))
    converted, _ = dense_to_rmoe_checkpoint(url, cfg, 'mmpretrain')
    core = converted['state_dict']['backbone.timm_model.blocks.1.mlp.moe.experts.core_weights.0']
    assert torch.equal(core, dense.state_dict()['blocks.1.mlp.fc1.weight'])
    assert converted['meta']['rmoe_conversion']['source'] == url
    assert server.requests == ['/vit.pth']

"""Released Swin-MoE checkpoints become RMoESwinTransformer backbones with the same function.

A Swin-MoE written in the tests (``swin_moe_reference.py``) with random weights is saved in
the released layout on 1, 2, 4 and 8 ranks (8: each of the 4 experts sharded over 2 ranks),
converted, and loaded through the shipped configs' backbone dicts (widths shrunk, windows and
MoE rules as shipped); the mmseg and the mmdet backbone give the reference's stage outputs in
eval and in training mode. Every stage is larger than the window there: official Swin does
not shift, and mmseg pads, where it is not.
"""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from openmmlab_helpers import build
from rmoe_plugin.analysis.weights import analyze_state_dict
from rmoe_plugin.engine.swin_moe import convert_released, read_released, to_released
from swin_moe_reference import (SwinMoE, load_pretrained, reference_outputs, save_released,
                                stage_outputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = os.path.join(ROOT, 'configs', 'ade20k', 'swin-moe-small-patch4-window12-e32-in22k-'
                   '192x192-pre_upernet_8xb2-160k_ade20k-512x512.py')
DET = os.path.join(ROOT, 'configs', 'coco',
                   'swin-moe-small-p4-w12-e32-in22k-192-pre_mask-rcnn_fpn_1x_coco.py')
CONFIG = dict(mmseg=SEG, mmdet=DET)
TOOL = os.path.join(ROOT, 'tools', 'convert_swin_moe.py')
TINY = dict(embed_dims=16, depths=[2, 2, 4, 2], num_heads=[1, 2, 2, 4], window_size=2,
            pretrain_img_size=128, drop_path_rate=0.0)


def reference(seed=1, **kwargs):
    torch.manual_seed(seed)
    return SwinMoE(**kwargs)


def images(size=128, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def backbone_cfg(scope, checkpoint, sizes=TINY, **moe):
    """The shipped config's backbone dict at other sizes: 4 experts, no noise, no drop."""
    cfg = Config.fromfile(CONFIG[scope]).model.backbone
    cfg.update(sizes)
    cfg.moe_cfg.update(dict(num_experts=4, gate_noise=0.0, capacity_factor=4.0), **moe)
    cfg.init_cfg.checkpoint = checkpoint
    return cfg


def loaded(scope, checkpoint, sizes=TINY, **moe):
    backbone = build(scope, backbone_cfg(scope, checkpoint, sizes, **moe))
    backbone.init_weights()
    return backbone


def converted(tmp_path, model, num_ranks, window_size=None, **save):
    name = str(tmp_path / f'swin_moe_{num_ranks}gpu.pth')
    save_released(model.state_dict(), name, num_ranks, **save)
    checkpoint, _ = convert_released(name, window_size)
    path = str(tmp_path / f'converted_{num_ranks}.pth')
    torch.save(checkpoint, path)
    return path


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def digests(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), 'rb').read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def test_the_converted_checkpoint_does_not_depend_on_the_rank_files(tmp_path):
    model = reference()
    state = model.state_dict()
    layouts = dict(one=dict(num_ranks=1), two=dict(num_ranks=2), four=dict(num_ranks=4),
                   sharded=dict(num_ranks=8), legacy=dict(num_ranks=2, legacy_bias=True),
                   merged=dict(num_ranks=1, merged=True))
    results = {}
    # one file merged from the rank files and .master (as tutel.checkpoint.gather and a copy of
    # .master give it): the frozen fc2 biases are rank 0's, one expert's
    folder = tmp_path / 'merged_with_master'
    folder.mkdir()
    merged = {k: v[:1] if k.endswith('batched_fc2_bias') else v for k, v in state.items()}
    torch.save({'model': merged}, folder / 'swin_moe.pth')
    results['merged_with_master'] = convert_released(str(folder / 'swin_moe.pth'))[0]
    for name, layout in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        save_released(state, str(folder / 'swin_moe.pth'), **layout)
        checkpoint, summary = convert_released(str(folder / 'swin_moe.pth'))
        results[name] = checkpoint
        expected_ranks = 1 if name == 'merged' else layout['num_ranks']
        assert f'ranks: {expected_ranks}; experts: 4' in summary[1]
    reference_state = results['one']['state_dict']
    for name, checkpoint in results.items():
        assert list(checkpoint['state_dict']) == list(reference_state), name
        for key, value in checkpoint['state_dict'].items():
            assert torch.equal(value, reference_state[key]), (name, key)
    assert results['sharded']['meta']['swin_moe']['moe_layers']['stages.2.blocks.1.ffn'] == \
        dict(num_experts=4, shards=2, router='linear')
    experts = reference_state['backbone.stages.3.blocks.1.ffn.moe.experts.weights.1']
    expert_layer = model.layers[3].blocks[1].mlp._moe_layer.experts
    assert torch.equal(experts, expert_layer.batched_fc2_w.detach().transpose(1, 2))


def test_tutels_expert_count_tells_the_shards_without_a_dense_block(tmp_path):
    model = reference(depths=(2, 2, 2, 2), moe_blocks=[[], [], [0, 1], [0, 1]])  # all MoE
    name = str(tmp_path / 'swin_moe.pth')
    save_released(model.state_dict(), name, 8)
    master = torch.load(name + '.master')
    for stage in (2, 3):
        for block in (0, 1):
            master['model'][f'layers.{stage}.blocks.{block}.mlp._moe_layer.'
                            '_num_global_experts'] = torch.tensor(4)
    torch.save(master, name + '.master')
    state, info = read_released(name)
    assert {v['shards'] for v in info['moe_layers'].values()} == {2}
    fc1 = model.layers[2].blocks[0].mlp._moe_layer.experts.batched_fc1_w
    assert torch.equal(state['layers.2.blocks.0.mlp._moe_layer.experts.batched_fc1_w'], fc1)


@pytest.mark.parametrize('scope,cosine,save', [
    ('mmseg', False, dict(num_ranks=4)),
    ('mmseg', True, dict(num_ranks=1)),
    ('mmdet', False, dict(num_ranks=8)),  # each expert's hidden units over 2 ranks
    ('mmdet', True, dict(num_ranks=2, legacy_bias=True)),
], ids=['mmseg-linear-4ranks', 'mmseg-cosine-1rank', 'mmdet-linear-sharded',
        'mmdet-cosine-2ranks-2022-biases'])
def test_the_backbone_computes_what_swin_moe_computes(scope, cosine, save, tmp_path):
    model = reference(cosine=cosine)
    path = converted(tmp_path, model, **save)
    backbone = loaded(scope, path, router_type='cosine' if cosine else 'linear')
    assert backbone.moe_layer_names == ['stages.2.blocks.1.ffn', 'stages.2.blocks.3.ffn',
                                        'stages.3.blocks.1.ffn']
    x = images()
    for train in (False, True):
        assert_same(stage_outputs(backbone, x, train), reference_outputs(model, x, train))
    experts = backbone.stages[2].blocks[3].ffn.moe.experts
    fc1 = model.layers[2].blocks[3].mlp._moe_layer.experts.batched_fc1_w.detach()
    torch.testing.assert_close(experts.core_weights[0], fc1.mean(0))  # core: the mean
    torch.testing.assert_close(experts.residual_weights[0], fc1 - fc1.mean(0))


def test_the_position_bias_is_evaluated_at_the_new_window(tmp_path):
    # Pre-trained at 64x64 with window 4: stage 3 (4x4) and stage 4 (2x2) are one window each,
    # of 4 and 2, so stage 4's position bias was normalised by a window of 2.
    small = reference(img_size=64, window=4)
    path = converted(tmp_path, small, num_ranks=2, window_size=4)
    # The same weights at 256x256: every stage larger than the window of 4, and stage 4's
    # coordinates normalised by its pre-training window, as pretrained_window_size does.
    large = reference(img_size=256, window=4, pretrained_windows=(4, 4, 4, 2))
    load_pretrained(large, small.state_dict())
    sizes = dict(TINY, window_size=4, pretrain_img_size=64)
    backbone = loaded('mmseg', path, sizes)
    x = images(256, n=1)
    assert_same(stage_outputs(backbone, x, False), reference_outputs(large, x, False))


def test_init_cfg_reads_the_released_files_and_urls(tmp_path, server, hub):
    model = reference()
    name = str(tmp_path / 'swin_moe_2gpu.pth')
    save_released(model.state_dict(), name, 2)
    merged = str(tmp_path / 'merged.pth')
    save_released(model.state_dict(), merged, 1, merged=True)
    checkpoint, _ = convert_released(name)
    url = server.serve('swin_moe_converted.pth', checkpoint)
    x = images()
    want = reference_outputs(model, x, False)
    for source in (name, name + '.rank1', merged, url):
        assert_same(stage_outputs(loaded('mmseg', source), x, False), want)
    assert server.requests == ['/swin_moe_converted.pth']
    path = str(tmp_path / 'converted.pth')  # load_from: mmengine's loading of the whole model
    torch.save(checkpoint, path)
    segmentor_cfg = Config.fromfile(SEG).model
    segmentor_cfg.backbone = backbone_cfg('mmseg', None)
    segmentor_cfg.backbone.init_cfg = None
    segmentor = build('mmseg', segmentor_cfg)
    load_checkpoint(segmentor, path, map_location='cpu')
    assert_same(stage_outputs(segmentor.backbone, x, False), want)


def test_analyze_experts_sees_the_experts_around_their_mean(tmp_path):
    model = reference()
    checkpoint = torch.load(converted(tmp_path, model, 2))
    results = analyze_state_dict(checkpoint['state_dict'])
    assert list(results) == [f'backbone.stages.{s}.blocks.{b}.ffn'
                             for s, b in ((2, 1), (2, 3), (3, 1))]
    layer = results['backbone.stages.3.blocks.1.ffn']
    experts = model.layers[3].blocks[1].mlp._moe_layer.experts
    weights = [experts.batched_fc1_w, experts.batched_fc2_w, experts.batched_fc1_bias,
               experts.batched_fc2_bias]
    residuals = torch.cat([(w - w.mean(0)).reshape(4, -1) for w in weights], dim=1)
    core = torch.cat([w.mean(0).flatten() for w in weights])
    assert layer['num_experts'] == 4
    assert layer['core_norm'] == pytest.approx(core.norm().item(), rel=1e-5)
    assert layer['residual_norm'] == pytest.approx(residuals.norm(dim=1).tolist(), rel=1e-5)


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def released_state(path):
    return torch.load(path, weights_only=True)['model']


def assert_same_files(written, expected):
    for got_path, want_path in zip(written, expected):
        got, want = released_state(got_path), released_state(want_path)
        assert list(got) == sorted(want, key=lambda k: [int(p) if p.isdigit() else p
                                                        for p in k.split('.')]), got_path
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_the_tool_goes_to_the_released_layout_and_back_exactly(tmp_path):
    source, back = tmp_path / 'source', tmp_path / 'back'
    source.mkdir(), back.mkdir()
    model = reference()
    original = save_released(model.state_dict(), str(source / 'swin_moe_2gpu.pth'), 2)
    before = digests(source)
    out = tmp_path / 'converted.pth'
    result = run_tool(source / 'swin_moe_2gpu.pth', out)
    assert result.returncode == 0, result.stderr
    assert 'ranks: 2; experts: 4; router: linear' in result.stdout
    assert 'MoE blocks (3): stages.2.blocks.1.ffn, stages.2.blocks.3.ffn' in result.stdout
    result = run_tool('--to-released', out, back / 'swin_moe_2gpu.pth', '--ranks', 2)
    assert result.returncode == 0, result.stderr
    assert_same_files([str(back / os.path.basename(p)) for p in original], original)
    # on 8 ranks: as Swin-Transformer saves 4 experts trained on 8 GPUs
    sharded = save_released(model.state_dict(), str(tmp_path / 'sharded.pth'), 8)
    result = run_tool('--to-released', out, back / 'eight.pth', '--ranks', 8)
    assert result.returncode == 0, result.stderr
    assert_same_files([str(back / ('eight.pth' + p[len(str(tmp_path / 'sharded.pth')):]))
                       for p in sharded], sharded)
    assert digests(source) == before
    result = run_tool('--to-released', out, back / 'swin_moe_2gpu.pth', '--ranks', 2)
    assert result.returncode != 0 and 'exists; pass --overwrite' in result.stderr


@pytest.mark.parametrize('save', [dict(legacy_bias=True), dict(frozen_fc2_bias=False)],
                         ids=['2022-biases', 'trained-fc2-bias'])
def test_other_released_layouts_round_trip(save, tmp_path):
    model = reference(fc2_bias=not save.get('frozen_fc2_bias', True))
    files = save_released(model.state_dict(), str(tmp_path / 'swin_moe.pth'), 4, **save)
    checkpoint, _ = convert_released(str(tmp_path / 'swin_moe.pth'))
    backbone = {k[len('backbone.'):]: v for k, v in checkpoint['state_dict'].items()}
    written, _ = to_released(backbone, checkpoint['meta']['swin_moe'], 4)
    for part, path in zip(written, files):
        want = released_state(path)
        assert set(written[part]) == set(want)
        assert all(torch.equal(written[part][k], want[k]) for k in want), part


def test_a_trained_backbone_runs_in_swin_transformer(tmp_path):
    model = reference()
    path = converted(tmp_path, model, 2)
    backbone = loaded('mmseg', path)
    with torch.no_grad():  # "training": everything moves but the position bias tables
        for name, p in backbone.named_parameters():
            if 'relative_position_bias_table' not in name:
                p.add_(torch.randn_like(p) * 0.02)
    trained = tmp_path / 'iter_100.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()},
                'meta': {}}, trained)
    result = run_tool('--to-released', trained, tmp_path / 'out.pth', '--ranks', 1)
    assert result.returncode != 0 and "--reference" in result.stderr
    result = run_tool('--to-released', trained, tmp_path / 'out.pth', '--ranks', 1,
                      '--reference', path)
    assert result.returncode == 0, result.stderr
    assert 'dense fc2 biases are non-zero' in result.stdout  # trained: MLP_FC2_BIAS: True
    swin = reference(fc2_bias=True)  # Swin-Transformer on one GPU: .master + .rank0
    load_pretrained(swin, {**released_state(tmp_path / 'out.pth.master'),
                           **released_state(tmp_path / 'out.pth.rank0')})
    x = images()
    assert_same(stage_outputs(backbone, x, False), reference_outputs(swin, x, False))

    with torch.no_grad():
        backbone.stages[0].blocks[0].attn.w_msa.relative_position_bias_table.add_(0.1)
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()}},
               trained)
    result = run_tool('--to-released', trained, tmp_path / 'out2.pth', '--ranks', 1,
                      '--reference', path)
    assert result.returncode != 0
    assert 'stages.0.blocks.0.attn.w_msa.relative_position_bias_table' in result.stderr
    assert '--force-position-bias' in result.stderr


# ------------------------------------------------------------------------------ bad input

@pytest.fixture
def released(tmp_path):
    """A reference Swin-MoE saved on 4 ranks, in its own folder."""
    folder = tmp_path / 'released'
    folder.mkdir()
    model = reference()
    save_released(model.state_dict(), str(folder / 'swin_moe_4gpu.pth'), 4)
    return model, str(folder / 'swin_moe_4gpu.pth')


def edit(path, change):
    checkpoint = torch.load(path)
    change(checkpoint['model'])
    torch.save(checkpoint, path)


def test_a_missing_rank_file_is_named(released):
    _, name = released
    os.remove(name + '.rank3')  # the last: the 4gpu in the name says it is missing
    with pytest.raises(FileNotFoundError, match=r'swin_moe_4gpu.pth.rank3 is missing'):
        read_released(name)
    os.remove(name + '.rank1')
    with pytest.raises(FileNotFoundError, match=r'swin_moe_4gpu.pth.rank1 is missing'):
        read_released(name, num_ranks=3)


def test_a_truncated_file_is_named(released):
    _, name = released
    data = open(name + '.rank2', 'rb').read()
    open(name + '.rank2', 'wb').write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"swin_moe_4gpu.pth.rank2' is not a readable"):
        read_released(name)


def test_a_rank_file_of_another_shape_is_named(released):
    _, name = released
    key = 'layers.2.blocks.3.mlp._moe_layer.experts.batched_fc1_w'
    edit(name + '.rank1', lambda state: state.__setitem__(key, torch.zeros(2, 256, 64)))
    with pytest.raises(ValueError, match=rf'rank1: {key!r} has shape \(2, 256, 64\)'):
        read_released(name)


def test_an_unknown_key_is_named(released):
    _, name = released
    key = 'layers.1.blocks.0.attn.relative_position_bias_table'
    edit(name + '.master', lambda state: state.__setitem__(key, torch.zeros(9, 2)))
    with pytest.raises(ValueError, match=rf"master: key {key!r} is not part of a Swin-MoE"):
        read_released(name)


def test_a_checkpoint_that_is_not_swin_moe_is_refused(tmp_path):
    import timm
    dense = timm.create_model('swin_tiny_patch4_window7_224', embed_dim=16,
                              num_heads=[1, 2, 2, 4]).state_dict()
    path = str(tmp_path / 'swin_tiny.pth')
    torch.save({'model': dense}, path)
    with pytest.raises(ValueError, match='not a Swin-MoE checkpoint'):
        read_released(path)
    result = run_tool(path, tmp_path / 'out.pth')
    assert result.returncode != 0 and 'not a Swin-MoE checkpoint' in result.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_frozen_expert_tensors_that_differ_are_refused(released):
    _, name = released
    key = 'layers.3.blocks.1.mlp._moe_layer.experts.batched_fc2_bias'
    edit(name + '.master', lambda state: state[key].normal_())
    with pytest.raises(ValueError, match="frozen parameter, saved from rank 0 only"):
        read_released(name)


@pytest.mark.parametrize('change,message', [
    (dict(moe_cfg=dict(num_experts=8)),
     r'stages.2.blocks.1.ffn.moe.experts.weights.0: the checkpoint has 4 experts, the '
     r'backbone 8 \(moe_cfg.num_experts\)'),
    (dict(moe_cfg=dict(router_type='cosine')), r'moe_cfg.router_type'),
    (dict(window_size=4), r'convert again with --window-size'),
    (dict(moe_blocks='all'), r'stages.0.blocks.0.ffn.moe: an MoE layer of the backbone'),
], ids=['experts', 'router', 'window', 'moe_blocks'])
def test_a_config_the_checkpoint_does_not_fit_is_refused(change, message, released, tmp_path):
    model, name = released
    checkpoint, _ = convert_released(name)
    path = str(tmp_path / 'converted.pth')
    torch.save(checkpoint, path)
    before = digests(os.path.dirname(name))
    cfg = backbone_cfg('mmseg', path)
    cfg.moe_cfg.update(change.pop('moe_cfg', {}))
    cfg.update(change)
    with pytest.raises(ValueError, match=message) as error:
        build('mmseg', cfg).init_weights()
    assert f'Swin-MoE checkpoint {path} does not fit' in str(error.value)
    assert digests(os.path.dirname(name)) == before


def test_load_state_dict_refuses_another_expert_count(released):
    _, name = released
    checkpoint, _ = convert_released(name)
    state = {k[len('backbone.'):]: v for k, v in checkpoint['state_dict'].items()}
    cfg = backbone_cfg('mmseg', None, num_experts=8)
    cfg.init_cfg = None
    with pytest.raises(ValueError, match=r'stages.2.blocks.1.ffn.moe.experts.residual_'
                                         r'weights.0: the checkpoint holds 4 experts'):
        build('mmseg', cfg).load_state_dict(state, strict=False)


def test_the_tool_names_a_missing_rank_and_writes_nothing(released, tmp_path):
    _, name = released
    before = digests(os.path.dirname(name))
    result = run_tool(name + '.rank0', name + '.master')
    assert result.returncode != 0 and 'is the input' in result.stderr
    assert digests(os.path.dirname(name)) == before
    os.remove(name + '.rank2')
    before = digests(os.path.dirname(name))
    result = run_tool(name, tmp_path / 'out.pth')
    assert result.returncode != 0
    assert 'error: Swin-MoE checkpoint' in result.stderr and '.rank2 is missing' in result.stderr
    assert digests(os.path.dirname(name)) == before
    assert not (tmp_path / 'out.pth').exists()

"""The CvT backbone, dense and RMoE: official weights and outputs, arguments, configs.

``fixtures/cvt_tiny_official.pth`` holds what the official microsoft/CvT code computes for a
tiny CvT (see ``fixtures/README.md``); the tests load its state dict the way a config does and
compare stage by stage.
"""
import os

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

from openmmlab_helpers import build, logged_messages
from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.backbones import RMoECvT
from rmoe_plugin.backbones.cvt import ARCH_KEYS, ARCH_SETTINGS, CvT, QuickGELU, resolve_arch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'fixtures', 'cvt_tiny_official.pth')
CLASSIFIER_ONLY = {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}


@pytest.fixture(scope='module')
def reference():
    return torch.load(FIXTURE, map_location='cpu', weights_only=True)


def arch_of(spec: dict) -> dict:
    """Our ``arch`` dict from an official yaml SPEC: its names in lower case."""
    return {key: spec[key.upper()] for key in ARCH_KEYS}


def save(tmp_path, checkpoint, name='cvt.pth') -> str:
    path = str(tmp_path / name)
    torch.save(checkpoint, path)
    return path


def pretrained(path: str) -> ConfigDict:
    return ConfigDict(type='Pretrained', checkpoint=path)


def tiny(reference, **kwargs) -> CvT:
    kwargs.setdefault('drop_path_rate', 0.0)
    return CvT(arch_of(reference['spec']), **kwargs)


def loaded(reference, path, **kwargs) -> CvT:
    """The tiny CvT initialised from ``path`` through ``init_cfg``, in eval mode."""
    model = tiny(reference, init_cfg=pretrained(path), **kwargs)
    model.init_weights()
    return model.eval()





def assert_maps_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- against the official model

def test_official_classifier_checkpoint_reproduces_official_stage_outputs(reference, tmp_path):
    path = save(tmp_path, reference['state_dict'])  # the official layout: keys at top level
    with logged_messages() as messages:
        model = loaded(reference, path)
    assert not [m for m in messages if 'missing' in m or 'unexpected' in m]
    with torch.no_grad():
        assert_maps_close(model(reference['input']), reference['outputs'])


def test_training_mode_batch_statistics_match_official(reference, tmp_path):
    model = loaded(reference, save(tmp_path, reference['state_dict'])).train()
    with torch.no_grad():
        assert_maps_close(model(reference['input']), reference['train_outputs'])


def test_odd_input_size_matches_official(reference, tmp_path):
    model = loaded(reference, save(tmp_path, reference['state_dict']))
    assert reference['odd_input'].shape[2:] == (33, 47)
    with torch.no_grad():
        assert_maps_close(model(reference['odd_input']), reference['odd_outputs'])


def test_last_stage_cls_token_matches_official_but_is_not_output(reference, tmp_path):
    model = loaded(reference, save(tmp_path, reference['state_dict']))
    x = reference['input']
    with torch.no_grad():
        for stage in model.stages():
            x, cls_token = stage(x)
    torch.testing.assert_close(cls_token, reference['cls_token'], rtol=1e-5, atol=1e-5)
    assert model(reference['input'])[-1].shape == reference['outputs'][-1].shape


def test_cvt13_state_dict_keys_and_shapes_are_the_official_ones(reference):
    official = reference['cvt13_shapes']
    ours = {k: list(v.shape) for k, v in CvT('cvt-13').state_dict().items()}
    assert set(official) - set(ours) == CLASSIFIER_ONLY
    assert ours == {k: v for k, v in official.items() if k not in CLASSIFIER_ONLY}
    assert 'stage2.cls_token' in ours and 'stage1.cls_token' not in ours
    assert 'stage2.blocks.9.attn.conv_proj_q.bn.running_var' in ours


def drop_path_probs(stage):
    return [getattr(block.drop_path, 'drop_prob', 0.0) for block in stage.blocks]


@pytest.mark.parametrize('name', sorted(ARCH_SETTINGS))
def test_arch_settings_are_the_official_yaml_specs(reference, name):
    spec = reference['official_specs'][name]
    assert resolve_arch(name) == arch_of(spec)
    assert spec['QKV_PROJ_METHOD'] == ['dw_bn'] * 3 and spec['POS_EMBED'] == [False] * 3


def test_default_drop_path_follows_the_official_cvt13_schedule(reference):
    want = reference['official_specs']['cvt-13']['DROP_PATH_RATE']
    for stage, rate in zip(CvT('cvt-13').stages(), want):
        torch.testing.assert_close(torch.tensor(drop_path_probs(stage)),
                                   torch.linspace(0, rate, len(stage.blocks)))
    per_stage = CvT(arch_of(reference['spec']), drop_path_rate=[0.2, 0.0, 0.4])
    assert drop_path_probs(per_stage.stage2) == pytest.approx([0.0, 0.4])


# ------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize('layout', ['model', 'mmseg'])
def test_wrapped_and_prefixed_checkpoints_load_the_same(reference, tmp_path, layout):
    state_dict = reference['state_dict']
    checkpoint = {'model': state_dict} if layout == 'model' else {'state_dict': {
        **{f'backbone.{k}': v for k, v in state_dict.items() if k not in CLASSIFIER_ONLY},
        'decode_head.conv_seg.weight': torch.zeros(3, 16, 1, 1)}}
    model = loaded(reference, save(tmp_path, checkpoint))
    with torch.no_grad():
        assert_maps_close(model(reference['input']), reference['outputs'])


def test_missing_and_unexpected_keys_are_logged_by_name(reference, tmp_path):
    state_dict = dict(reference['state_dict'])
    del state_dict['stage1.blocks.0.mlp.fc1.bias']
    state_dict['stage1.blocks.0.mlp.gate.weight'] = torch.zeros(2, 2)
    with logged_messages() as messages:
        loaded(reference, save(tmp_path, state_dict))
    assert any('missing' in m and 'stage1.blocks.0.mlp.fc1.bias' in m for m in messages)
    assert any('unexpected' in m and 'stage1.blocks.0.mlp.gate.weight' in m for m in messages)


def test_checkpoint_of_another_arch_is_refused(reference, tmp_path):
    model = CvT('cvt-13', init_cfg=pretrained(save(tmp_path, reference['state_dict'])))
    with pytest.raises(ValueError, match='stage0.patch_embed.proj.weight'):
        model.init_weights()


def test_without_init_cfg_weights_start_as_in_the_official_code(reference):
    torch.manual_seed(0)
    model = CvT('cvt-13')
    model.init_weights()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(not m.bias.any() for m in linears if m.bias is not None)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            assert (m.weight == 1).all() and not m.bias.any()
    assert 0.0 < model.stage2.cls_token.std().item() < 0.04


# -------------------------------------------------------------------------------- arguments

def tiny_arch(**changes):
    arch = dict(ARCH_SETTINGS['cvt-13'], dim_embed=[16, 32, 48], num_heads=[1, 2, 3])
    arch.update(changes)
    return arch


@pytest.mark.parametrize('arch', [
    'cvt-99', 42, {'dim_embed': [16, 32, 48]},
    dict(tiny_arch(), window_size=7), tiny_arch(depth=[1, 2]), tiny_arch(num_heads=[1, 3, 3])
], ids=['unknown-name', 'not-a-dict', 'missing-keys', 'unknown-key', 'wrong-length',
        'heads-do-not-divide'])
def test_bad_arch_raises_naming_arch(arch):
    with pytest.raises(ValueError, match='arch'):
        CvT(arch)


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match="missing keys.*'depth'"):
        CvT({'dim_embed': [16, 32, 48]})


@pytest.mark.parametrize('kwargs, name', [
    (dict(out_indices=(3, )), 'out_indices'),
    (dict(out_indices=()), 'out_indices'),
    (dict(drop_path_rate=[0.1, 0.1]), 'drop_path_rate'),
    (dict(drop_path_rate=1.5), 'drop_path_rate'),
    (dict(frozen_stages=3), 'frozen_stages')])
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CvT(tiny_arch(), **kwargs)


def test_a_single_value_stands_for_every_stage():
    assert resolve_arch(tiny_arch(mlp_ratio=2.0))['mlp_ratio'] == [2.0, 2.0, 2.0]


def test_default_outputs_have_strides_4_8_16():
    model = CvT('cvt-13').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4)]


def test_out_indices_choose_the_stages(reference):
    model = tiny(reference, out_indices=(0, 2)).eval()
    full = tiny(reference).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        outs, all_outs = model(reference['input']), full(reference['input'])
    assert len(outs) == 2
    torch.testing.assert_close(outs[0], all_outs[0])
    torch.testing.assert_close(outs[1], all_outs[2])
    assert len(tiny(reference, out_indices=1)(reference['input'])) == 1


def test_output_norm_adds_a_layernorm_per_output_stage(reference, tmp_path):
    plain = loaded(reference, save(tmp_path, reference['state_dict']))
    assert not any(name.startswith('norm') for name, _ in plain.named_children())
    with logged_messages() as messages:
        normed = loaded(reference, save(tmp_path, reference['state_dict']), output_norm=True,
                        out_indices=(1, 2))
    assert not hasattr(normed, 'norm0')
    assert any('missing' in m and 'norm1.weight' in m and 'norm2.bias' in m for m in messages)
    with torch.no_grad():
        normed.norm2.weight.uniform_(0.5, 1.5)
        got = normed(reference['input'])
        for out, norm, want in zip(got, (normed.norm1, normed.norm2), reference['outputs'][1:]):
            manual = nn.functional.layer_norm(want.permute(0, 2, 3, 1), (want.shape[1], ),
                                              norm.weight, norm.bias, norm.eps)
            torch.testing.assert_close(out, manual.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_every_block_mlp_is_fc1_act_fc2(reference):
    model = tiny(reference)
    ratios = reference['spec']['MLP_RATIO']
    for stage, dims, ratio in zip(model.stages(), reference['spec']['DIM_EMBED'], ratios):
        for block in stage.blocks:
            mlp = block.mlp
            assert isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
            assert isinstance(mlp.act, QuickGELU) and isinstance(mlp.drop, nn.Dropout)
            assert (mlp.fc1.in_features, mlp.fc1.out_features) == (dims, int(dims * ratio))
            assert mlp.fc2.out_features == dims


def grads_and_stats(model, x):
    model.train()
    outs = model(x)
    weights = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=weights)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    return [o.detach() for o in outs], grads, stats


def test_with_cp_gives_the_same_outputs_gradients_and_bn_statistics(reference, tmp_path):
    path = save(tmp_path, reference['state_dict'])
    plain = loaded(reference, path)
    checkpointed = loaded(reference, path, with_cp=True)
    calls = []
    checkpointed.stage2.blocks[1].mlp.register_forward_pre_hook(
        lambda *_: calls.append(torch.is_grad_enabled()))
    want = grads_and_stats(plain, reference['input'])
    got = grads_and_stats(checkpointed, reference['input'])
    # Recomputed in backward, and the first forward ran with grad: no re-entrant checkpoint.
    assert calls == [True, True]
    assert_maps_close(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        assert g.keys() == w.keys()
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checkpointed.stage0.blocks[0].attn.conv_proj_q.bn.num_batches_tracked == 1


def test_frozen_stages_and_norm_eval(reference):
    model = tiny(reference, frozen_stages=0, norm_eval=True).train()
    assert not any(p.requires_grad for p in model.stage0.parameters())
    assert all(p.requires_grad for p in model.stage1.parameters())
    assert not model.stage0.training and model.stage1.training
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ------------------------------------------------------------------------ registries, configs

@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_built_through_the_mmseg_and_mmdet_registries(reference, scope):
    model = build(scope, dict(type='CvT', arch=arch_of(reference['spec']), out_indices=(1, 2)))
    assert type(model) is CvT and model.out_indices == (1, 2)


CONFIGS = [('tiny_cvt_upernet_ade20k.py', 'mmseg', 'ade20k'),
           ('tiny_cvt_mask-rcnn_coco.py', 'mmdet', 'coco')]


@pytest.mark.parametrize('config, scope, dataset', CONFIGS, ids=['upernet', 'mask-rcnn'])
def test_tiny_config_trains_one_step(tiny_data, config, scope, dataset):
    cfg = Config.fromfile(os.path.join(HERE, 'configs', config))
    cfg.train_dataloader.dataset.data_root = tiny_data[dataset]
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = revert_sync_batchnorm(build(scope, cfg.model))
        model.init_weights()
        loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        before = model.backbone.stage2.blocks[0].mlp.fc1.weight.clone()
        model.train()
        log_vars = model.train_step(next(iter(loader)), optim_wrapper)
    assert isinstance(model.backbone, CvT)
    assert torch.isfinite(log_vars['loss'])
    assert not torch.equal(before, model.backbone.stage2.blocks[0].mlp.fc1.weight)
    cls_token = model.backbone.stage2.cls_token
    group = next(g for g in optim_wrapper.param_groups if any(p is cls_token for p in g['params']))
    assert group['weight_decay'] == 0.0


def test_segmentor_from_the_config_loads_the_official_checkpoint(reference, tmp_path):
    cfg = Config.fromfile(os.path.join(HERE, 'configs', 'tiny_cvt_upernet_ade20k.py'))
    cfg.model.backbone.update(arch=arch_of(reference['spec']), drop_path_rate=0.0,
                              init_cfg=pretrained(save(tmp_path, reference['state_dict'])))
    model = build('mmseg', cfg.model)
    model.init_weights()  # the runner's call: the segmentor initialises its children
    model.eval()
    with torch.no_grad():
        assert_maps_close(model.extract_feat(reference['input']), reference['outputs'])


@pytest.mark.parametrize('config, scope', [
    ('ade20k/cvt-13_upernet_8xb2-160k_ade20k-512x512.py', 'mmseg'),
    ('coco/mask-rcnn_cvt-13_fpn_1x_coco.py', 'mmdet')], ids=['upernet', 'mask-rcnn'])
def test_shipped_configs_fit_cvt13_maps_to_their_heads(config, scope):
    cfg = Config.fromfile(os.path.join(os.path.dirname(HERE), 'configs', config))
    assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    model = build(scope, cfg.model).eval()
    assert type(model.backbone) is CvT
    with torch.no_grad():
        if scope == 'mmseg':
            logits = model(torch.randn(1, 3, 64, 64), mode='tensor')
            assert logits.shape == (1, 150, 16, 16)
        else:  # FPN: three CvT levels, two more from convs, strides 4 to 64
            feats = model.extract_feat(torch.randn(1, 3, 128, 128))
            assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


# ------------------------------------------------------------------------------------ RMoECvT

def rmoe_tiny(reference, **kwargs):
    kwargs.setdefault('drop_path_rate', 0.0)
    kwargs.setdefault('moe_cfg', dict(num_experts=4))
    return RMoECvT(arch_of(reference['spec']), **kwargs)


def test_rmoe_cvt_from_the_official_checkpoint_reproduces_the_official_stages(reference,
                                                                             tmp_path):
    path = save(tmp_path, reference['state_dict'])
    model = rmoe_tiny(reference, init_cfg=pretrained(path), moe_blocks='all')
    assert model.moe_layer_names == ['stage0.blocks.0.mlp', 'stage1.blocks.0.mlp',
                                     'stage1.blocks.1.mlp', 'stage2.blocks.0.mlp',
                                     'stage2.blocks.1.mlp']
    with logged_messages() as messages:
        model.init_weights()
    assert any("5 took the checkpoint's dense FFNs as their cores" in m for m in messages)
    assert not [m for m in messages if 'missing' in m or 'unexpected' in m]
    core = model.stage2.blocks[1].mlp.moe.experts.core_weights[1]
    torch.testing.assert_close(core, reference['state_dict']['stage2.blocks.1.mlp.fc2.weight'])
    model.eval()
    with torch.no_grad():
        assert_maps_close(model(reference['input']), reference['outputs'])
        assert_maps_close(model(reference['odd_input']), reference['odd_outputs'])


def test_rmoe_cvt_default_blocks_and_registries(reference):
    assert RMoECvT('cvt-13').moe_layer_names == [
        'stage1.blocks.1.mlp'] + [f'stage2.blocks.{b}.mlp' for b in (1, 3, 5, 7, 9)]
    for scope in ('mmseg', 'mmdet'):
        model = build(scope, dict(type='RMoECvT', arch=arch_of(reference['spec']),
                                  moe_blocks=[[], [1], []], moe_cfg=dict(num_experts=2)))
        assert type(model) is RMoECvT and model.moe_blocks == [[], [1], []]
        assert isinstance(model.stage1.blocks[1].mlp, RMoEFFN)


def test_rmoe_cvt_with_cp_keeps_the_balance_loss_gradient(reference):
    model = rmoe_tiny(reference, with_cp=True, moe_blocks='all',
                      moe_cfg=dict(num_experts=4, importance_loss_weight=1.0))
    model.init_weights()
    model.train()
    outs = model(reference['input'].requires_grad_())
    losses = collect_moe_losses(model)
    assert losses['loss_moe_importance'].requires_grad
    losses['loss_moe_importance'].backward()
    for layer in model.moe_layers():
        assert layer.moe.router.weight.grad.abs().sum() > 0
    assert len(outs) == 3


def test_rmoe_cvt_frozen_stages_freeze_its_moe_layers(reference):
    model = rmoe_tiny(reference, frozen_stages=1, moe_blocks='all')
    assert not any(p.requires_grad for p in model.stage1.blocks[1].mlp.parameters())
    assert all(p.requires_grad for p in model.stage2.blocks[1].mlp.parameters())


@pytest.mark.parametrize('moe_blocks, message', [
    (['stage2.blocks.*.attn'], 'selects no FFN'),
    ([[], [5], []], 'stage 1 has blocks 0..1'),
])
def test_rmoe_cvt_bad_selection_is_refused_by_name(reference, moe_blocks, message):
    with pytest.raises(ValueError, match=message):
        rmoe_tiny(reference, moe_blocks=moe_blocks)

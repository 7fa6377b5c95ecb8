"""One conversion for every backbone: ``RMoEBackbone`` over mmseg, mmpretrain and timm
backbones, FFN selection, dense checkpoints through each backbone's own loading."""
import copy

import pytest
import timm
import torch
from mmengine.config import ConfigDict

from openmmlab_helpers import build, logged_messages
from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.backbones import (RMoEBackboneMixin, RMoECvT, RMoESwinTransformer, find_ffns,
                                   resolve_moe_blocks)
from rmoe_plugin.backbones.checkpointing import CheckpointWithoutReentryMixin
from rmoe_plugin.models import is_dense_ffn
from rmoe_plugin.utils import PeakMemory

TINY_VIT = dict(img_size=(32, 32), patch_size=8, embed_dims=16, num_layers=4, num_heads=2,
                mlp_ratio=2, out_indices=(1, 3))
TINY_MMPRETRAIN = dict(arch=dict(embed_dims=16, num_layers=4, num_heads=2,
                                 feedforward_channels=32),
                       img_size=32, patch_size=8, out_indices=(1, 3))
TIMM_VIT = dict(model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=16,
                depth=4, num_heads=2)

# backbone kind: (scope, dense config, the FFN paths the default selection converts)
KINDS = {
    'mmseg-BEiT': ('mmseg', dict(type='BEiT', **TINY_VIT, init_values=0.1),
                   ['layers.1.ffn', 'layers.3.ffn']),
    'mmseg-ViT': ('mmseg', dict(type='VisionTransformer', **TINY_VIT),
                  ['layers.1.ffn', 'layers.3.ffn']),
    'mmpretrain-ViT': ('mmpretrain', dict(type='VisionTransformer', **TINY_MMPRETRAIN),
                       ['layers.1.ffn', 'layers.3.ffn']),
    'mmpretrain-BEiT': ('mmpretrain', dict(type='BEiTViT', **TINY_MMPRETRAIN),
                        ['layers.1.ffn', 'layers.3.ffn']),
    'timm-ViT': ('mmpretrain', dict(type='TIMMBackbone', **TIMM_VIT),
                 ['timm_model.blocks.1.mlp', 'timm_model.blocks.3.mlp']),
    'timm-ViT-from-mmseg': ('mmseg', dict(type='mmpretrain.TIMMBackbone', **TIMM_VIT),
                            ['timm_model.blocks.1.mlp', 'timm_model.blocks.3.mlp']),
}


def rmoe_cfg(dense_cfg, **kwargs):
    cfg = dict(dense_cfg)
    return dict(type='RMoEBackbone', backbone_type=cfg.pop('type'), **cfg,
                **{'moe_cfg': dict(num_experts=4), **kwargs})


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def outputs(model, x):
    model.eval()  # some backbones' train() returns None: no chaining
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, (tuple, list)) else (out, )


def perturbed_dense(scope, cfg):
    """The dense backbone, initialised, every float tensor shifted by its own noise (so that
    a zero bias or an identity LayerScale cannot hide a weight loaded into the wrong place)."""
    torch.manual_seed(0)
    dense = build(scope, cfg)
    dense.init_weights()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in dense.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    dense.eval()
    return dense





@pytest.mark.parametrize('kind', sorted(KINDS))
def test_rmoe_equals_dense_after_loading_a_dense_checkpoint(kind, tmp_path):
    scope, cfg, expected_layers = KINDS[kind]
    dense = perturbed_dense(scope, cfg)
    path = str(tmp_path / 'dense.pth')
    torch.save({'state_dict': dense.state_dict()}, path)
    rmoe = build(scope, rmoe_cfg(cfg, init_cfg=dict(type='Pretrained', checkpoint=path)))
    assert isinstance(rmoe, type(dense)) and isinstance(rmoe, RMoEBackboneMixin)
    assert rmoe.moe_layer_names == expected_layers
    with logged_messages() as messages:
        rmoe.init_weights()
    assert any("2 took the checkpoint's dense FFNs as their cores" in m for m in messages)
    for name, layer in zip(rmoe.moe_layer_names, rmoe.moe_layers()):
        fc1 = [k for k in dense.state_dict() if k.startswith(name + '.')][0]
        torch.testing.assert_close(layer.moe.experts.core_weights[0], dense.state_dict()[fc1])
    x = images()
    for got, want in zip(outputs(rmoe, x), outputs(dense, x)):
        torch.testing.assert_close(got, want)


def test_timm_checkpoint_given_to_timm_loads_before_the_conversion(tmp_path):
    timm_cfg = dict(TIMM_VIT)
    timm_model = timm.create_model(timm_cfg.pop('model_name'), **timm_cfg)
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / 'timm.pth')
    torch.save(timm_model.state_dict(), path)  # a timm checkpoint, classifier included
    cfg = dict(type='TIMMBackbone', **TIMM_VIT, checkpoint_path=path)
    dense = build('mmpretrain', cfg)
    rmoe = build('mmpretrain', rmoe_cfg(cfg))
    rmoe.init_weights()  # timm loaded at construction: nothing to do, nothing reset
    x = images()
    for got, want in zip(outputs(rmoe, x), outputs(dense, x)):
        torch.testing.assert_close(got, want)


def test_without_a_checkpoint_layers_start_fresh_and_are_logged():
    scope, cfg, _ = KINDS['mmseg-BEiT']
    rmoe = build(scope, rmoe_cfg(cfg))
    with logged_messages() as messages:
        rmoe.init_weights()
    assert any('2 start fresh' in m and 'layers.1.ffn' in m for m in messages)
    experts = rmoe.moe_layers()[0].moe.experts
    assert experts.core_weights[0].std().item() == pytest.approx(0.02, rel=0.2)
    assert experts.residual_weights[0].abs().sum().item() == 0


def test_one_conversion_serves_every_rmoe_backbone():
    beit = build('mmseg', rmoe_cfg(KINDS['mmseg-BEiT'][1]))
    assert isinstance(beit, RMoEBackboneMixin)
    assert issubclass(RMoESwinTransformer, RMoEBackboneMixin)
    assert issubclass(RMoECvT, RMoEBackboneMixin)
    again = build('mmseg', rmoe_cfg(KINDS['mmseg-BEiT'][1]))
    assert type(again) is type(beit)  # one RMoE class per dense class


def test_rmoe_backbone_trains_with_the_balance_loss_and_deep_copies():
    scope, cfg, _ = KINDS['mmpretrain-BEiT']
    rmoe = build(scope, rmoe_cfg(cfg, moe_cfg=dict(num_experts=4, importance_loss_weight=1.)))
    rmoe.init_weights()
    twin = copy.deepcopy(rmoe)  # as mmengine's EMA hook copies the model before training
    rmoe.train()
    out = rmoe(images())
    losses = collect_moe_losses(rmoe)
    (losses['loss_moe_importance'] + sum(o.mean() for o in out)).backward()
    assert all(layer.moe.router.weight.grad.abs().sum() > 0 for layer in rmoe.moe_layers())
    for got, want in zip(outputs(twin, images()), outputs(rmoe, images())):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------- selection

def selected(moe_blocks, kind='mmseg-BEiT'):
    scope, cfg, _ = KINDS[kind]
    return build(scope, rmoe_cfg(cfg, moe_blocks=moe_blocks)).moe_layer_names


def test_moe_blocks_by_index_per_block_list_and_by_pattern():
    assert selected('all') == [f'layers.{i}.ffn' for i in range(4)]
    assert selected('none') == []
    assert selected([[0, 2]]) == ['layers.0.ffn', 'layers.2.ffn']
    assert selected(['layers.[02].ffn', 'layers.3.*']) == [
        'layers.0.ffn', 'layers.2.ffn', 'layers.3.ffn']
    assert selected(['*blocks.2.mlp'], 'timm-ViT') == ['timm_model.blocks.2.mlp']


def test_default_moe_blocks_are_the_odd_blocks_of_the_last_two_lists():
    assert resolve_moe_blocks(None, (2, 2, 6, 2)) == [[], [], [1, 3, 5], [1]]
    assert resolve_moe_blocks(None, (1, 2, 10)) == [[], [1], [1, 3, 5, 7, 9]]  # CvT-13
    assert resolve_moe_blocks(None, (24, )) == [list(range(1, 24, 2))]  # a ViT


def test_ffn_sites_of_a_backbone():
    sites = [site for site, _ in find_ffns(build('mmseg', KINDS['mmseg-ViT'][1]))]
    assert [(s.group, s.index) for s in sites] == [('layers', i) for i in range(4)]


@pytest.mark.parametrize('moe_blocks, message', [
    (['layers.*.attn'], r"pattern 'layers.\*.attn' selects no FFN: it matches "
                        r"\['layers.0.attn \(BEiTAttention\)'"),
    (['decoder.*'], "pattern 'decoder.*' selects no FFN: it matches no module"),
    ([[7]], r'moe_blocks: stage 0 has blocks 0..3, got \[7\]'),
    ([[1], [2]], 'this backbone has 1 block lists'),
    ('every', r"moe_blocks must be None \(every other block"),
], ids=['not-an-ffn', 'no-module', 'no-block', 'wrong-lists', 'unknown-word'])
def test_a_selector_that_selects_nothing_is_refused_by_name(moe_blocks, message):
    with pytest.raises(ValueError, match=message):
        selected(moe_blocks)


def test_unknown_or_rmoe_backbone_type_is_refused_by_name():
    with pytest.raises(ValueError, match="backbone_type 'NoSuchViT' is not registered"):
        build('mmseg', dict(type='RMoEBackbone', backbone_type='NoSuchViT'))
    with pytest.raises(ValueError, match='RMoESwinTransformer is an RMoE backbone already'):
        build('mmseg', dict(type='RMoEBackbone', backbone_type='RMoESwinTransformer'))


# -------------------------------------------------------------------- activation checkpointing

def train_step(model, x):
    """Gradients of a training step whose loss holds the outputs and the balance losses."""
    model.train()
    outs = model(x)
    outs = outs if isinstance(outs, (tuple, list)) else (outs, )
    balance = sum(collect_moe_losses(model).values())  # none in a dense model
    (sum(o.float().square().mean() for o in outs) + balance).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def plain_and_checkpointed(kind, switch_on=lambda m: None, **cfg_args):
    """The RMoE backbone of ``kind``, and a copy with activation checkpointing on, through
    ``with_cp=True`` unless ``switch_on`` turns it on."""
    scope, cfg, _ = KINDS[kind]
    cfg = dict(cfg, **cfg_args)
    moe = dict(num_experts=4, importance_loss_weight=1.0, residual_init_std=0.02)
    plain = build(scope, rmoe_cfg(cfg, moe_cfg=moe))
    plain.init_weights()
    with_cp = {} if switch_on(None) is False else dict(with_cp=True)
    checkpointed = build(scope, rmoe_cfg(dict(cfg, **with_cp), moe_cfg=moe))
    checkpointed.load_state_dict(plain.state_dict())
    switch_on(checkpointed)
    return plain, checkpointed


def timm_grad_checkpointing(model):
    if model is None:
        return False  # not through with_cp
    model.timm_model.set_grad_checkpointing(True)


def count_forwards(layers):
    """Calls of ``layers`` (counted on entry: a recomputation stops once it has recomputed
    what the backward needs, which may be inside the layer)."""
    calls = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize('kind,switch_on', [
    ('mmseg-ViT', None), ('mmseg-BEiT', None), ('mmpretrain-ViT', None),
    ('mmpretrain-BEiT', None), ('timm-ViT', None), ('timm-ViT', timm_grad_checkpointing)],
    ids=['mmseg-ViT', 'mmseg-BEiT', 'mmpretrain-ViT', 'mmpretrain-BEiT', 'timm-ViT',
         'timm-set_grad_checkpointing'])
def test_checkpointed_moe_blocks_recompute_and_give_the_same_gradients(kind, switch_on):
    plain, checkpointed = plain_and_checkpointed(kind, switch_on or (lambda m: None))
    forwards = count_forwards(checkpointed.moe_layers())
    x = images()
    want, got = train_step(plain, x), train_step(checkpointed, x)
    assert len(forwards) == 2 * len(checkpointed.moe_layers())  # each recomputed once
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert all(layer.moe.router.weight.grad.abs().sum() > 0
               for layer in checkpointed.moe_layers())


def test_with_cp_of_the_upstream_backbone_stays_its_own_flag():
    _, vit = plain_and_checkpointed('mmseg-ViT')
    blocks = [vit.get_submodule(name.rpartition('.')[0]) for name in vit.moe_layer_names]
    assert all(isinstance(b, CheckpointWithoutReentryMixin) and b.with_cp for b in blocks)
    dense_block = vit.layers[0]  # keeps the upstream (re-entrant) checkpointing
    assert dense_block.with_cp and not isinstance(dense_block, CheckpointWithoutReentryMixin)
    blocks[0].with_cp = False  # switches it off, as upstream
    calls = count_forwards([vit.moe_layers()[0]])
    train_step(vit, images())
    assert len(calls) == 1


def peak_training_memory(model, x):
    train_step(model, x)
    model.zero_grad(set_to_none=True)
    with PeakMemory() as memory:
        train_step(model, x)
    return memory.peak


@pytest.mark.parametrize('kind', ['mmseg-ViT', 'mmseg-BEiT', 'mmpretrain-ViT', 'timm-ViT'])
def test_with_cp_saves_activation_memory(kind):
    size = dict(img_size=64 if 'mmseg' not in kind else (64, 64), patch_size=4)
    x = torch.randn(2, 3, 64, 64)
    peaks = [peak_training_memory(m, x) for m in plain_and_checkpointed(kind, **size)]
    assert peaks[1] < 0.8 * peaks[0], peaks
    if kind == 'mmseg-ViT':  # the only one with a with_cp of its own: RMoE saves what it saves
        scope, cfg, _ = KINDS[kind]
        dense = [peak_training_memory(build(scope, dict(cfg, **size, with_cp=on)), x)
                 for on in (False, True)]
        assert peaks[0] - peaks[1] >= 0.95 * (dense[0] - dense[1]), (peaks, dense)


def test_mmcv_ffn_and_timm_mlp_are_recognised_attention_is_not():
    vit = build('mmseg', KINDS['mmseg-ViT'][1])
    timm_vit = build('mmpretrain', KINDS['timm-ViT'][1])
    assert is_dense_ffn(vit.layers[0].ffn) and is_dense_ffn(timm_vit.timm_model.blocks[0].mlp)
    assert not is_dense_ffn(vit.layers[0].attn)
    beit = build('mmseg', rmoe_cfg(KINDS['mmseg-BEiT'][1], moe_blocks='all'))
    assert all(isinstance(m, RMoEFFN) for m in beit.moe_layers())


def test_pretrained_on_the_segmentor_reaches_the_wrapped_backbone(tmp_path):
    dense = perturbed_dense('mmseg', KINDS['mmseg-BEiT'][1])
    path = str(tmp_path / 'beit.pth')
    torch.save(dense.state_dict(), path)
    # mmseg's BEiT configs give the checkpoint as model.pretrained; BEiT turns it into init_cfg.
    rmoe = build('mmseg', rmoe_cfg(KINDS['mmseg-BEiT'][1], pretrained=path))
    assert rmoe.init_cfg == ConfigDict(type='Pretrained', checkpoint=path)
    rmoe.init_weights()
    for got, want in zip(outputs(rmoe, images()), outputs(dense, images())):
        torch.testing.assert_close(got, want)

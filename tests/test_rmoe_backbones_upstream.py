"""The RMoE ViT, BEiT and Swin behave as mmseg's own backbone tests expect the dense ones to:
argument checks, output shapes for odd input sizes, the output options, norm_eval, frozen
stages, pretrained / init_cfg handling and with_cp (which here keeps the balance loss's
gradient). Narrow widths and few layers, so that every case runs in a moment."""
import pytest
import torch
from torch import nn

from openmmlab_helpers import build
from rmoe_plugin import collect_moe_losses

MOE = dict(moe_cfg=dict(num_experts=2, importance_loss_weight=1.0))
VIT = dict(embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=2)
SWIN = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def vit(**args):
    return build('mmseg', dict(type='RMoEBackbone', backbone_type='VisionTransformer',
                               **VIT, **MOE, **args))


def beit(**args):
    return build('mmseg', dict(type='RMoEBackbone', backbone_type='BEiT', **VIT, **MOE,
                               **args))


def swin(**args):
    return build('mmseg', dict(type='RMoESwinTransformer', **SWIN, **MOE, **args))


def feature_shapes(model, *image_size, train=False):
    model.train(train)
    with torch.set_grad_enabled(train):
        return [tuple(f.shape) for f in model(torch.randn(1, 3, *image_size))]


def norms_training(model):
    return {m.training for m in model.modules() if isinstance(m, NORMS)}


@pytest.mark.parametrize('make', [vit, beit], ids=['ViT', 'BEiT'])
@pytest.mark.parametrize('args,error', [
    (dict(img_size=512.0), TypeError),
    (dict(out_indices=1.), TypeError),
    (dict(img_size=(224, 224, 224)), AssertionError),
    (dict(pretrained=123), TypeError),
], ids=['float-img_size', 'float-out_indices', '3d-img_size', 'int-pretrained'])
def test_bad_vit_arguments_raise_as_upstream(make, args, error):
    with pytest.raises(error):
        make(**args)


def error_of(model, x):
    try:
        model(x)
    except Exception as error:  # noqa: B902 (whatever the dense model raises)
        return type(error)
    return None


def test_a_vit_input_without_a_batch_dimension_raises_as_the_dense_vit():
    # mmseg's test expects a RuntimeError; with torch 2.9 the dense ViT raises an IndexError
    x = torch.randn(3, 30, 30)
    dense = build('mmseg', dict(type='VisionTransformer', **VIT))
    assert error_of(vit(), x) is error_of(dense, x) is not None


@pytest.mark.parametrize('make', [vit, beit], ids=['ViT', 'BEiT'])
@pytest.mark.parametrize('image_size,grid', [
    ((224, 224), (14, 14)), ((256, 256), (16, 16)), ((32, 32), (2, 2)), ((112, 224), (7, 14))])
def test_vit_features_follow_the_input_size(make, image_size, grid):
    # BEiT's relative position tables are sized by img_size: it is built for the input
    model = make(img_size=image_size if make is beit else (224, ))
    model.init_weights()
    assert feature_shapes(model, *image_size, train=True)[-1] == (1, 32, *grid)


def test_beit_of_an_irregular_size():
    model = beit(img_size=(234, 345))
    assert feature_shapes(model, 234, 345, train=True)[-1] == (1, 32, 14, 21)


@pytest.mark.parametrize('args,shape', [
    (dict(with_cls_token=False), (1, 32, 14, 14)),
    (dict(final_norm=True), (1, 32, 14, 14)),
    (dict(patch_norm=True), (1, 32, 14, 14)),
], ids=['no-cls-token', 'final-norm', 'patch-norm'])
def test_vit_output_options(args, shape):
    assert feature_shapes(vit(**args), 224, 224)[-1] == shape


@pytest.mark.parametrize('args', [dict(init_values=0), dict(final_norm=True),
                                  dict(patch_norm=True)],
                         ids=['init_values-0', 'final-norm', 'patch-norm'])
def test_beit_options(args):
    assert feature_shapes(beit(**args), 224, 224)[-1] == (1, 32, 14, 14)


@pytest.mark.parametrize('make,args', [(vit, {}), (beit, dict(img_size=56)), (swin, {})],
                         ids=['ViT', 'BEiT', 'Swin'])
def test_with_cp_trains_and_keeps_the_balance_loss_gradient(make, args):
    model = make(with_cp=True, **args)
    model.init_weights()
    model.train()
    features = model(torch.randn(1, 3, 56, 56))
    loss = sum(f.mean() for f in features) + collect_moe_losses(model)['loss_moe_importance']
    loss.backward()
    layers = [m for m in model.modules() if hasattr(m, 'moe')]
    assert layers and all(m.moe.router.weight.grad.abs().sum() > 0 for m in layers)
    assert all(m.with_cp for m in model.modules() if hasattr(m, 'with_cp'))


@pytest.mark.parametrize('make', [vit, beit], ids=['ViT', 'BEiT'])
def test_norm_eval(make):
    model = make()
    model.train()
    assert norms_training(model) == {True}
    model = make(norm_eval=True)
    model.train()
    assert norms_training(model) == {False}


def test_beit_pretrained_and_init_cfg(tmp_path):
    missing = str(tmp_path / 'no_such_checkpoint.pth')
    model = beit(pretrained=None, init_cfg=None)
    assert model.init_cfg is None
    model.init_weights()
    for args in (dict(init_cfg=dict(type='Pretrained', checkpoint=missing)),
                 dict(pretrained=missing)):
        model = beit(**args)
        assert model.init_cfg == dict(type='Pretrained', checkpoint=missing)
        with pytest.raises(OSError, match='no_such_checkpoint'):
            model.init_weights()
    with pytest.raises(TypeError):
        beit(init_cfg=123).init_weights()
    for args in (dict(pretrained=missing, init_cfg=dict(type='Pretrained', checkpoint=missing)),
                 dict(pretrained=missing, init_cfg=123), dict(pretrained=123, init_cfg=123)):
        with pytest.raises(AssertionError):
            beit(**args)
    with pytest.raises(TypeError):
        beit(pretrained=123)


@pytest.mark.parametrize('args,error', [
    (dict(pretrained=123), TypeError),
    (dict(strides=(2, 2, 2, 2), patch_size=4), AssertionError),
    (dict(pretrain_img_size=(224, 224, 224)), AssertionError),
], ids=['int-pretrained', 'stride-not-patch', '3d-pretrain_img_size'])
def test_bad_swin_arguments_raise_as_upstream(args, error):
    with pytest.raises(error):
        swin(**args)


@pytest.mark.parametrize('args', [dict(use_abs_pos_embed=True, pretrain_img_size=224),
                                  dict(patch_norm=False), dict(pretrain_img_size=(224, ))],
                         ids=['abs-pos-embed', 'no-patch-norm', '1-tuple-pretrain_img_size'])
def test_swin_options(args):
    model = swin(**args)
    model.init_weights()
    assert feature_shapes(model, 224, 224, train=True)[-1] == (1, 64, 7, 7)


@pytest.mark.parametrize('image_size,grids', [
    ((256, 256), [(64, 64), (32, 32), (16, 16), (8, 8)]),
    ((255, 255), [(64, 64), (32, 32), (16, 16), (8, 8)]),
    ((112, 137), [(28, 35), (14, 18), (7, 9), (4, 5)])])
def test_swin_features_follow_the_input_size(image_size, grids):
    shapes = feature_shapes(swin(), *image_size)
    assert shapes == [(1, 8 * 2**i, *grid) for i, grid in enumerate(grids)]


@pytest.mark.parametrize('args', [dict(), dict(use_abs_pos_embed=True)],
                         ids=['plain', 'abs-pos-embed'])
def test_swin_frozen_stages_freeze_everything(args):
    model = swin(frozen_stages=4, **args)
    model.train()
    assert not any(p.requires_grad for p in model.parameters())

import pytest
import torch
from mmcv.cnn.bricks.transformer import FFN, build_feedforward_network
from mmengine.registry import DefaultScope

from rmoe_plugin import RMoEFFN, collect_moe_losses


def dense_ffn(**kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=16, feedforward_channels=32, act_cfg=dict(type='GELU'))
    args.update(kwargs)
    return FFN(**args).eval()


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(num_fcs=3, act_cfg=dict(type='ReLU', inplace=True)),
    dict(layer_scale_init_value=0.5, add_identity=False),
    dict(dropout_layer=dict(type='DropPath', drop_prob=0.2), ffn_drop=0.1),
])
def test_from_dense_reproduces_the_dense_ffn(kwargs):
    dense = dense_ffn(**kwargs)
    moe = RMoEFFN.from_dense(dense, num_experts=4, top_k=1).eval()
    x, identity = torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    torch.testing.assert_close(moe(x), dense(x))
    torch.testing.assert_close(moe(x, identity=identity), dense(x, identity=identity))


def test_from_dense_reproduces_dense_in_training_when_dropless():
    dense = dense_ffn().train()
    moe = RMoEFFN.from_dense(dense, num_experts=8, capacity_factor=None).train()
    x = torch.randn(4, 25, 16)
    torch.testing.assert_close(moe(x), dense(x))
    assert set(moe.moe.last_losses) == {'loss_moe_importance'}


def test_from_dense_then_to_dense_round_trips_and_averages_experts():
    dense = dense_ffn()
    moe = RMoEFFN.from_dense(dense, num_experts=4)
    x = torch.randn(3, 16)
    torch.testing.assert_close(moe.to_dense()(x), dense(x))
    with torch.no_grad():
        moe.moe.experts.residual_biases[-1].copy_(torch.arange(4.0)[:, None].expand(4, 16))
    torch.testing.assert_close(moe.to_dense()(x), dense(x) + 1.5)


def test_from_dense_rejects_mismatched_widths():
    with pytest.raises(ValueError, match='feedforward_channels'):
        RMoEFFN.from_dense(dense_ffn(), feedforward_channels=64)
    with pytest.raises(ValueError, match='embed_dims'):
        RMoEFFN.from_dense(dense_ffn(), embed_dims=8)
    with pytest.raises(ValueError, match='mmcv FFN'):
        RMoEFFN.from_dense(torch.nn.Linear(4, 4))


def test_bad_moe_argument_fails_at_construction():
    with pytest.raises(ValueError, match='top_k'):
        RMoEFFN(embed_dims=8, feedforward_channels=16, num_experts=2, top_k=3)


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet', 'mmengine'])
def test_built_from_a_config_dict_in_each_scope(scope):
    cfg = dict(type='RMoEFFN', embed_dims=16, feedforward_channels=32, num_experts=4,
               top_k=2, capacity_factor=1.0)
    with DefaultScope.overwrite_default_scope(scope):
        if scope == 'mmseg':
            from mmseg.registry import MODELS
        elif scope == 'mmdet':
            from mmdet.registry import MODELS
        else:
            from mmengine.registry import MODELS
        layer = MODELS.build(cfg)
        assert isinstance(layer, RMoEFFN) and layer.num_experts == 4
        assert isinstance(build_feedforward_network(cfg), RMoEFFN)


def test_collect_moe_losses_sums_layers_and_skips_eval():
    model = torch.nn.Sequential(
        RMoEFFN(16, 32, num_experts=4, z_loss_weight=1e-3),
        RMoEFFN(16, 32, num_experts=4))
    x = torch.randn(2, 8, 16)
    model(x)
    losses = collect_moe_losses(model)
    assert set(losses) == {'loss_moe_importance', 'loss_moe_zloss'}
    expected = sum(m.moe.last_losses['loss_moe_importance'] for m in model)
    torch.testing.assert_close(losses['loss_moe_importance'], expected)
    assert losses['loss_moe_importance'].requires_grad
    model.eval()(x)
    assert collect_moe_losses(model) == {}


def test_stacked_experts_make_no_parameter_unused():
    layer = RMoEFFN(16, 32, num_experts=16, capacity_factor=0.1)
    out = layer(torch.randn(1, 4, 16))
    (out.sum() + sum(collect_moe_losses(layer).values())).backward()
    assert all(p.grad is not None for p in layer.parameters())

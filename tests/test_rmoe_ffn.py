import pytest
import torch
from mmcv.cnn.bricks.transformer import FFN, build_feedforward_network
from mmengine.registry import DefaultScope
from timm.layers import GluMlp, Mlp
from torch import nn

from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.backbones.cvt import CvTMlp


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
    with pytest.raises(ValueError, match=r'Linear, children: none\) is not an FFN'):
        RMoEFFN.from_dense(torch.nn.Linear(4, 4))


@pytest.mark.parametrize('override, check', [
    (dict(add_identity=False), lambda moe, dense, x: torch.testing.assert_close(
        moe(x), dense(x) - x)),
    (dict(ffn_drop=0.3), lambda moe, dense, x: moe.moe.experts.dropout.p == 0.3),
    (dict(dropout_layer=dict(type='DropPath', drop_prob=0.1)),
     lambda moe, dense, x: moe.dropout_layer.drop_prob == 0.1),
    (dict(embed_dims=16, feedforward_channels=32, num_fcs=2),  # the dense widths: accepted
     lambda moe, dense, x: torch.testing.assert_close(moe(x), dense(x))),
], ids=['add_identity', 'ffn_drop', 'dropout_layer', 'same-widths'])
def test_from_dense_ffn_arguments_override_the_dense_ones(override, check):
    dense = dense_ffn()
    moe = RMoEFFN.from_dense(dense, num_experts=2, **override).eval()
    assert check(moe, dense, torch.randn(3, 16)) is not False


@pytest.mark.parametrize('name', ['act_cfg', 'layer_scale_init_value'])
def test_from_dense_refuses_ffn_arguments_bound_to_the_dense_weights(name):
    value = dict(act_cfg=dict(type='ReLU'), layer_scale_init_value=0.1)[name]
    with pytest.raises(ValueError, match=f"remove \\['{name}'\\]"):
        RMoEFFN.from_dense(dense_ffn(), **{name: value})


def mlps():
    torch.manual_seed(0)
    return {'timm-Mlp': Mlp(16, 32, act_layer=nn.GELU, drop=0.1),
            'CvTMlp': CvTMlp(16, 48, drop=0.2),
            'timm-Mlp-tanh-gelu': Mlp(16, 24, act_layer=lambda: nn.GELU(approximate='tanh'))}


@pytest.mark.parametrize('kind', sorted(mlps()))
def test_from_dense_takes_over_an_fc1_act_fc2_mlp(kind):
    mlp = mlps()[kind].eval()
    moe = RMoEFFN.from_dense(mlp, num_experts=4).eval()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(moe(x), mlp(x))
    assert moe.dense_linear_names == ['fc1', 'fc2'] and not moe.add_identity
    dropout = mlp.drop if hasattr(mlp, 'drop') else mlp.drop1
    assert moe.moe.experts.dropout.p == dropout.p
    torch.testing.assert_close(moe.to_dense()(x), mlp(x))
    assert type(moe.to_dense()) is type(mlp)


def test_dense_mlp_weights_load_into_the_core_by_their_own_names():
    mlp, other = mlps()['timm-Mlp'].eval(), Mlp(16, 32)
    moe = RMoEFFN.from_dense(other, num_experts=2).eval()
    result = moe.load_state_dict(mlp.state_dict(), strict=False)
    assert not result.unexpected_keys and moe.loaded_from == 'dense'
    assert all('router' in k or 'residual' in k for k in result.missing_keys)
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe(x), mlp(x))


class ScaledMlp(nn.Module):
    """fc1, act, fc2, but a forward that does more with them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return 2 * self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize('module, message', [
    (Mlp(16, 32, norm_layer=nn.LayerNorm), r'ffn.norm is a LayerNorm between fc1 and fc2'),
    (GluMlp(16, 32), r'a gated MLP \(GluMlp\)'),
    (Mlp(16, 32, bias=False), 'ffn.fc1 has no bias'),
    (Mlp(16, 32, drop=(0.1, 0.2)), r'dropout rates \[0.1, 0.2\] differ'),
    (Mlp(16, 32, act_layer=nn.PReLU), r'ffn.act \(PReLU\) has parameters'),
    (Mlp(16, 32, use_conv=True), 'ffn.fc1 is a Conv2d'),
    (ScaledMlp(), r'its forward is not fc2\(act\(fc1\(x\)\)\)'),
], ids=['norm', 'glu', 'no-bias', 'two-dropouts', 'prelu', 'conv', 'other-forward'])
def test_an_mlp_the_experts_cannot_reproduce_is_refused_by_name(module, message):
    with pytest.raises(ValueError, match=message):
        RMoEFFN.from_dense(module)


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

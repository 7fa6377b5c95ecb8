import pytest
import timm
import torch
from mmengine.config import ConfigDict

from openmmlab_helpers import build, logged_messages
from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.backbones import resolve_moe_blocks

SMALL_SWIN = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                  drop_path_rate=0.0, pretrain_img_size=32)


def pretrained(path):
    return ConfigDict(type='Pretrained', checkpoint=path)


def images(n=2, size=64):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def dense_and_rmoe(scope, tmp_path, checkpoint_of=lambda sd: {'state_dict': sd}, **moe):
    """A randomly initialised upstream Swin, saved, and an RMoE Swin built from that file."""
    torch.manual_seed(0)
    dense = build(scope, dict(type='SwinTransformer', **SMALL_SWIN))
    dense.init_weights()
    path = str(tmp_path / 'dense.pth')
    torch.save(checkpoint_of(dense.state_dict()), path)
    rmoe = build(scope, dict(type='RMoESwinTransformer', **SMALL_SWIN,
                             moe_cfg=dict(num_experts=4, **moe),
                             init_cfg=pretrained(path)))
    rmoe.init_weights()
    dense.eval()  # the upstream Swin's train() returns None, so no chaining
    rmoe.eval()
    return dense, rmoe


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_converted_backbone_reproduces_the_dense_swin(scope, tmp_path):
    dense, rmoe = dense_and_rmoe(scope, tmp_path)
    assert isinstance(rmoe, type(dense))  # built on that scope's own Swin
    assert len(rmoe.moe_layers()) == 2 and rmoe.moe_blocks == [[], [], [1], [1]]
    x = images()
    with torch.no_grad():
        for got, want in zip(rmoe(x), dense(x)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)


def test_full_segmentor_checkpoint_loads_its_backbone(tmp_path):
    def as_segmentor(sd):
        return {'state_dict': {**{f'backbone.{k}': v for k, v in sd.items()},
                               'decode_head.conv_seg.weight': torch.zeros(3, 3)}}
    dense, rmoe = dense_and_rmoe('mmseg', tmp_path, as_segmentor)
    with torch.no_grad():
        torch.testing.assert_close(rmoe(images())[-1], dense(images())[-1])


def timm_swin():
    torch.manual_seed(1)
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=32,
                             embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                             window_size=4, num_classes=5)


def to_official(timm_sd):
    """timm's Swin keys as microsoft/Swin-Transformer writes them (downsample one stage up)."""
    out = {}
    for k, v in timm_sd.items():
        parts = k.split('.')
        if parts[0] == 'layers' and parts[2] == 'downsample':
            parts[1] = str(int(parts[1]) - 1)
        out['.'.join(parts).replace('head.fc.', 'head.')] = v
    return out


@pytest.mark.parametrize('layout', ['timm', 'official'])
def test_timm_and_official_checkpoints_load_like_mmdet_converts_them(layout, tmp_path, capsys):
    timm_sd = timm_swin().state_dict()
    official = to_official(timm_sd)
    official_path = str(tmp_path / 'official.pth')
    torch.save({'model': official}, official_path)
    path = str(tmp_path / f'{layout}.pth')
    torch.save({'model': timm_sd if layout == 'timm' else official}, path)
    reference = build('mmdet', dict(type='SwinTransformer', **SMALL_SWIN, convert_weights=True,
                                    init_cfg=pretrained(official_path)))
    reference.init_weights()
    rmoe = build('mmdet', dict(type='RMoESwinTransformer', **SMALL_SWIN, convert_weights=True,
                               moe_cfg=dict(num_experts=2),
                               init_cfg=pretrained(path)))
    capsys.readouterr()
    with logged_messages() as messages:
        rmoe.init_weights()
    # timm stores no relative_position_index / attn_mask buffers (Swin derives them): neither
    # the upstream loader (it prints) nor ours (it logs) may call them missing.
    reported = '\n'.join([capsys.readouterr().out, *messages])
    for buffer in ('relative_position_index', 'attn_mask', 'relative_coords_table'):
        assert buffer not in reported
    # What a classifier checkpoint really lacks is still named: the per-stage output norms.
    assert 'norm0.weight' in reported
    core = rmoe.stages[3].blocks[1].ffn.moe.experts.core_weights[0]
    torch.testing.assert_close(core, timm_sd['layers.3.blocks.1.mlp.fc1.weight'])
    rmoe.eval()
    reference.eval()
    with torch.no_grad():
        for got, want in zip(rmoe(images()), reference(images())):
            torch.testing.assert_close(got, want)


def test_missing_and_unexpected_keys_are_reported_by_name(tmp_path):
    def with_extra(sd):
        sd = dict(sd)
        sd['stages.0.blocks.0.mystery.weight'] = torch.zeros(1)
        del sd['norm3.weight']
        return sd
    with logged_messages() as messages:
        dense_and_rmoe('mmseg', tmp_path, with_extra)
    out = '\n'.join(messages)
    assert 'stages.0.blocks.0.mystery.weight' in out and 'norm3.weight' in out
    assert "2 RMoE layers (4 experts): stages.2.blocks.1.ffn, stages.3.blocks.1.ffn; 2 took " \
        "the checkpoint's dense FFNs as their cores" in out


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ('should not run',))
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'x': Payload()}}, path)
    rmoe = build('mmseg', dict(type='RMoESwinTransformer', **SMALL_SWIN,
                               init_cfg=pretrained(str(path))))
    with pytest.raises(ValueError, match='evil.pth'):
        rmoe.init_weights()


def test_scratch_init_gives_cores_the_dense_init_and_zero_residuals():
    rmoe = build('mmseg', dict(type='RMoESwinTransformer', **SMALL_SWIN))
    rmoe.init_weights()
    experts = rmoe.moe_layers()[0].moe.experts
    assert experts.core_weights[0].std().item() == pytest.approx(0.02, rel=0.2)
    assert experts.residual_weights[0].abs().sum().item() == 0


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_with_cp_keeps_the_balance_loss_gradient(scope):
    rmoe = build(scope, dict(type='RMoESwinTransformer', **SMALL_SWIN, with_cp=True,
                             moe_cfg=dict(num_experts=4, importance_loss_weight=1.0)))
    rmoe.init_weights()
    rmoe.train()
    x = images().requires_grad_()
    outs = rmoe(x)
    losses = collect_moe_losses(rmoe)
    assert losses['loss_moe_importance'].requires_grad
    (losses['loss_moe_importance'] + sum(o.mean() for o in outs)).backward()
    router = rmoe.moe_layers()[0].moe.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_frozen_stages_freeze_moe_blocks_too():
    rmoe = build('mmseg', dict(type='RMoESwinTransformer', **SMALL_SWIN, frozen_stages=3,
                               moe_blocks='all'))
    rmoe.train()
    frozen = rmoe.stages[2].blocks[0].ffn
    assert isinstance(frozen, RMoEFFN) and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in rmoe.stages[3].parameters())


def test_moe_blocks_choices():
    depths = (2, 2, 6, 2)
    assert resolve_moe_blocks(None, depths) == [[], [], [1, 3, 5], [1]]
    assert resolve_moe_blocks('all', depths)[2] == [0, 1, 2, 3, 4, 5]
    assert resolve_moe_blocks([[], [0], [5, 1], []], depths) == [[], [0], [1, 5], []]
    with pytest.raises(ValueError, match='moe_blocks: stage 3'):
        resolve_moe_blocks([[], [], [], [2]], depths)
    with pytest.raises(ValueError, match='moe_blocks'):
        resolve_moe_blocks('every', depths)

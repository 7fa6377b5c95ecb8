"""Seeing inside the experts: expert maps, expert weight geometry and MoE FLOPs."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from mmengine.analysis import FlopAnalyzer

from rmoe_plugin import RMoEFFN
from rmoe_plugin.analysis import analyze_state_dict, assignment_map, build_from_config, token_grid
from rmoe_plugin.analysis.flops import MoELayerCost, moe_flops_report, record_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = dict(ade20k=os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py'),
               coco=os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_mask-rcnn_coco.py'))
LAYERS = ['backbone.stages.2.blocks.1.ffn', 'backbone.stages.3.blocks.1.ffn']
PNG = b'\x89PNG\r\n\x1a\n'


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_png(path):
    with open(path, 'rb') as f:
        return f.read(8) == PNG


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A checkpoint of each tiny model, residuals set to noise so the experts differ."""
    root = tmp_path_factory.mktemp('ckpt')
    paths = {}
    for dataset, config in CONFIGS.items():
        torch.manual_seed(0)
        model, _ = build_from_config(config)
        model.init_weights()
        for name, module in model.named_modules():
            if name.endswith('moe.experts'):
                module.residual_init_std = 0.01
                module.reset_residuals()
        paths[dataset] = str(root / f'{dataset}.pth')
        torch.save(dict(state_dict=model.state_dict(), meta={}), paths[dataset])
    return paths


def images(tiny_data, dataset, count=2):
    folder = (os.path.join(tiny_data['ade20k'], 'images', 'validation') if dataset == 'ade20k'
              else os.path.join(tiny_data['coco'], 'val2017'))
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:count]]


@pytest.mark.parametrize('dataset', ['ade20k', 'coco'])
def test_visualize_experts_draws_maps_and_load(dataset, checkpoints, tiny_data, tmp_path, capsys):
    tool = load_tool('visualize_experts')
    out = tmp_path / 'vis'
    tool.main([CONFIGS[dataset], checkpoints[dataset], *images(tiny_data, dataset),
               '--out', str(out), '--layers', LAYERS[1]])
    assert is_png(out / 'expert_maps.png') and is_png(out / 'expert_load.png')
    assert f'2 images, 1 MoE layers: {LAYERS[1]}' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='exists'):  # never over earlier outputs by default
        tool.main([CONFIGS[dataset], checkpoints[dataset], *images(tiny_data, dataset),
                   '--out', str(out)])


def test_visualize_experts_names_bad_layers_and_missing_images(checkpoints, tiny_data, tmp_path):
    tool = load_tool('visualize_experts')
    args = [CONFIGS['ade20k'], checkpoints['ade20k']]
    with pytest.raises(SystemExit, match='choose among') as e:
        tool.main(args + images(tiny_data, 'ade20k', 1) + ['--out', str(tmp_path / 'a'),
                                                           '--layers', 'backbone.stages.0'])
    assert LAYERS[0] in str(e.value)
    with pytest.raises(SystemExit, match='nowhere.jpg'):
        tool.main(args + [str(tmp_path / 'nowhere.jpg'), '--out', str(tmp_path / 'b')])


def test_a_checkpoint_without_the_routers_is_refused(checkpoints, tmp_path):
    state = torch.load(checkpoints['ade20k'])['state_dict']
    state = {k: v for k, v in state.items() if '.moe.router.' not in k}
    path = tmp_path / 'no_router.pth'
    torch.save(dict(state_dict=state), path)
    with pytest.raises(ValueError, match='MoE tensors'):
        build_from_config(CONFIGS['ade20k'], str(path))


@pytest.mark.parametrize('tokens, hw, grid', [
    (16, (64, 64), (4, 4, 16)),       # Swin stage 2 of a 64x64 input
    (48, (96, 128), (6, 8, 16)),
    (375, (100, 60), (25, 15, 4)),    # padded: ceil(100 / 4) x ceil(60 / 4)
    (12, (30, 40), (3, 4, None)),     # no stride fits: the factor pair closest to 3:4
])
def test_token_grid_recovers_the_patch_grid(tokens, hw, grid):
    assert token_grid(tokens, hw) == grid


def test_assignment_map_covers_each_token_patch_and_drops_padding():
    index = torch.tensor([0, 1, 2, 3])  # 2x2 tokens of stride 2 over a 4x4 padded input
    labels = assignment_map(index, input_hw=(4, 4), valid_hw=(2, 4), out_hw=(4, 8))
    assert labels.tolist() == [[0] * 4 + [1] * 4] * 4  # the image is the top half only
    with pytest.raises(ValueError, match='num_tokens'):
        token_grid(0, (4, 4))


def test_analyze_experts_writes_json_and_plots(checkpoints, tmp_path, capsys):
    out = tmp_path / 'analysis'
    load_tool('analyze_experts').main([checkpoints['ade20k'], '--out', str(out)])
    results = json.loads((out / 'expert_weights.json').read_text())
    assert list(results) == LAYERS
    layer = results[LAYERS[0]]
    assert len(layer['relative_residual_norm']) == 4 and min(layer['relative_residual_norm']) > 0
    assert np.allclose(np.diag(layer['distances']), 0)
    assert len(layer['pca']['experts']) == 4
    for name in ('residual_norms.png', 'expert_distances.png', 'expert_pca.png'):
        assert is_png(out / name)
    assert LAYERS[1] in capsys.readouterr().out


def test_analyze_experts_refuses_a_dense_checkpoint(tmp_path):
    path = tmp_path / 'dense.pth'
    torch.save(dict(state_dict={'backbone.ffn.layers.0.0.weight': torch.ones(2, 2)}), path)
    with pytest.raises(SystemExit, match='no RMoE layer'):
        load_tool('analyze_experts').main([str(path), '--out', str(tmp_path / 'out')])


def synthetic_layer(num_experts, residual, offset=0.0, seed=0):
    """State dict of one RMoE layer (8 -> 32 -> 8): core N(0, 1), residuals noise + offset."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (o, n) in enumerate([(32, 8), (8, 32)]):
        for kind, shape in (('weights', (o, n)), ('biases', (o, ))):
            shared = offset * torch.randn(shape, generator=g)
            state[f'ffn.moe.experts.core_{kind}.{i}'] = torch.randn(shape, generator=g)
            state[f'ffn.moe.experts.residual_{kind}.{i}'] = shared + residual * torch.randn(
                (num_experts, *shape), generator=g)
    return state


def expert_vectors(state):
    """The core, shape (P,), and the residuals, shape (E, P), as flat vectors."""
    keys = [f'{p}.{i}' for i in range(2) for p in ('weights', 'biases')]
    core = torch.cat([state[f'ffn.moe.experts.core_{k}'].flatten() for k in keys])
    residuals = torch.cat([state[f'ffn.moe.experts.residual_{k}'].flatten(1) for k in keys], 1)
    return core, residuals


def test_pca_puts_the_core_at_the_centre_of_small_noise_residuals():
    state = synthetic_layer(num_experts=8, residual=1e-3)
    result = analyze_state_dict(state)['ffn']
    core, residuals = expert_vectors(state)
    assert result['relative_residual_norm'] == pytest.approx(
        (residuals.norm(dim=1) / core.norm()).tolist(), rel=1e-5)
    assert result['distances'][2][5] == pytest.approx(
        float((residuals[2] - residuals[5]).norm()), rel=1e-5)
    experts = np.asarray(result['pca']['experts'])
    spread = np.linalg.norm(experts, axis=1).mean()
    assert np.linalg.norm(result['pca']['core']) < 0.25 * spread
    # Experts that all moved the same way leave the core off to one side instead.
    moved = analyze_state_dict(synthetic_layer(8, residual=1e-3, offset=1e-2))['ffn']['pca']
    assert np.linalg.norm(moved['core']) > 2 * np.linalg.norm(moved['experts'], axis=1).mean()


def test_analytic_flops_match_a_hand_count_for_one_rmoeffn():
    dims, hidden, experts, top_k, factor, tokens = 8, 32, 4, 2, 1.25, 30
    layer = RMoEFFN(dims, hidden, num_experts=experts, top_k=top_k, capacity_factor=factor,
                    act_cfg=dict(type='GELU'))
    with record_tokens({'ffn': layer.moe}) as calls:
        layer(torch.randn(2, tokens // 2, dims))
    cost = MoELayerCost.from_layer('ffn', layer.moe)
    cost.calls = calls['ffn']
    router = tokens * dims * experts
    per_token = dims * hidden + hidden * dims
    slots = experts * top_k * math.ceil(factor * tokens / experts)  # 4 * 2 * 10
    assert cost.calls == [tokens]
    assert cost.router_flops == router
    assert cost.dense_flops == tokens * per_token
    assert cost.activated_flops == router + top_k * tokens * per_token
    assert cost.executed_flops(factor) == router + slots * per_token
    assert cost.executed_flops(None) == cost.activated_flops
    assert cost.activated_params == dims * experts + top_k * (per_token + hidden + dims)


def test_analytic_flops_agree_with_mmengine_counting_the_layer_itself():
    layer = RMoEFFN(8, 32, num_experts=4, act_cfg=dict(type='GELU')).eval()  # top-1, dropless
    x = torch.randn(1, 24, 8)
    with record_tokens({'ffn': layer.moe}) as calls:
        layer(x)
    cost = MoELayerCost.from_layer('ffn', layer.moe)
    cost.calls = calls['ffn']
    traced = FlopAnalyzer(layer, (x, )).unsupported_ops_warnings(False).total()
    assert traced == cost.activated_flops


def test_get_moe_flops_on_the_tiny_segmentor(capsys):
    load_tool('get_moe_flops').main([CONFIGS['ade20k'], '--shape', '64', '64'])
    out = capsys.readouterr().out
    assert LAYERS[0] in out and 'FLOPs, executed at train capacity' in out
    assert 'params, activated per token' in out


def test_dense_equivalent_flops_are_those_of_the_dense_model():
    torch.manual_seed(0)
    rmoe, cfg = build_from_config(CONFIGS['ade20k'])
    report = moe_flops_report(rmoe, 'mmseg', (64, 96))
    dense, _ = build_from_config(CONFIGS['ade20k'],
                                 cfg_options={'model.backbone.moe_blocks': 'none'})
    counted = FlopAnalyzer(dense, (torch.randn(1, 3, 64, 96), )).unsupported_ops_warnings(
        False).uncalled_modules_warnings(False).total()  # what get_model_complexity_info counts
    assert report['dense_equivalent'] == counted
    tokens = [layer.tokens for layer in report['layers']]
    assert tokens == [4 * 6, 2 * 3]  # 64x96 at strides 16 and 32
    assert report['dense_equivalent'] < report['activated'] < report['executed_train']
    assert report['executed_eval'] == report['activated']  # dropless in evaluation
    assert report['params_activated'] < report['params']


def test_the_analysis_tools_read_a_checkpoint_by_url(checkpoints, tmp_path, monkeypatch, capsys):
    from checkpoint_server import CheckpointServer
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    server = CheckpointServer()
    try:
        url = server.serve('rmoe.pth', torch.load(checkpoints['ade20k']))
        load_tool('analyze_experts').main([url, '--out', str(tmp_path / 'analysis')])
        assert LAYERS[1] in capsys.readouterr().out
        model, _ = build_from_config(CONFIGS['ade20k'], url)  # what visualize_experts loads
        assert server.requests == ['/rmoe.pth']  # the second load: from the cache
        want = torch.load(checkpoints['ade20k'])['state_dict']
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
        with pytest.raises(SystemExit, match='could not be downloaded: HTTP 404'):
            load_tool('analyze_experts').main([server.url('x.pth'), '--out', str(tmp_path / 'b')])
    finally:
        server.close()

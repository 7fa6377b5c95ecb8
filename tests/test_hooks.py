"""MoEStatsHook: routing statistics of every MoE layer reach the log and the visualizer."""
import json
import math
import os

import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import rmoe_plugin  # noqa: F401  (registers the hook)
from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.engine.hooks import (MoEStatsHook, RoutingTotals, find_moe_layers,
                                      last_forward_summary)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EXPERTS = 4
LAYERS = ('blocks.0', 'blocks.1')


class ToyData(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        return dict(inputs=torch.randn(16, 8, generator=g))


class TwoMoEModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[
            RMoEFFN(8, 16, num_experts=NUM_EXPERTS, act_cfg=dict(type='GELU'),
                    capacity_factor=1.0, residual_init_std=0.02) for _ in LAYERS])

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.blocks(torch.stack(inputs) if isinstance(inputs, list) else inputs)
        if mode == 'loss':
            return dict(loss_task=out.square().mean(), **collect_moe_losses(self))
        if mode == 'predict':
            return [dict(score=o.mean()) for o in out]
        return out


class MeanScore(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results += [float(s['score']) for s in data_samples]

    def compute_metrics(self, results):
        return dict(score=sum(results) / len(results))


def loader(shuffle):
    return dict(dataset=ToyData(), batch_size=2, collate_fn=dict(type='default_collate'),
                sampler=dict(type='DefaultSampler', shuffle=shuffle))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('hook')
    runner = Runner(
        model=TwoMoEModel(), work_dir=str(work_dir), experiment_name='moe_stats',
        train_dataloader=loader(True), val_dataloader=loader(False),
        val_evaluator=[MeanScore()], val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=4, val_interval=4),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=2), checkpoint=None),
        custom_hooks=[dict(type='MoEStatsHook', interval=2)],
        log_processor=dict(by_epoch=False),
        visualizer=dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]),
        randomness=dict(seed=0))
    runner.train()
    return runner, work_dir


def stat_keys(mode):
    keys = set()
    for layer in LAYERS:
        keys |= {f'{mode}/moe/{layer}/{name}'
                 for name in ('drop_fraction', 'importance_cv', 'router_entropy')}
        keys |= {f'{mode}/moe/{layer}/load/{e}' for e in range(NUM_EXPERTS)}
    return keys


@pytest.mark.parametrize('mode', ['train', 'val'])
def test_hook_writes_sane_statistics_to_the_message_hub(trained, mode):
    runner, _ = trained
    scalars = {k: v.current() for k, v in runner.message_hub.log_scalars.items()
               if k.startswith(f'{mode}/moe/')}
    assert set(scalars) == stat_keys(mode)
    for layer in LAYERS:
        prefix = f'{mode}/moe/{layer}/'
        loads = [scalars[f'{prefix}load/{e}'] for e in range(NUM_EXPERTS)]
        assert sum(loads) == pytest.approx(1.0) and min(loads) >= 0
        assert 0 <= scalars[prefix + 'drop_fraction'] <= 1
        assert 0 <= scalars[prefix + 'router_entropy'] <= math.log(NUM_EXPERTS) + 1e-6
        assert scalars[prefix + 'importance_cv'] >= 0
    if mode == 'val':  # dropless in evaluation
        assert all(scalars[f'val/moe/{layer}/drop_fraction'] == 0 for layer in LAYERS)


def test_statistics_reach_the_log_file_and_the_visualizer(trained):
    runner, work_dir = trained
    log = next(work_dir.rglob('*.log')).read_text()
    train_lines = [line for line in log.splitlines() if 'Iter(train)' in line]
    assert len(train_lines) == 2
    assert all('moe/blocks.1/drop_fraction' in line for line in train_lines)
    val_line = next(line for line in log.splitlines() if 'Iter(val) [3/3]' in line)
    assert 'moe/blocks.0/router_entropy' in val_line and 'score' in val_line
    records = [json.loads(line) for line in next(work_dir.rglob('scalars.json')).open()]
    assert any('moe/blocks.0/load/3' in r for r in records)
    assert any('moe/blocks.1/importance_cv' in r and 'score' in r for r in records)
    assert not any('loss' in k for r in records for k in r if k.startswith('moe/'))


def test_validation_sums_every_forward_of_the_loop():
    model = TwoMoEModel().eval()
    layers = find_moe_layers(model)
    hook = MoEStatsHook()
    hook._layers = layers

    class FakeRunner:
        def __init__(self):
            from mmengine.logging import MessageHub
            self.message_hub = MessageHub.get_instance('moe-stats-test')

    runner = FakeRunner()
    hook.before_val_epoch(runner)
    batches = [torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    expected = torch.zeros(NUM_EXPERTS)
    with torch.no_grad():
        for batch in batches:
            model(batch)
            expected += layers[0][1].last_stats['expert_load']
    hook.after_val_epoch(runner)
    loads = [runner.message_hub.get_scalar(f'val/moe/blocks.0/load/{e}').current()
             for e in range(NUM_EXPERTS)]
    assert loads == pytest.approx((expected / expected.sum()).tolist())
    assert all(not layer._forward_hooks for _, layer in layers)  # hooks removed


def test_last_forward_summary_matches_the_layer_statistics():
    model = TwoMoEModel().train()
    layers = find_moe_layers(model)
    assert last_forward_summary(layers) == {}  # nothing has run yet
    model(torch.randn(2, 16, 8))
    summary = last_forward_summary(layers)
    stats = layers[1][1].last_stats
    load = stats['expert_load'].double()
    assert summary['moe/blocks.1/drop_fraction'] == pytest.approx(stats['drop_fraction'].item())
    assert summary['moe/blocks.1/router_entropy'] == pytest.approx(
        stats['router_entropy'].item())
    importance = stats['importance'].double()
    assert summary['moe/blocks.1/importance_cv'] == pytest.approx(
        (importance.std(unbiased=False) / importance.mean()).item())
    assert summary['moe/blocks.1/load/2'] == pytest.approx((load[2] / load.sum()).item())


def test_layers_are_named_by_module_path_in_the_tiny_swin():
    from mmengine.config import Config
    from mmseg.registry import MODELS
    cfg = Config.fromfile(os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
    names = [name for name, _ in find_moe_layers(model)]
    assert names == ['backbone.stages.2.blocks.1.ffn', 'backbone.stages.3.blocks.1.ffn']


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_hook_builds_from_mmseg_and_mmdet_configs(scope):
    registry = {'mmseg': 'mmseg.registry', 'mmdet': 'mmdet.registry'}[scope]
    hooks = __import__(registry, fromlist=['HOOKS']).HOOKS
    with DefaultScope.overwrite_default_scope(scope):
        hook = hooks.build(dict(type='MoEStatsHook', interval=7))
    assert isinstance(hook, MoEStatsHook) and hook.interval == 7


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match='interval'):
        MoEStatsHook(interval=0)


def test_routing_totals_by_hand():
    totals = RoutingTotals(num_experts=4, top_k=2)
    totals.add(dict(expert_load=torch.tensor([3., 1., 0., 0.]),  # 2 tokens x top-2
                    tokens_per_expert=torch.tensor([2., 1., 0., 0.]),  # one assignment dropped
                    importance=torch.tensor([1.0, 0.5, 0.25, 0.25]),
                    router_entropy=torch.tensor(0.5)))
    totals.add(dict(expert_load=torch.tensor([0., 1., 2., 1.]),
                    tokens_per_expert=torch.tensor([0., 1., 2., 1.]),
                    importance=torch.tensor([0.0, 0.5, 0.75, 0.75]),
                    router_entropy=torch.tensor(1.0)))
    load = [3 / 8, 2 / 8, 2 / 8, 1 / 8]
    # importance summed: [1, 1, 1, 1], so no spread; entropy: (0.5 * 2 + 1.0 * 2) / 4 tokens
    assert totals.summary().tolist() == pytest.approx(load + [1 / 8, 0.0, 0.75])


def test_evaluation_totals_are_summed_over_two_gloo_processes(tmp_path):
    """Each rank routes its own batch; after all_reduce both hold the totals of both batches,
    as one process that saw both would (and a rank that saw nothing still takes part)."""
    import socket
    import sys

    import torch.multiprocessing as mp
    sys.path.insert(0, os.path.join(ROOT, 'tests', 'helpers'))
    import rmoe_dist_helpers
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(rmoe_dist_helpers.routing_totals_worker, args=(2, port, str(tmp_path)), nprocs=2)
    layer = rmoe_dist_helpers.routing_layer()
    both, first = (RoutingTotals(layer.num_experts, layer.top_k) for _ in range(2))
    with torch.no_grad():
        for rank in (0, 1):
            layer(rmoe_dist_helpers.routing_batch(rank))
            both.add(layer.last_stats)
            if rank == 0:
                first.add(layer.last_stats)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    assert 0 < both.summary()[4] < 1  # the capacity dropped some assignments
    assert not torch.allclose(both.summary(), first.summary())  # the second batch counts
    for result in results:
        torch.testing.assert_close(result['summed'], both.summary())
        torch.testing.assert_close(result['only_rank0'], first.summary())

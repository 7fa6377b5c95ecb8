"""The pieces of the RMoE pipelines: block selection, cost records, reports, and a miniature
run of all four pipelines through mmengine's Runner."""
import json
import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from rmoe_plugin.datasets import make_ade20k, make_imagenet
from rmoe_plugin.pipeline import (load_runs, make_pipelines, markdown_table, plot,
                                  run_pipeline, summarise)
from rmoe_plugin.pipeline.run import fit_schedule
from rmoe_plugin.pipeline.select import choose_blocks, gradient_variance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPE = os.path.join(ROOT, 'configs', 'pipeline')
CONFIGS = dict(cls_dense=f'{PIPE}/swin-mini_dense_cls-imagenet-64x64.py',
               cls_rmoe=f'{PIPE}/swin-mini_rmoe-e4_cls-imagenet-64x64.py',
               seg_dense=f'{PIPE}/swin-mini_dense_upernet_seg-ade20k-64x64.py',
               seg_rmoe=f'{PIPE}/swin-mini_rmoe-e4_upernet_seg-ade20k-64x64.py')


def test_gradient_variance_is_the_trace_of_the_per_sample_gradient_covariance():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    targets = torch.tensor([[1.0, -1.0], [3.0, 1.0]])

    def loss(i):  # grad wrt a: targets[i]; grad wrt b: 2 for every sample
        return (a * targets[i]).sum() + 2 * b.sum()

    scores = gradient_variance(loss, 2, {(0, 0): [a], (0, 1): [b]})
    # mean |g|^2 = (2 + 10) / 2 = 6, |mean g|^2 = 2^2 + 0^2 = 4
    assert scores[(0, 0)] == pytest.approx(2.0)
    assert scores[(0, 1)] == pytest.approx(0.0)


def test_choose_blocks_takes_the_best_scores_per_stage():
    scores = {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 3.0, (1, 1): 0.5, (1, 2): 2.0}
    assert choose_blocks(scores, 3, depths=(2, 3)) == [[], [0, 1, 2]]
    assert choose_blocks(scores, 1, depths=(2, 3)) == [[], [0]]
    with pytest.raises(ValueError, match='num_blocks'):
        choose_blocks(scores, 0, depths=(2, 3))


def test_fit_schedule_keeps_warmup_short_and_decays_to_the_end():
    schedulers = [dict(type='LinearLR', begin=0, end=20), dict(type='PolyLR', begin=20, end=9)]
    fit_schedule(schedulers, 10)
    assert schedulers == [dict(type='LinearLR', begin=0, end=2),
                          dict(type='PolyLR', begin=2, end=10)]


def fake_record(name, miou, stages):
    return dict(pipeline=name, seed=0, stages=[
        dict(name=n, config='', work_dir='', checkpoint='',
             cost=dict(wall_s=c, process_s=c, train_flops=c * 1e9, iters=1),
             metrics=dict(mIoU=miou)) for n, c in stages])


def test_report_relates_every_pipeline_to_dense_and_moe(tmp_path):
    records = [fake_record('dense', 40.0, [('upstream', 100), ('downstream', 50)]),
               fake_record('rmoe_i', 42.0, [('upstream', 100), ('intermediate', 4),
                                            ('downstream', 51)]),
               fake_record('moe', 42.5, [('upstream', 200), ('downstream', 51)])]
    os.makedirs(tmp_path / 'seed0')
    for r in records:
        (tmp_path / 'seed0' / f'{r["pipeline"]}.json').write_text(json.dumps(r))
    rows = {r['pipeline']: r for r in summarise(load_runs(str(tmp_path)), 'mIoU')}
    assert rows['rmoe_i']['vs_dense'] == pytest.approx(155 / 150 - 1)
    assert rows['rmoe_i']['vs_moe'] == pytest.approx(155 / 251 - 1)
    table = markdown_table(list(rows.values()), 'mIoU')
    assert rows['rmoe_i']['delta'] == pytest.approx(2.0)
    assert '| RMoE-I | 42.00 ± 0.00 | +2.00 ± 0.00 |' in table and '+3.3%' in table
    fig = plot(list(rows.values()), 'mIoU', str(tmp_path / 'p.png'))
    assert (tmp_path / 'p.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    ax, = fig.axes
    left, right = ax.get_xlim()
    assert left == 0 and right >= 251  # the cost axis from zero, MoE's 251 GFLOPs inside it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        'dense (lower bound) (+0.0% FLOPs)', 'RMoE-I (+3.3% FLOPs)',
        'MoE (upper bound) (+67.3% FLOPs)']
    with pytest.raises(FileNotFoundError, match='no finished pipeline'):
        load_runs(str(tmp_path / 'nothing'))


@pytest.fixture(scope='module')
def pipeline_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('pdata')
    return dict(imagenet=make_imagenet(str(root), num_train=4, num_val=2),
                ade=make_ade20k(str(root), num_train=8, num_val=4, size=(64, 64)))


def data_options(data):
    def roots(path):
        return {f'{d}.dataset.data_root': path
                for d in ('train_dataloader', 'val_dataloader', 'test_dataloader')}
    return {CONFIGS['cls_dense']: roots(data['imagenet']),
            CONFIGS['cls_rmoe']: roots(data['imagenet']),
            CONFIGS['seg_dense']: roots(data['ade']), CONFIGS['seg_rmoe']: roots(data['ade'])}


@pytest.mark.e2e
def test_four_pipelines_chain_their_checkpoints_and_record_costs(pipeline_data, tmp_path):
    pipelines = make_pipelines(CONFIGS, 4, 2, 4)
    options = data_options(pipeline_data)
    reported = []

    def on_stage(name, seed, result, reused, seconds):
        reported.append((name, result.name, reused))
        assert seed == 0 and seconds >= 0 and os.path.isdir(result.work_dir)
    records = {name: run_pipeline(name, stages, str(tmp_path), 0, options, on_stage)
               for name, stages in pipelines.items()}
    # one report per stage; the dense upstream stage trained once, then shared
    assert reported == [
        ('dense', 'upstream', False), ('dense', 'downstream', False),
        ('rmoe_i', 'upstream', True), ('rmoe_i', 'intermediate', False),
        ('rmoe_i', 'downstream', False),
        ('rmoe_d', 'upstream', True), ('rmoe_d', 'downstream', False),
        ('moe', 'upstream', False), ('moe', 'downstream', False)]
    # the dense upstream stage ran once and serves dense, RMoE-I and RMoE-D
    assert sorted(os.listdir(tmp_path / 'seed0' / 'stages')) == [
        'dense-downstream', 'dense-upstream', 'moe-downstream', 'moe-upstream',
        'rmoe_d-downstream', 'rmoe_i-downstream', 'rmoe_i-intermediate']
    for record in records.values():
        for stage in record['stages']:
            assert stage['cost']['iters'] > 0 and stage['cost']['train_flops'] > 0
        assert 'mIoU' in record['stages'][-1]['metrics']
    intermediate = torch.load(records['rmoe_i']['stages'][1]['checkpoint'])['state_dict']
    assert any('.moe.experts.residual_weights.' in k for k in intermediate)
    # RMoE-I's downstream starts from the intermediate experts, not fresh ones
    downstream = torch.load(records['rmoe_i']['stages'][2]['checkpoint'])['state_dict']
    key = next(k for k in intermediate if k.endswith('moe.router.weight'))
    assert key in downstream
    rows = summarise(load_runs(str(tmp_path)), 'mIoU')
    assert [r['pipeline'] for r in rows] == ['dense', 'rmoe_d', 'rmoe_i', 'moe']
    # a finished stage is reused, not trained again
    reported.clear()
    again = run_pipeline('dense', pipelines['dense'], str(tmp_path), 0, options, on_stage)
    assert again == records['dense']
    assert reported == [('dense', 'upstream', True), ('dense', 'downstream', True)]


@pytest.mark.e2e
def test_select_moe_blocks_writes_a_config_that_builds(pipeline_data, tmp_path):
    out = tmp_path / 'selected.py'
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'select_moe_blocks.py'),
         CONFIGS['seg_rmoe'], '--num-blocks', '2', '--max-images', '3', '--out', str(out),
         '--cfg-options', f'train_dataloader.dataset.data_root={pipeline_data["ade"]}'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = Config.fromfile(str(out))
    chosen = cfg.model.backbone.moe_blocks
    assert sum(len(b) for b in chosen) == 2 and cfg.model.type == 'RMoEEncoderDecoder'
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'select_moe_blocks.py'),
         CONFIGS['seg_rmoe'], '--out', str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and 'exists' in again.stderr


def test_cost_hook_records_a_stage_and_adds_up_a_resumed_one(tmp_path):
    from test_checkpoint import make_runner  # the toy RMoE model and its Runner
    make_runner(tmp_path, max_iters=2, custom_hooks=[dict(type='CostHook')]).train()
    first = json.loads((tmp_path / 'cost.json').read_text())
    assert first['iters'] == 2 and first['flops_per_iter'] > 0
    assert first['train_flops'] == 2 * first['flops_per_iter']
    assert first['wall_s'] > 0 and first['process_s'] > 0
    make_runner(tmp_path, max_iters=4, resume=True, custom_hooks=[dict(type='CostHook')]).train()
    resumed = json.loads((tmp_path / 'cost.json').read_text())
    assert resumed['iters'] == 4 and resumed['flops_per_iter'] == first['flops_per_iter']
    assert resumed['wall_s'] > first['wall_s']

"""More than one process on a CPU machine: torchrun + tools/train.py over gloo, and resume.

The runs use tests/helpers/tiny_rmoe_upernet_ade20k_steady.py: the tiny ADE20K config with a
fixed seed and no router noise, drop path or dropout, and a hook that writes each rank's
checksum of every parameter and buffer after training.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from mmengine.config import Config

from rmoe_plugin.engine import launch

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, 'tests', 'helpers')
BIN = os.path.dirname(sys.executable)
STEADY = os.path.join(HELPERS, 'tiny_rmoe_upernet_ade20k_steady.py')
STEADY_EMA = os.path.join(HELPERS, 'tiny_rmoe_upernet_ade20k_steady_ema.py')
TRAIN = os.path.join(ROOT, 'tools', 'train.py')
TEST = os.path.join(ROOT, 'tools', 'test.py')

sys.path.insert(0, HELPERS)
import rmoe_dist_helpers  # noqa: E402


def data_options(root):
    return ['--cfg-options'] + [f'{d}.dataset.data_root={root}'
                                for d in ('train_dataloader', 'val_dataloader', 'test_dataloader')]


def run(command, cwd):
    """Runs ``command`` with tests/helpers importable and one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [HELPERS, os.environ.get('PYTHONPATH')])))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    return result.returncode, result.stdout + result.stderr


def torchrun_train(work_dir, data_root, *extra, nproc=2, config=STEADY):
    command = [os.path.join(BIN, 'torchrun'), '--standalone', '--nproc_per_node', str(nproc),
               TRAIN, config, '--launcher', 'pytorch', '--work-dir', str(work_dir), *extra,
               *data_options(data_root)]
    return run(command, cwd=work_dir)


def expert_parallel(size):
    return ['model_wrapper_cfg.type=RMoEDistributedDataParallel',
            f'model_wrapper_cfg.expert_parallel_size={size}']


def train_lines(output):
    return [line for line in output.splitlines() if 'Iter(train)' in line]


def load(path):
    return torch.load(path, map_location='cpu')


def replica_records(work_dir):
    return [json.loads((work_dir / f'rank{r}.json').read_text()) for r in range(2)]


@pytest.fixture(scope='module')
def full_run(tiny_data, tmp_path_factory):
    """4 iterations on 2 processes, uninterrupted."""
    work_dir = tmp_path_factory.mktemp('full')
    code, out = torchrun_train(work_dir, tiny_data['ade20k'])
    assert code == 0, out[-4000:]
    return work_dir, out


def test_two_cpu_processes_keep_identical_replicas(full_run):
    work_dir, out = full_run
    assert "backend='gloo'" in out and 'Distributed training: True' in out
    lines = train_lines(out)
    assert len(lines) == 4 and all('loss_moe_importance' in line for line in lines)
    assert 'mIoU' in out
    rank0, rank1 = replica_records(work_dir)
    assert (rank0['world_size'], rank0['iter'], rank1['rank']) == (2, 4, 1)
    keys = rank0['checksums'].keys()
    assert any('.moe.experts.residual_weights' in k for k in keys)
    assert any('.moe.router.' in k for k in keys)
    assert any(k.endswith('bn.running_mean') for k in keys)  # SyncBN statistics, as CPUSyncBN
    differing = [k for k in keys if rank0['checksums'][k] != rank1['checksums'][k]]
    assert not differing, f'replicas differ in {differing}'


def test_killed_run_resumes_to_the_uninterrupted_weights(full_run, tiny_data, tmp_path):
    full_dir, _ = full_run
    code, out = torchrun_train(tmp_path, tiny_data['ade20k'], '--cfg-options',
                               'default_hooks.exit.type=ExitAtIterHook',
                               'default_hooks.exit.iteration=3')
    assert code != 0 and 'ExitAtIterHook: exiting after iteration 3' in out, out[-4000:]
    assert 'Iter(train) [3/4]' in out and 'Iter(train) [4/4]' not in out, out[-4000:]
    assert (tmp_path / 'iter_2.pth').exists() and not (tmp_path / 'iter_4.pth').exists()

    code, out = torchrun_train(tmp_path, tiny_data['ade20k'], '--resume')
    assert code == 0, out[-4000:]
    assert 'resumed' in out.lower()
    assert [line.split('Iter(train) ')[1][:5] for line in train_lines(out)] == ['[3/4]', '[4/4]']
    rank0, rank1 = replica_records(tmp_path)
    assert rank0['checksums'] == rank1['checksums']

    resumed, full = load(tmp_path / 'iter_4.pth'), load(full_dir / 'iter_4.pth')
    assert resumed['meta']['iter'] == full['meta']['iter'] == 4
    assert resumed['state_dict'].keys() == full['state_dict'].keys()
    moe_keys = [k for k in full['state_dict'] if '.moe.' in k]
    assert any('residual_weights' in k for k in moe_keys) and any('router' in k for k in moe_keys)
    differing = [k for k, v in full['state_dict'].items()
                 if not torch.equal(v, resumed['state_dict'][k])]
    assert not differing, f'killed + resumed differs from uninterrupted in {differing}'
    for a, b in zip(full['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert all(torch.equal(a[name], b[name]) for name in a)
    # The weights did move since the checkpoint resumed from, so equality means something.
    start = load(tmp_path / 'iter_2.pth')['state_dict']
    assert not all(torch.equal(start[k], full['state_dict'][k]) for k in moe_keys)


def test_single_process_tools_resume_from_a_path_and_test(full_run, tiny_data, tmp_path):
    full_dir, _ = full_run
    code, out = run([sys.executable, TRAIN, STEADY, '--work-dir', str(tmp_path),
                     '--resume', str(full_dir / 'iter_2.pth'), *data_options(tiny_data['ade20k'])],
               cwd=tmp_path)
    assert code == 0, out[-4000:]
    assert 'Distributed training: False' in out
    assert [line.split('Iter(train) ')[1][:5] for line in train_lines(out)] == ['[3/4]', '[4/4]']
    code, out = run([sys.executable, TEST, STEADY, str(tmp_path / 'iter_4.pth'), '--work-dir',
                     str(tmp_path / 'test'), *data_options(tiny_data['ade20k'])], cwd=tmp_path)
    assert code == 0, out[-4000:]
    assert 'Iter(test)' in out and 'mIoU' in out


@pytest.fixture(scope='module')
def ema_runs(tiny_data, tmp_path_factory):
    """4 iterations on 2 processes with EMA and gradient clipping: plain DDP, then expert
    parallelism with each rank holding 2 of the 4 experts of each layer, and with_cp."""
    runs = {}
    # with_cp checkpoints the MoE blocks without re-entry: the exchange runs again in the
    # backward (with_cp changes no number of plain DDP's).
    expert_parallel_options = ['--cfg-options', 'model.backbone.with_cp=True',
                               *expert_parallel(2)]
    for name, extra in (('ddp', []), ('expert_parallel', expert_parallel_options)):
        work_dir = tmp_path_factory.mktemp(name)
        code, out = torchrun_train(work_dir, tiny_data['ade20k'], *extra, config=STEADY_EMA)
        assert code == 0, out[-4000:]
        runs[name] = work_dir, out
    return runs


def parameter_names():
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    return [name for name, _ in MODELS.build(Config.fromfile(STEADY).model).named_parameters()]


def test_expert_parallel_training_equals_data_parallel(ema_runs):
    (dense_dir, dense_out), (ep_dir, out) = ema_runs['ddp'], ema_runs['expert_parallel']
    assert 'RMoEDistributedDataParallel' in out and len(train_lines(out)) == 4
    grad_norms = [[line.split('grad_norm: ')[1].split()[0] for line in train_lines(o)]
                  for o in (dense_out, out)]
    assert grad_norms[0] == grad_norms[1]  # clipped by the same global norm
    rank0, rank1 = replica_records(ep_dir)
    assert rank0['checksums'] == rank1['checksums']  # state dicts gather every expert
    data_parallel, ep = load(dense_dir / 'iter_4.pth'), load(ep_dir / 'iter_4.pth')
    residual = 'backbone.stages.2.blocks.1.ffn.moe.experts.residual_weights.0'
    assert ep['state_dict'][residual].shape[0] == 4  # all experts, from both ranks
    assert ep['ema_state_dict']['module.' + residual].shape[0] == 4
    # A LayerNorm bias ahead of a batch norm (UperNet's laterals) has gradient zero but for
    # rounding, which AdamW divides by eps: there both runs move by noise, within 1e-5.
    names = parameter_names()
    noise = {names[i] for i, state in data_parallel['optimizer']['state'].items()
             if state['exp_avg_sq'].sqrt().max() < 1e-9}
    assert all(name.endswith('bias') and 'norm' in name for name in noise), noise
    for part, prefix in (('state_dict', ''), ('ema_state_dict', 'module.')):
        for key, value in data_parallel[part].items():
            atol = 1e-5 if key[len(prefix):] in noise else 1e-7
            torch.testing.assert_close(ep[part][key], value, rtol=1e-4, atol=atol,
                                       msg=f'{part} {key}')
    for index, state in data_parallel['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(ep['optimizer']['state'][index][name], value,
                                       rtol=1e-4, atol=1e-5 if names[index] in noise else 1e-7,
                                       msg=f'{names[index]} {name}')


@pytest.mark.parametrize('nproc', [4, 1])
def test_expert_parallel_run_resumes_on_another_world_size(ema_runs, tiny_data, tmp_path,
                                                           nproc):
    ep_dir, _ = ema_runs['expert_parallel']
    options = ['--resume', str(ep_dir / 'iter_2.pth'), '--cfg-options',
               'default_hooks.start.type=SaveAtTrainStartHook']
    if nproc == 1:
        code, out = run([sys.executable, TRAIN, STEADY_EMA, '--work-dir', str(tmp_path),
                         *options, *data_options(tiny_data['ade20k'])], cwd=tmp_path)
    else:
        code, out = torchrun_train(tmp_path, tiny_data['ade20k'], *options,
                                   *expert_parallel(nproc), nproc=nproc, config=STEADY_EMA)
    assert code == 0, out[-4000:]
    assert [line.split('Iter(train) ')[1][:5] for line in train_lines(out)] == ['[3/4]', '[4/4]']
    saved, resumed = load(ep_dir / 'iter_2.pth'), load(tmp_path / 'train_start.pth')
    for part in ('state_dict', 'ema_state_dict'):
        for key, value in saved[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    for index, state in saved['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(resumed['optimizer']['state'][index][name], value), (index, name)
    assert (tmp_path / 'iter_4.pth').exists()


def test_cpu_sync_bn_matches_batch_norm_on_the_global_batch():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(rmoe_dist_helpers.sync_bn_worker, args=(2, port), nprocs=2)


def cpu_launch_cfg(**extra):
    return Config(dict(launcher='pytorch', model=dict(
        type='EncoderDecoder', decode_head=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
        heads=[dict(norm_cfg=dict(type='MMSyncBN')), dict(norm_cfg=dict(type='BN'))]), **extra))


def test_setup_launch_prepares_a_cpu_config(monkeypatch):
    started = []
    monkeypatch.setattr(launch.torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(launch, 'init_cpu_process_group', lambda *a, **k: started.append(k))
    cfg = launch.setup_launch(cpu_launch_cfg(
        env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60)),
        model_wrapper_cfg=dict(find_unused_parameters=True)))
    assert started == [dict(timeout=60, port=None)]
    assert cfg.env_cfg.dist_cfg == dict(backend='gloo', timeout=60)
    assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel', device_ids=None,
                                         find_unused_parameters=True, broadcast_buffers=False)
    assert cfg.model.decode_head.norm_cfg == dict(type='CPUSyncBN', requires_grad=True)
    assert [h.norm_cfg.type for h in cfg.model.heads] == ['CPUSyncBN', 'BN']
    cfg = launch.setup_launch(cpu_launch_cfg(find_unused_parameters=True))  # no env_cfg
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.find_unused_parameters is True
    with pytest.raises(ValueError, match='sync_bn'):
        launch.setup_launch(cpu_launch_cfg(sync_bn='torch'))
    with pytest.raises(ValueError, match='launcher'):
        launch.setup_launch(Config(dict(launcher='srun')))


def test_setup_launch_changes_nothing_with_cuda_or_one_process(monkeypatch):
    monkeypatch.setattr(launch, 'init_cpu_process_group', lambda *a, **k: pytest.fail('started'))
    for launcher, cuda in (('pytorch', True), ('none', False)):
        monkeypatch.setattr(launch.torch.cuda, 'is_available', lambda: cuda)
        cfg = cpu_launch_cfg()
        cfg.launcher = launcher
        before = cfg.to_dict()
        assert launch.setup_launch(cfg).to_dict() == before


def test_launcher_environment_errors_name_the_missing_variables(monkeypatch):
    # delenv also undoes what set_rank_environment writes into os.environ.
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match='RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.*torchrun'):
        launch.set_rank_environment('pytorch')
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_NODELIST', 'node1')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('MASTER_ADDR', 'node1')
    launch.set_rank_environment('slurm', port=29611)
    assert [os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT')] == \
        ['3', '8', '1', '29611']


def test_tools_resume_path_and_framework_scripts():
    split = launch.split_resume_path
    assert split(['c.py', '--resume']) == (['c.py', '--resume'], None)
    assert split(['c.py', '--resume', 'a.pth', '--amp']) == (['c.py', '--resume', '--amp'], 'a.pth')
    assert split(['c.py', '--resume=a.pth']) == (['c.py', '--resume'], 'a.pth')
    assert split(['c.py', '--resume', '--amp']) == (['c.py', '--resume', '--amp'], None)
    assert launch.config_scope([STEADY, '--work-dir', 'x'], 'train') == 'mmseg'
    assert launch.config_scope(['--work-dir', 'x', STEADY, '--cfg-options',
                                'default_scope=mmdet'], 'train') == 'mmdet'
    for scope in ('mmseg', 'mmdet'):
        for tool in ('train', 'test'):
            assert launch.framework_tool(scope, tool).endswith(f'tools/{tool}.py')
    with pytest.raises(ValueError, match='default_scope'):
        launch.framework_tool('mmocr', 'train')

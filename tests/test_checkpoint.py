"""mmengine's own checkpoints load under torch's weights_only default once the plugin is in."""
import os
import pickletools
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import rmoe_plugin  # noqa: F401  (allow-lists mmengine's checkpoint types)
from rmoe_plugin import RMoEFFN, collect_moe_losses
from rmoe_plugin.engine.checkpoint import (HISTORY_BUFFER_STATISTICS, NUMPY_MULTIARRAY_MODULES,
                                           load_checkpoint_file)


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        return dict(inputs=torch.randn(4, 8, generator=g))


class ToyMoEModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.ffn = RMoEFFN(8, 16, num_experts=4, act_cfg=dict(type='GELU'))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.ffn(torch.stack(inputs) if isinstance(inputs, list) else inputs)
        if mode == 'loss':
            return dict(loss_task=out.square().mean(), **collect_moe_losses(self))
        return out


def make_runner(work_dir, max_iters, **kwargs):
    return Runner(
        model=ToyMoEModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), batch_size=2,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0), **kwargs)


def test_resume_and_load_from_an_mmengine_checkpoint(tmp_path):
    first = make_runner(tmp_path, max_iters=2)
    first.train()
    ckpt = tmp_path / 'iter_2.pth'
    assert ckpt.exists()
    counter = CountIters()
    resumed = make_runner(tmp_path, max_iters=4, resume=True, custom_hooks=[counter])
    resumed.train()
    assert resumed.iter == 4 and counter.count == 2  # continued from iteration 2
    loaded = make_runner(tmp_path / 'b', max_iters=1, load_from=str(ckpt))
    loaded.train()
    saved = torch.load(ckpt, map_location='cpu')['state_dict']
    assert 'ffn.moe.experts.residual_weights.0' in saved


class CountIters(Hook):
    def __init__(self):
        self.count = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.count += 1


class MakeFolder:
    """A pickle that creates ``path`` when loaded with ``weights_only=False``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path, ))


def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tmp_path):
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': MakeFolder(marker)}, path)
    with pytest.raises(ValueError, match=r'refusing checkpoint .*evil\.pth.*posix\.mkdir'):
        load_checkpoint_file(str(path))
    with pytest.raises(ValueError, match='refusing checkpoint'):  # mmengine's own loader
        make_runner(tmp_path / 'run', max_iters=1, load_from=str(path)).train()
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: unrestricted loading runs it
    assert marker.exists()


def rewrite_numpy_module(path, module):
    """The checkpoint at ``path`` as if written under the numpy whose multiarray is
    ``module`` (pickles name the writer's module)."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            if name.endswith('/data.pkl'):
                for spelling in NUMPY_MULTIARRAY_MODULES:
                    data = data.replace(f'c{spelling}\n'.encode(), f'c{module}\n'.encode())
            archive.writestr(name, data)


def pickled_globals(path):
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith('/data.pkl')))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL'}


@pytest.mark.parametrize('module', NUMPY_MULTIARRAY_MODULES)  # numpy 1 and numpy 2
def test_a_checkpoint_from_either_numpy_resumes(tmp_path, module):
    make_runner(tmp_path, max_iters=2).train()
    ckpt = tmp_path / 'iter_2.pth'
    rewrite_numpy_module(ckpt, module)
    numpy_globals = {g for g in pickled_globals(ckpt) if 'multiarray' in g}
    assert numpy_globals == {f'{module} scalar', f'{module} _reconstruct'}
    counter = CountIters()
    resumed = make_runner(tmp_path, max_iters=4, resume=True, custom_hooks=[counter])
    resumed.train()
    assert resumed.iter == 4 and counter.count == 2
    losses = load_checkpoint_file(str(ckpt))['message_hub']['log_scalars']['train/loss']
    assert isinstance(losses, HistoryBuffer) and len(losses.data[0]) >= 2
    assert losses.mean() == pytest.approx(float(np.mean(losses.data[0])))


class Attribute:
    """Pickles as ``getattr(owner, name)``, as HistoryBuffer's statistics methods do."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


@pytest.mark.parametrize('name', HISTORY_BUFFER_STATISTICS)
def test_getattr_in_a_checkpoint_hands_out_history_buffer_statistics(tmp_path, name):
    path = tmp_path / 'statistic.pth'
    torch.save({'meta': Attribute(HistoryBuffer, name)}, path)
    assert load_checkpoint_file(str(path))['meta'] is getattr(HistoryBuffer, name)


@pytest.mark.parametrize('owner, name', [
    (HistoryBuffer, '__init__'), (HistoryBuffer, 'update'), (HistoryBuffer, 'statistics'),
    (HistoryBuffer, 'register_statistics'), (HistoryBuffer, '__class__'),
    (np.ndarray, 'tofile'), (OrderedDict, 'fromkeys')])
def test_getattr_in_a_checkpoint_hands_out_nothing_else(tmp_path, owner, name):
    path = tmp_path / 'sneaky.pth'
    torch.save({'meta': Attribute(owner, name)}, path)
    with pytest.raises(ValueError, match=f'refusing checkpoint.*{name}.*only HistoryBuffer'):
        load_checkpoint_file(str(path))

"""mmengine's own checkpoints load under torch's weights_only default once the plugin is in."""
import os
import pickle

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import rmoe_plugin  # noqa: F401  (allow-lists mmengine's checkpoint types)
from rmoe_plugin import RMoEFFN, collect_moe_losses


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


class Payload:
    def __reduce__(self):
        return (os.system, ('echo should-not-run',))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


class Sneaky:
    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


def test_getattr_in_a_checkpoint_reaches_only_history_buffer_statistics(tmp_path):
    path = tmp_path / 'sneaky.pth'
    torch.save({'meta': Sneaky()}, path)
    with pytest.raises(pickle.UnpicklingError, match='only HistoryBuffer'):
        torch.load(path)

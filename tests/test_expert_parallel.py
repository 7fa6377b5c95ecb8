"""Expert parallelism of the layer over gloo processes, against data parallelism in one."""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'helpers'))
import expert_parallel_workers as workers  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(worker, world_size, *args):
    mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size)


@pytest.mark.parametrize('world_size, expert_parallel_size', [(2, 2), (4, 4), (4, 2)],
                         ids=['P=2', 'P=4', 'P=2 x 2 replicas'])
def test_expert_parallel_step_equals_data_parallel(world_size, expert_parallel_size):
    spawn(workers.layer_step_worker, world_size, expert_parallel_size)


@pytest.mark.parametrize('saved_at, loaded_at', [(2, 1), (2, 4), (4, 2)])
def test_checkpoints_load_on_another_number_of_ranks(tmp_path, saved_at, loaded_at):
    spawn(workers.checkpoint_worker, saved_at, saved_at, str(tmp_path))
    assert (tmp_path / 'step.pt').exists()
    saved = torch.load(tmp_path / 'step.pt')
    residual = saved['model']['experts.residual_weights.0']
    assert residual.shape[0] == workers.EXPERTS  # every expert, whatever P saved it
    spawn(workers.checkpoint_worker, loaded_at, loaded_at, str(tmp_path))


def test_sizes_that_cannot_work_are_refused():
    spawn(workers.bad_input_worker, 2)


def test_a_checkpoint_with_another_number_of_experts_is_refused():
    saved = workers.starved_layer().state_dict()  # 4 experts
    layer = workers.MoEFeedForward(workers.EMBED, workers.HIDDEN, num_experts=8)
    with pytest.raises(ValueError, match=r'experts.residual_weights.0: the checkpoint holds 4 '
                                         r'experts, this layer 8'):
        layer.load_state_dict(saved)
    mmengine_checkpoint = pytest.importorskip('mmengine.runner.checkpoint')
    with pytest.raises(ValueError, match='the checkpoint holds 4 experts, this layer 8'):
        mmengine_checkpoint.load_state_dict(layer, saved)  # what init_cfg and load_from use

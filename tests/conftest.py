import pytest
import torch


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """Small ADE20K and COCO datasets in their real layouts, shared by the session."""
    # imported here: the layer's tests also run where OpenMMLab is absent (the GPU machine)
    from rmoe_plugin.datasets import make_ade20k, make_coco
    root = tmp_path_factory.mktemp('data')
    return dict(ade20k=make_ade20k(str(root), num_train=8, num_val=4),
                coco=make_coco(str(root), num_train=8, num_val=4) + '/')


@pytest.fixture
def server():
    """A :class:`checkpoint_server.CheckpointServer` on 127.0.0.1, stopped after the test."""
    from checkpoint_server import CheckpointServer
    served = CheckpointServer()
    yield served
    served.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The download cache: ``<TORCH_HOME>/hub/checkpoints``, in this test's folder."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    assert torch.hub.get_dir() == str(cache.parent), 'torch.hub.set_dir was called elsewhere'
    return cache

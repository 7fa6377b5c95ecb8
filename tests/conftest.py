import pytest


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """Small ADE20K and COCO datasets in their real layouts, shared by the session."""
    # imported here: the layer's tests also run where OpenMMLab is absent (the GPU machine)
    from rmoe_plugin.datasets import make_ade20k, make_coco
    root = tmp_path_factory.mktemp('data')
    return dict(ade20k=make_ade20k(str(root), num_train=8, num_val=4),
                coco=make_coco(str(root), num_train=8, num_val=4) + '/')

"""A segmentor's training step and inference, from its config (tools/benchmark_backbone.py)."""
from typing import Callable, Dict

import torch
from mmengine.config import Config
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData


def build_segmentor(config: str, crop_size: int = 512) -> torch.nn.Module:
    """The config's segmentor with random weights (nothing downloaded), SyncBN as BN."""
    cfg = Config.fromfile(config)
    cfg.model.data_preprocessor.size = (crop_size, crop_size)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    from mmseg.registry import MODELS
    cfg.model.backbone.init_cfg = None
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.init_weights()
    model.optim_cfg = cfg.optim_wrapper
    return model


def synthetic_batch(batch_size: int, size: int, num_classes: int = 150, seed: int = 0) -> dict:
    """What a dataloader of ``batch_size`` ADE20K crops hands to ``train_step``."""
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        label = torch.randint(0, num_classes, (1, size, size), generator=g)
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def step_functions(model: torch.nn.Module, batch: dict) -> Dict[str, Callable[[], None]]:
    """``train step`` (forward, backward, optimiser step) and ``inference`` (predict)."""
    optim_wrapper = build_optim_wrapper(model, model.optim_cfg)

    def train_step():
        model.train()
        model.train_step(batch, optim_wrapper)

    def inference():
        model.eval()
        with torch.no_grad():
            model.test_step(batch)
    return {'train step': train_step, 'inference': inference}

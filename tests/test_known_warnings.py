"""The command lines hide the framework's known-harmless warnings, and only those: each
pattern matches what the installed frameworks really emit, and anything else still shows."""
import logging
import os
import warnings

from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from mmengine.fileio import FileClient
from mmengine.fileio.file_client import HardDiskBackend
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope

from openmmlab_helpers import logged_messages
import rmoe_plugin  # noqa: F401  (registers the RMoE modules)
from rmoe_plugin.utils.known_warnings import (KNOWN_WARNINGS, KnownLogMessages,
                                              hide_known_prints, ignore_known_warnings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py')


def build_tiny_segmentor():
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(Config.fromfile(SEG).model)


def emitted(action):
    """The messages of the Python warnings ``action`` emits, every one of them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        action()
    return [str(w.message) for w in caught]


def test_the_known_warnings_of_a_model_build_are_hidden_and_others_shown():
    loud = emitted(build_tiny_segmentor)
    assert any('``build_loss`` would be deprecated' in m for m in loud)
    assert any('avg_non_ignore' in m for m in loud)

    def quiet_build():
        ignore_known_warnings()
        build_tiny_segmentor()
        warnings.warn('an unknown warning', UserWarning)
    assert emitted(quiet_build) == ['an unknown warning']


def test_every_known_warning_is_a_user_warning_with_a_distinct_pattern():
    patterns = [p for _, p, _ in KNOWN_WARNINGS]
    assert len(set(patterns)) == len(patterns)
    assert all(c is UserWarning for c, _, _ in KNOWN_WARNINGS)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class NoPrefix(BaseMetric):
    def process(self, data_batch, data_samples):
        pass

    def compute_metrics(self, results):
        return {}


def iou_metric():
    from mmseg.evaluation import IoUMetric
    return IoUMetric()


def test_known_log_messages_are_dropped_and_others_kept():
    logger = MMLogger.get_instance('known-log-messages-test')
    records = Records()
    logger.addHandler(records)

    def log_some():
        MMLogger.get_instance('known-log-messages-test')  # the current logger
        FileClient(backend='disk')  # what mmengine's hooks still build (cached after once)
        HardDiskBackend()  # what the first FileClient(backend='disk') of a process builds
        iou_metric()
        NoPrefix()  # another metric's missing prefix is not known to be harmless
        logger.warning('missing in checkpoint: norm0.weight')
    try:
        log_some()
        loud = list(records.messages)
        records.messages.clear()
        logger.addFilter(KnownLogMessages())
        log_some()
    finally:
        logger.removeHandler(records)
    assert any('"FileClient" will be deprecated' in m for m in loud)
    assert any('"HardDiskBackend" is the alias' in m for m in loud)
    assert any('The prefix is not set in metric class IoUMetric' in m for m in loud)
    assert records.messages == ['The prefix is not set in metric class NoPrefix.',
                                'missing in checkpoint: norm0.weight']


SWIN = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
            pretrain_img_size=32)


def swin_warnings(tmp_path, checkpoint_out_indices, drop_prefix=None, logger_filter=None):
    """What RMoESwinTransformer (4 outputs) logs about the keys of a dense Swin checkpoint
    with other outputs (and without the keys under ``drop_prefix``)."""
    import torch
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        dense = MODELS.build(dict(type='SwinTransformer', **SWIN,
                                  out_indices=checkpoint_out_indices))
        state = {k: v for k, v in dense.state_dict().items()
                 if not (drop_prefix and k.startswith(drop_prefix))}
        path = str(tmp_path / 'classifier_backbone.pth')
        torch.save({'state_dict': state}, path)
        rmoe = MODELS.build(dict(type='RMoESwinTransformer', **SWIN,
                                 init_cfg=dict(type='Pretrained', checkpoint=path)))
    MMLogger.get_instance('known-swin-messages-test')  # the current logger
    logger = MMLogger.get_current_instance()
    if logger_filter:
        logger.addFilter(logger_filter)
    try:
        with logged_messages() as messages:
            rmoe.init_weights()
    finally:
        if logger_filter:
            logger.removeFilter(logger_filter)
    return [m for m in messages if ' in checkpoint (' in m]


def test_only_the_missing_output_norms_of_a_classifier_backbone_are_known(tmp_path):
    # A classifier's Swin normalises its last stage only: the other three norms start fresh.
    assert swin_warnings(tmp_path, (3,)) == [
        "RMoESwinTransformer: missing in checkpoint (kept their initialisation): "
        "['norm0.bias', 'norm0.weight', 'norm1.bias', 'norm1.weight', "
        "'norm2.bias', 'norm2.weight']"]
    assert swin_warnings(tmp_path, (3,), logger_filter=KnownLogMessages()) == []
    # Anything else missing is not known to be harmless: it still warns through the filter.
    kept = swin_warnings(tmp_path, (3,), 'patch_embed.', KnownLogMessages())
    assert len(kept) == 1 and "'patch_embed.norm.bias'" in kept[0] and "'norm0.bias'" in kept[0]


def test_known_prints_are_dropped_and_other_lines_kept(tmp_path, capsys):
    import torch
    from mmseg.registry import MODELS
    path = str(tmp_path / 'weights.pth')
    with DefaultScope.overwrite_default_scope('mmseg'):
        scratch = MODELS.build(dict(type='SwinTransformer', **SWIN))
        torch.save({'state_dict': scratch.state_dict()}, path)
        pretrained = MODELS.build(dict(type='SwinTransformer', **SWIN,
                                       init_cfg=dict(type='Pretrained', checkpoint=path)))

    def print_some():
        scratch.init_weights()  # mmseg: "No pre-trained weights for SwinTransformer, ..."
        pretrained.init_weights()  # mmengine, called by mmseg: "Loads checkpoint by local ..."
        print('seed 0  dense   upstream   23 s')
        print('[>>>   ] 3/5', end='\r', flush=True)  # a progress bar's partial line
        print('done')

    print_some()
    loud = capsys.readouterr().out
    assert 'No pre-trained weights for SwinTransformer, training start from scratch' in loud
    assert f'Loads checkpoint by local backend from path: {path}' in loud
    with hide_known_prints():
        print_some()
    quiet = capsys.readouterr().out
    assert quiet == 'seed 0  dense   upstream   23 s\n[>>>   ] 3/5\rdone\n'

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

import rmoe_plugin  # noqa: F401  (registers the RMoE modules)
from rmoe_plugin.utils.known_warnings import (KNOWN_WARNINGS, KnownLogMessages,
                                              ignore_known_warnings)

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

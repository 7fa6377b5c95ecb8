"""What many tests do with the OpenMMLab registries and loggers."""
import logging
from contextlib import contextmanager

from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope


def build(scope: str, cfg: dict):
    """Build ``cfg`` from ``scope``'s MODELS registry ('mmseg', 'mmdet', 'mmpretrain')."""
    models = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return models.build(ConfigDict(cfg))


@contextmanager
def logged_messages():
    """The messages the current mmengine logger receives inside the context."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)

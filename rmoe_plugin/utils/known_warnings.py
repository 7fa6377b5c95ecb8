"""The framework warnings that are known to be harmless here, for command lines to hide.

The plugin never filters warnings on import: a command line (``tools/demo.py``, the other
tools) calls :func:`ignore_known_warnings` in its ``main``, and hands
:class:`KnownLogMessages` to the mmengine loggers it creates. Each entry names the category
and a regular expression of the message's start, so anything else still shows.
"""
import logging
import re
import warnings
from typing import List, Tuple, Type

# (category, message pattern, why it is harmless here)
KNOWN_WARNINGS: List[Tuple[Type[Warning], str, str]] = [
    (UserWarning, r'pkg_resources is deprecated as an API',
     "mmengine and mim import setuptools' pkg_resources; it works below setuptools 81"),
    (UserWarning, r'``build_loss`` would be deprecated soon',
     "mmseg's own heads call its deprecated builder"),
    (UserWarning, r'Default ``avg_non_ignore`` is False',
     "mmseg's CrossEntropyLoss announcing its default, which the configs keep"),
    (UserWarning, r'The draw is False, it means that the hook for visualization',
     'SegVisualizationHook off by default, as intended'),
    (UserWarning, r'`reduce_zero_label` will be deprecated',
     "mmseg's ADE20K pipeline sets it as upstream does"),
    (UserWarning, r'<class .*> instance named of \S+ has been created, the method '
                  r'`get_instance` should not accept any other arguments',
     'two Runners started within one second share a name; each stage is its own Runner'),
]

# mmengine logger records (not Python warnings) of the same kind.
KNOWN_LOG_MESSAGES: List[Tuple[str, str]] = [
    (r'"FileClient" will be deprecated in future',
     "mmengine's own CheckpointHook and LoggerHook still use FileClient"),
    (r'"HardDiskBackend" is the alias of "LocalBackend"', 'the same, for its backend name'),
    (r'The prefix is not set in metric class IoUMetric\.', "mmseg's metric names no prefix"),
]


def ignore_known_warnings() -> None:
    """Hide the :data:`KNOWN_WARNINGS` from here on (for a command line's ``main``)."""
    for category, pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=pattern, category=category)


class KnownLogMessages(logging.Filter):
    """Drops the :data:`KNOWN_LOG_MESSAGES` records of a logger, keeps every other one."""

    _pattern = re.compile('|'.join(f'(?:{p})' for p, _ in KNOWN_LOG_MESSAGES))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.match(record.getMessage())

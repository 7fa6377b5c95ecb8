"""The framework warnings that are known to be harmless here, for command lines to hide.

The plugin never filters warnings on import: a command line (``tools/demo.py``, the other
tools) calls :func:`ignore_known_warnings` in its ``main``, hands :class:`KnownLogMessages`
to the mmengine loggers it creates, and may run in :func:`hide_known_prints` (the upstream
lines that bypass every logger). Each entry is a regular expression of the message's start,
so anything else still shows.
"""
import contextlib
import io
import logging
import re
import sys
import warnings
from typing import Iterator, List, Tuple, Type

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
    (r"\w+: missing in checkpoint \(kept their initialisation\): "
     r"\[(?:'norm\d\.(?:weight|bias)'(?:, )?)+\]$",
     "a classifier's backbone normalises only the stage it outputs; a dense-prediction one "
     "starts the norms of its other outputs fresh, as mmseg does from an ImageNet checkpoint"),
]

# Lines upstream writes with print() (mmengine's print_log without a logger), not a logger.
KNOWN_PRINTS: List[Tuple[str, str]] = [
    (r'No pre-trained weights for \w+, training start from scratch$',
     "mmseg's Swin announcing a stage that is meant to start from scratch"),
    (r'Loads checkpoint by \w+ backend from path: ',
     "mmengine naming each checkpoint it reads (rmoe:// is the plugin's in-memory hand-over)"),
]


def _any_of(patterns: List[Tuple[str, str]]) -> 're.Pattern':
    return re.compile('|'.join(f'(?:{p})' for p, _ in patterns))


def ignore_known_warnings() -> None:
    """Hide the :data:`KNOWN_WARNINGS` from here on (for a command line's ``main``)."""
    for category, pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=pattern, category=category)


class KnownLogMessages(logging.Filter):
    """Drops the :data:`KNOWN_LOG_MESSAGES` records of a logger, keeps every other one."""

    _pattern = _any_of(KNOWN_LOG_MESSAGES)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.match(record.getMessage())


class _KnownLinesDropped(io.TextIOBase):
    """A text stream that passes every line to ``stream`` but those ``pattern`` matches."""

    def __init__(self, stream, pattern: 're.Pattern'):
        super().__init__()
        self.stream = stream
        self.pattern = pattern
        self.pending = ''

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split('\n')
        for line in lines:
            if not self.pattern.match(line):
                self.stream.write(line + '\n')
        return len(text)

    def flush(self) -> None:
        # A partial line (a progress bar's) goes out now unless it may become a known line.
        if self.pending and not self.pattern.match(self.pending):
            self.stream.write(self.pending)
            self.pending = ''
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextlib.contextmanager
def hide_known_prints() -> Iterator[None]:
    """Drop the :data:`KNOWN_PRINTS` lines from ``sys.stdout`` inside the context."""
    stream = sys.stdout
    sys.stdout = filtered = _KnownLinesDropped(stream, _any_of(KNOWN_PRINTS))
    try:
        yield
    finally:
        sys.stdout = stream
        if filtered.pending:
            stream.write(filtered.pending)
        stream.flush()

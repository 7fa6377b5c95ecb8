"""Writing a file so that a crash never leaves it half written.

Every file the plugin writes (checkpoints, cost and result records, reports, plots, configs)
goes through :func:`atomic_write`: readers, and a run resumed after a crash, see either the
old file or the complete new one.
"""
import contextlib
import os
import stat
import uuid
from typing import IO, Iterator, Optional, Union

PathLike = Union[str, 'os.PathLike[str]']


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = 'w',
                 encoding: Optional[str] = 'utf-8') -> Iterator[IO]:
    """Open a file for writing that replaces ``path`` only once it is complete.

    The data go to a uniquely named temporary file in the folder of ``path`` (so concurrent
    writers never share one), which is flushed, synced to disk and renamed over ``path``;
    the folder is then synced so the rename itself survives a power cut. If the block
    raises, the temporary file is removed and ``path`` is left as it was. The new file gets
    the permissions ``open(path, 'w')`` would give it: those of the file it replaces, or
    ``0o666`` less the umask for a new one.

    Args:
        path (str | os.PathLike): the file to write (a symlink's target, as ``open``
            writes it). Its folder must exist.
        mode (str): ``'w'`` (text) or ``'wb'`` (binary). Default: 'w'.
        encoding (str, optional): text encoding in ``'w'`` mode. Default: 'utf-8'.

    Yields:
        the open temporary file.

    Raises:
        ValueError: ``mode`` is neither ``'w'`` nor ``'wb'``.
        FileNotFoundError: the folder of ``path`` does not exist.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.path.realpath(path)  # through a symlink, as open() writes
    folder = os.path.dirname(path)
    # the name's first 200 characters: the suffix must not push it past NAME_MAX (255)
    tmp = os.path.join(folder, f'.{os.path.basename(path)[:200]}.{uuid.uuid4().hex}.tmp')
    try:
        # O_EXCL: never someone else's file; 0o666: the kernel applies the umask, as for open()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0),
                     0o666)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'cannot write {path!r}: folder {folder!r} does not exist') \
            from e
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(fd if os.chmod in os.supports_fd else tmp,
                     stat.S_IMODE(os.stat(path).st_mode))
        with open(fd, mode, encoding=encoding if mode == 'w' else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    if not hasattr(os, 'O_DIRECTORY'):  # Windows: folders cannot be opened, nor need to be
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) cannot sync a folder
        pass
    finally:
        os.close(fd)

"""atomic_write: a write that fails or is killed midway leaves the old file; writers never mix."""
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

from rmoe_plugin.fileio import atomic_write

FILEIO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'rmoe_plugin', 'fileio.py')
# Child processes load fileio.py alone (it imports nothing of the plugin or OpenMMLab).
CHILD_PRELUDE = f'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('fileio', {FILEIO!r})
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
'''


def test_an_exception_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / 'record.json'
    target.write_text('old')
    with pytest.raises(RuntimeError, match='midway'):
        with atomic_write(target) as f:
            f.write('new, half written')
            f.flush()
            raise RuntimeError('midway')
    assert target.read_text() == 'old'
    assert os.listdir(tmp_path) == ['record.json']


def test_a_complete_write_replaces_the_file(tmp_path):
    target = tmp_path / 'plot.png'
    target.write_bytes(b'old')
    with atomic_write(target, 'wb') as f:
        f.write(b'\x89PNG new')
    assert target.read_bytes() == b'\x89PNG new'
    assert os.listdir(tmp_path) == ['plot.png']


def test_a_writer_killed_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / 'checkpoint.pth'
    target.write_bytes(b'old checkpoint')
    child = subprocess.Popen(
        [sys.executable, '-c', CHILD_PRELUDE + '''
with fileio.atomic_write(sys.argv[1], 'wb') as f:
    f.write(b'x' * (1 << 20))
    f.flush()
    print('halfway', flush=True)
    sys.stdin.read()  # the parent kills us here
    f.write(b'y' * (1 << 20))
''', str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b'halfway\n'
        temporary = [n for n in os.listdir(tmp_path) if n != 'checkpoint.pth']
        assert len(temporary) == 1 and os.path.getsize(tmp_path / temporary[0]) == 1 << 20
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
        child.stdin.close()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == b'old checkpoint'
    # what a kill leaves is a hidden, uniquely named file beside the target, never the target
    leftover, = [n for n in os.listdir(tmp_path) if n != 'checkpoint.pth']
    assert leftover.startswith('.checkpoint.pth.') and leftover.endswith('.tmp')
    with atomic_write(target, 'wb') as f:  # and the next write is not disturbed by it
        f.write(b'new checkpoint')
    assert target.read_bytes() == b'new checkpoint'


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_permissions_open_would_give_it(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / 'plain.txt', 'w') as f:
            f.write('x')
        with atomic_write(tmp_path / 'atomic.txt') as f:
            f.write('x')
    finally:
        os.umask(old)

    def mode(name):
        return stat.S_IMODE(os.stat(tmp_path / name).st_mode)
    assert mode('atomic.txt') == mode('plain.txt') == 0o666 & ~umask


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    target = tmp_path / 'report.md'
    target.write_text('old')
    os.chmod(target, 0o640)
    with atomic_write(target) as f:
        f.write('new')
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640 and target.read_text() == 'new'


def test_concurrent_writers_never_produce_a_mixed_file(tmp_path):
    target = tmp_path / 'result.json'
    size, rounds = 1 << 18, 25
    target.write_bytes(b'-' * size)
    writers = [subprocess.Popen(
        [sys.executable, '-c', CHILD_PRELUDE + '''
path, byte, size, rounds = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
for _ in range(rounds):
    with fileio.atomic_write(path, 'wb') as f:
        for _ in range(16):  # in pieces, so writers interleave
            f.write(byte * (size // 16))
''', str(target), letter, str(size), str(rounds)]) for letter in 'ABCD']
    bad_reads = []
    done = threading.Event()

    def read_while_writing():
        while not done.is_set():
            data = target.read_bytes()
            if len(data) != size or data != data[:1] * size:
                bad_reads.append(data[:1] + b'... %d bytes' % len(data))
    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        codes = [w.wait() for w in writers]
    finally:
        done.set()
        reader.join()
    assert codes == [0, 0, 0, 0] and bad_reads == []
    data = target.read_bytes()
    assert len(data) == size and data[:1] in b'ABCD' and data == data[:1] * size
    assert os.listdir(tmp_path) == ['result.json']  # every writer's temporary file is gone


def test_bad_mode_and_missing_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(tmp_path / 'x', 'a'):
            pass
    with pytest.raises(FileNotFoundError, match='no-such-folder'):
        with atomic_write(tmp_path / 'no-such-folder' / 'x'):
            pass


def test_a_symlink_is_written_through_as_open_would(tmp_path):
    real = tmp_path / 'real.json'
    real.write_text('old')
    link = tmp_path / 'link.json'
    link.symlink_to(real)
    with atomic_write(link) as f:
        f.write('new')
    assert link.is_symlink() and real.read_text() == 'new'


def test_a_name_near_the_length_limit_still_gets_a_temporary_file(tmp_path):
    target = tmp_path / ('x' * 250)
    with atomic_write(target) as f:
        f.write('long')
    assert target.read_text() == 'long' and os.listdir(tmp_path) == ['x' * 250]

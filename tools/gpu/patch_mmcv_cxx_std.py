#!/usr/bin/env python3
"""Let mmcv 2.1.0's setup.py build against torch >= 2.10 (C++20 headers).

mmcv 2.1.0's ``setup.py`` hard-codes the C++ standard of its ops:
``extra_compile_args['cxx'] = ['-std=c++17']`` (``-std=c++14`` for torch
<= 1.12.1, ``/std:c++17`` on Windows) and ``extra_compile_args['nvcc'] +=
['-std=c++17']``. torch's ``BuildExtension`` adds its own standard only when
none is given, so mmcv's flag wins, and torch 2.10 and later refuse it in
their headers (``ATen.h: #error C++20 or later compatible compiler is
required to use ATen.``).

This script rewrites every such literal into a call of a small function it
inserts into ``setup.py``, ``_rmoe_cxx_std(flag)``, which returns

- ``MMCV_CXX_STD`` from the environment where it is set (``c++20``, ...),
- else ``c++20`` when the torch that builds is 2.10 or newer,
- else the flag mmcv wrote (older torch builds exactly as before),

in the flag's own spelling (``-std=`` or ``/std:``). Idempotent: a patched
``setup.py`` is recognised and left as it is. Exit status 0 when the file
is patched (now or before), 1 with a message when it is not what was
expected.

Used by ``tools/gpu/build_mmcv.sh`` (the GPU machine) and by anyone building
mmcv 2.1.0 against a newer torch:

    python tools/gpu/patch_mmcv_cxx_std.py path/to/mmcv-2.1.0
"""
import argparse
import re
import sys
from pathlib import Path

MARKER = '# rmoe_plugin: C++ standard override (tools/gpu/patch_mmcv_cxx_std.py)'

HELPER = f'''
{MARKER}
def _rmoe_cxx_std(flag):
    """mmcv's hard-coded C++ standard flag, raised to C++20 for torch >= 2.10.

    MMCV_CXX_STD (e.g. c++20) overrides the choice.
    """
    prefix = flag[:flag.index('c++')]
    std = os.getenv('MMCV_CXX_STD', '').strip()
    if not std:
        try:
            import torch
            release = parse_version(torch.__version__).release
        except Exception:  # no torch: setup.py builds no ops anyway
            return flag
        if tuple(release[:2]) < (2, 10):
            return flag
        std = 'c++20'
    return prefix + std

'''

# A quoted standard flag: '-std=c++14', "-std=c++17", '/std:c++17', ...
FLAG = re.compile(r"""(?P<q>['"])(?P<flag>(?:-std=|/std:)c\+\+\d\d)(?P=q)""")


def patch_text(text):
    """Return (patched text, number of flags rewritten)."""
    if MARKER in text:
        return text, 0
    body, count = FLAG.subn(lambda m: f"_rmoe_cxx_std({m.group('q')}"
                            f"{m.group('flag')}{m.group('q')})", text)
    if count == 0:
        raise ValueError('no quoted -std=c++NN / /std:c++NN flag found')
    # Insert the helper after the imports it needs (os, parse_version).
    anchor = re.search(r'^from setuptools import .*$', body, re.M)
    if anchor is None or 'parse_version' not in body[:anchor.start()] or \
            not re.search(r'^import os$', body[:anchor.start()], re.M):
        raise ValueError("expected 'import os', pkg_resources' parse_version "
                         "and 'from setuptools import ...' at the top")
    return body[:anchor.end()] + '\n' + HELPER + body[anchor.end():], count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', type=Path,
                        help='unpacked mmcv source tree (holds setup.py)')
    args = parser.parse_args(argv)
    setup_py = args.src / 'setup.py'
    if not setup_py.is_file():
        print(f'patch_mmcv_cxx_std: {setup_py} not found', file=sys.stderr)
        return 1
    text = setup_py.read_text()
    try:
        patched, count = patch_text(text)
    except ValueError as err:
        print(f'patch_mmcv_cxx_std: {setup_py}: {err}; not an mmcv 2.x '
              'setup.py this script knows', file=sys.stderr)
        return 1
    if count == 0:
        print(f'patch_mmcv_cxx_std: {setup_py} already patched')
        return 0
    bare = [m.group('flag') for m in FLAG.finditer(patched)
            if not patched[:m.start()].endswith('_rmoe_cxx_std(')]
    if bare:
        print(f'patch_mmcv_cxx_std: {setup_py}: flags left as they were: '
              f'{bare}', file=sys.stderr)
        return 1
    compile(patched, str(setup_py), 'exec')  # still valid Python
    setup_py.write_text(patched)
    print(f'patch_mmcv_cxx_std: {setup_py}: {count} standard flags now go '
          'through _rmoe_cxx_std() (C++20 for torch >= 2.10, '
          'MMCV_CXX_STD overrides)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""tools/gpu/patch_mmcv_cxx_std.py: mmcv 2.1.0's C++ standard flags, raised for torch >= 2.10."""
import importlib.util
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    'patch_mmcv_cxx_std', os.path.join(ROOT, 'tools', 'gpu', 'patch_mmcv_cxx_std.py'))
patch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patch)

# The shape of mmcv 2.1.0's setup.py where it sets the standard (abridged).
SETUP_PY = '''import os
import platform
from pkg_resources import parse_version
from setuptools import find_packages, setup

import torch

def get_extensions():
    extra_compile_args = {'cxx': []}
    if platform.system() != 'Windows':
        if parse_version(torch.__version__) <= parse_version('1.12.1'):
            extra_compile_args['cxx'] = ['-std=c++14']
        else:
            extra_compile_args['cxx'] = ['-std=c++17']
    else:
        extra_compile_args['cxx'] = ['/std:c++17']
    extra_compile_args['nvcc'] = ["-std=c++17"]
    return extra_compile_args
'''


def flags_with(torch_version, monkeypatch, std=None):
    patched, count = patch.patch_text(SETUP_PY)
    assert count == 4
    if std:
        monkeypatch.setenv('MMCV_CXX_STD', std)
    else:
        monkeypatch.delenv('MMCV_CXX_STD', raising=False)
    monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(__version__=torch_version))
    namespace = {}
    exec(compile(patched, 'setup.py', 'exec'), namespace)
    return namespace['get_extensions']()


@pytest.mark.parametrize('version,cxx', [('2.9.1', '-std=c++17'), ('2.10.0', '-std=c++20'),
                                         ('2.14.1+cu130', '-std=c++20'), ('1.12.1', '-std=c++14')])
def test_the_standard_follows_the_torch_that_builds(version, cxx, monkeypatch):
    if sys.platform == 'win32':
        pytest.skip('the Windows branch is not taken here')
    flags = flags_with(version, monkeypatch)
    assert flags['cxx'] == [cxx] and flags['nvcc'] == [cxx.replace('c++14', 'c++17')]


def test_mmcv_cxx_std_overrides(monkeypatch):
    assert flags_with('2.9.1', monkeypatch, std='c++20')['cxx'] == ['-std=c++20']


def test_patching_twice_changes_nothing():
    once, _ = patch.patch_text(SETUP_PY)
    assert patch.patch_text(once) == (once, 0)


def test_a_setup_py_without_standard_flags_is_refused():
    with pytest.raises(ValueError, match='no quoted -std'):
        patch.patch_text('from setuptools import setup\nsetup()\n')

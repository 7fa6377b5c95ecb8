"""When the plugin's OpenMMLab modules are registered.

``import rmoe_plugin`` registers them (a config's ``custom_imports`` relies on it), yet
``import rmoe_plugin.moe``, which runs the package's ``__init__`` first, must import no
OpenMMLab package, so that the layer works where none is installed. Registration therefore
waits for mmengine: it happens at import when mmengine's registry is already loaded, and
otherwise right before the first registry lookup (``Registry.get``, through which every
build passes) or the first checkpoint load (``CheckpointLoader.load_checkpoint``, which the
weights-only loaders must serve), whichever comes first, whatever was imported in between.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from typing import Callable

# Subpackages whose import registers modules (each with the decorators of its registry).
OPENMMLAB_SUBPACKAGES = ('engine', 'models', 'backbones', 'pipeline')
_REGISTRY_MODULE = 'mmengine.registry.registry'
_CHECKPOINT_MODULE = 'mmengine.runner.checkpoint'
_state = dict(registered=False)


def register_all_modules() -> None:
    """Register every RMoE module in the mmengine, mmseg, mmdet and mmpretrain registries, let
    mmengine's checkpoints load weights-only and hold every expert of an expert-parallel
    model. Idempotent."""
    if _state['registered']:
        return
    _state['registered'] = True  # before the imports: they may look registries up
    try:
        for name in OPENMMLAB_SUBPACKAGES:
            importlib.import_module(f'{__package__}.{name}')
        from .engine import allow_mmengine_checkpoints, install_runner_hooks
        allow_mmengine_checkpoints()
        install_runner_hooks()
    except BaseException:
        _state['registered'] = False
        raise


def register_when_mmengine_loads() -> None:
    """Register now if mmengine's registry is loaded, else before its first use."""
    if _REGISTRY_MODULE in sys.modules:
        register_all_modules()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_REGISTRY_MODULE, lambda module: _register_before(
            module.Registry, 'get')))
        sys.meta_path.insert(0, _AfterImport(_CHECKPOINT_MODULE, lambda module: _register_before(
            module.CheckpointLoader, 'load_checkpoint')))


def _register_before(owner: type, name: str) -> None:
    """Make the first call of ``owner.name`` register the plugin's modules first."""
    original = owner.__dict__[name]  # a classmethod stays a classmethod
    function = original.__func__ if isinstance(original, classmethod) else original

    def first_call(self_or_cls, *args, **kwargs):
        setattr(owner, name, original)
        register_all_modules()
        return function(self_or_cls, *args, **kwargs)

    setattr(owner, name, classmethod(first_call) if isinstance(original, classmethod)
            else first_call)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` once the module ``name`` has been executed, then leaves."""

    def __init__(self, name: str, callback: Callable):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.callback(module)

        spec.loader.exec_module = exec_module
        return spec

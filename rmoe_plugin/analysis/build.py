"""A model from an mmseg or mmdet config (and a checkpoint), and its MoE layers by name."""
import os
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint
from mmengine.utils import import_modules_from_strings
from torch import nn

from ..engine.hooks import find_moe_layers
from ..moe import MoEFeedForward


def load_config(config: str, cfg_options: Optional[dict] = None) -> Config:
    """Read ``config``, apply ``cfg_options``, import its ``custom_imports`` and enter its scope.

    Raises:
        FileNotFoundError: ``config`` does not exist.
        ValueError: the config names no ``default_scope`` (mmseg or mmdet).
    """
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config {config!r} does not exist')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if not scope:
        raise ValueError(f'config {config!r} has no default_scope; inherit an mmseg or mmdet '
                         'config so its registry is known')
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(scope)
    return cfg


def build_from_config(config: str, checkpoint: Optional[str] = None,
                      cfg_options: Optional[dict] = None,
                      device: str = 'cpu') -> Tuple[nn.Module, Config]:
    """The config's model in eval mode, with ``checkpoint``'s weights when given.

    The checkpoint is read by mmengine's ``load_checkpoint`` (torch's ``weights_only``
    loading). Weights of MoE layers the checkpoint lacks would leave routing at random, so
    they are an error rather than a warning.

    Args:
        config (str): mmseg or mmdet config file.
        checkpoint (str, optional): checkpoint of that model. Default: None (initial weights).
        cfg_options (dict, optional): overrides merged into the config. Default: None.
        device (str): where the model runs. Default: 'cpu'.

    Raises:
        FileNotFoundError: ``config`` or ``checkpoint`` does not exist.
        ValueError: the checkpoint lacks weights of an MoE layer.
    """
    cfg = load_config(config, cfg_options)
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        if '://' not in checkpoint and not os.path.isfile(checkpoint):  # URIs: on loading
            raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
        loaded = load_checkpoint(model, checkpoint, map_location='cpu', strict=False,
                                 logger='current')
        check_moe_weights(model, loaded.get('state_dict', loaded), checkpoint)
    return model.to(device).eval(), cfg


def check_moe_weights(model: nn.Module, state_dict: dict, checkpoint: str) -> None:
    """Raise ``ValueError`` if ``state_dict`` misses a router or expert tensor of ``model``."""
    given = {k[len('module.'):] if k.startswith('module.') else k for k in state_dict}
    missing = [k for k in model.state_dict() if '.moe.' in f'.{k}' and k not in given]
    if missing:
        raise ValueError(f'checkpoint {checkpoint!r} has no weights for {len(missing)} MoE '
                         f'tensors of this model, e.g. {missing[:3]}; is it the right config?')


def moe_layers_by_name(model: nn.Module,
                       names: Optional[Sequence[str]] = None) -> Dict[str, MoEFeedForward]:
    """The MoE layers of ``model`` by module path (all, or those in ``names``, in order).

    Raises:
        ValueError: ``model`` has no MoE layer, or a name in ``names`` is not one of them.
    """
    layers = OrderedDict(find_moe_layers(model))
    if not layers:
        raise ValueError(f'{type(model).__name__} has no MoE layer')
    if not names:
        return layers
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f'layers {unknown} are not MoE layers of the model; choose among '
                         f'{list(layers)}')
    return OrderedDict((n, layers[n]) for n in names)

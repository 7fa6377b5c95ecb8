"""Checkpoint layouts: dense Swin checkpoints into the upstream backbone layout, dense FFN keys
into RMoE cores, and RMoE layers folded back into dense FFNs.

Pure functions over state dicts; the backbone and the tools in ``tools/`` call them.
"""
import os
import re
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch

from .checkpoint import extract_state_dict, load_checkpoint_file

StateDict = Dict[str, torch.Tensor]

_CORE = re.compile(r'^(?P<ffn>.*)\.moe\.experts\.core_(?P<kind>weights|biases)\.(?P<i>\d+)$')


def _strip(state_dict: StateDict, prefix: str) -> StateDict:
    return OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v)
                       for k, v in state_dict.items())


def backbone_state_dict(state_dict: StateDict) -> StateDict:
    """The backbone part of a backbone, segmentor or detector state dict, without prefixes."""
    if all(k.startswith('module.') for k in state_dict):
        state_dict = _strip(state_dict, 'module.')
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = OrderedDict((k[len('backbone.'):], v) for k, v in state_dict.items()
                                 if k.startswith('backbone.'))
    return state_dict


def swin_layout(state_dict: StateDict) -> str:
    """'openmmlab' (mmseg/mmdet), 'official' (microsoft/Swin-Transformer) or 'timm'."""
    keys = list(state_dict)
    if any(k.startswith('stages.') for k in keys):
        return 'openmmlab'
    if any(k.startswith('layers.') for k in keys):
        # timm keeps PatchMerging at the start of the next stage; the official code at the end.
        if any(k.startswith('layers.0.downsample.') for k in keys):
            return 'official'
        if any(re.match(r'layers\.\d+\.downsample\.', k) for k in keys):
            return 'timm'
        return 'official'
    raise ValueError('checkpoint holds no Swin backbone: expected keys starting with '
                     "'stages.' (OpenMMLab) or 'layers.' (official Swin / timm)")


def timm_to_official_swin(state_dict: StateDict) -> StateDict:
    """timm's Swin keys in the official layout (PatchMerging one stage earlier)."""
    out = OrderedDict()
    for k, v in state_dict.items():
        m = re.match(r'layers\.(\d+)\.downsample\.(.*)', k)
        if m:
            k = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        out[k.replace('head.fc.', 'head.')] = v
    return out


def to_openmmlab_swin(state_dict: StateDict) -> Tuple[StateDict, str]:
    """A dense Swin state dict in any known layout, as the upstream Swin backbone's keys.

    Returns:
        (state dict, the layout it came in)
    """
    from mmdet.models.backbones.swin import swin_converter  # the upstream converter
    state_dict = backbone_state_dict(state_dict)
    layout = swin_layout(state_dict)
    if layout == 'timm':
        state_dict = timm_to_official_swin(state_dict)
    if layout in ('official', 'timm'):
        state_dict = _strip(swin_converter(state_dict), 'backbone.')
    return state_dict, layout


def dense_ffn_keys(ffn_prefix: str, num_fcs: int) -> List[Tuple[str, str]]:
    """(weight key, bias key) of each projection of an mmcv ``FFN`` at ``ffn_prefix``."""
    names = [f'layers.{i}.0' for i in range(num_fcs - 1)] + [f'layers.{num_fcs - 1}']
    return [(f'{ffn_prefix}{n}.weight', f'{ffn_prefix}{n}.bias') for n in names]


def core_keys(ffn_prefix: str, num_fcs: int) -> List[Tuple[str, str]]:
    """(weight key, bias key) of each core projection of an ``RMoEFFN`` at ``ffn_prefix``."""
    return [(f'{ffn_prefix}moe.experts.core_weights.{i}',
             f'{ffn_prefix}moe.experts.core_biases.{i}') for i in range(num_fcs)]


def dense_ffn_to_core(state_dict: StateDict, ffn_prefix: str, num_fcs: int) -> bool:
    """Rename a dense FFN's keys at ``ffn_prefix`` to RMoE core keys, in place.

    Returns whether anything was renamed (nothing is when the keys are already RMoE ones).
    """
    renamed = False
    for dense, core in zip(dense_ffn_keys(ffn_prefix, num_fcs), core_keys(ffn_prefix, num_fcs)):
        for d, c in zip(dense, core):
            if d in state_dict and c not in state_dict:
                state_dict[c] = state_dict.pop(d)
                renamed = True
    return renamed


def fold_rmoe_to_dense(state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """Fold every RMoE layer into a dense FFN holding its mean expert (core + mean residual).

    Router parameters are dropped. Returns the new state dict and the FFN prefixes folded.
    """
    projections: Dict[str, int] = {}
    for key in state_dict:
        m = _CORE.match(key)
        if m:
            ffn = m.group('ffn') + '.'
            projections[ffn] = max(projections.get(ffn, 0), int(m.group('i')) + 1)
    out = OrderedDict((k, v) for k, v in state_dict.items()
                      if not any(k.startswith(f + 'moe.') for f in projections))
    for ffn, num_fcs in projections.items():
        for (dw, db), (cw, cb) in zip(dense_ffn_keys(ffn, num_fcs), core_keys(ffn, num_fcs)):
            for dense_key, core_key in ((dw, cw), (db, cb)):
                residual_key = core_key.replace('.core_', '.residual_')
                out[dense_key] = state_dict[core_key] + state_dict[residual_key].mean(0)
    return out, sorted(projections)


def dense_to_rmoe_checkpoint(in_path: str, backbone_cfg: dict, scope: str) -> Tuple[dict, str]:
    """An RMoE checkpoint from a dense one, built as the RMoE config's backbone would load it.

    The backbone named by ``backbone_cfg`` (an ``RMoESwinTransformer`` config) is built in
    ``scope`` and initialised from ``in_path``: its cores are the dense FFNs, its routers and
    residuals start as configured. Entries of a full segmentor/detector checkpoint outside
    the backbone are kept as they are.

    Returns:
        (checkpoint with ``state_dict`` in the full-model layout, a summary of what changed)
    """
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope, MODELS
    checkpoint = load_checkpoint_file(in_path)
    source = extract_state_dict(checkpoint)
    cfg = ConfigDict(backbone_cfg)
    cfg.init_cfg = ConfigDict(type='Pretrained', checkpoint=in_path)
    with DefaultScope.overwrite_default_scope(scope):
        backbone = MODELS.build(cfg)
    backbone.init_weights()
    state_dict = OrderedDict((k, v) for k, v in source.items()
                             if not k.startswith(('backbone.', 'module.backbone.')))
    if len(state_dict) == len(source):  # a bare backbone checkpoint
        state_dict.clear()
    state_dict.update((f'backbone.{k}', v) for k, v in backbone.state_dict().items())
    from ..models import RMoEFFN
    layers = [n for n, m in backbone.named_modules() if isinstance(m, RMoEFFN)]
    summary = (f'{len(layers)} FFNs became RMoE layers ({backbone_cfg["moe_cfg"]}): '
               + ', '.join(f'backbone.{n}' for n in layers))
    meta = dict(checkpoint.get('meta', {}) if isinstance(checkpoint.get('meta'), dict) else {})
    meta['rmoe_conversion'] = dict(source=os.path.abspath(in_path), moe_layers=layers)
    return dict(state_dict=state_dict, meta=meta), summary

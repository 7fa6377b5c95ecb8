"""Checkpoint layouts: the one place that knows how weights are named.

Pure functions over state dicts, importing no model: dense FFN keys and the RMoE core keys they
become, RMoE layers folded back into dense FFNs, the backbone part of a full checkpoint, and the
foreign layouts of the backbones we load (official Swin, timm Swin, official CvT). Backbones,
``RMoEFFN``, the tools and the analysis import them; they import nothing of ours.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

_CORE = re.compile(r'^(?P<ffn>.*)\.moe\.experts\.core_(?P<kind>weights|biases)\.(?P<i>\d+)$')
_EXPERTS = re.compile(r'^(?P<ffn>.*)\.moe\.experts\.weights\.(?P<i>\d+)$')

# Swin buffers computed from the window size, never learnt: timm leaves them out of its
# checkpoints (non-persistent) and the upstream Swin rebuilds them, so their absence is no loss.
SWIN_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')


def _strip(state_dict: StateDict, prefix: str) -> StateDict:
    return OrderedDict((k[len(prefix):] if k.startswith(prefix) else k, v)
                       for k, v in state_dict.items())


def backbone_state_dict(state_dict: StateDict) -> StateDict:
    """The backbone part of a backbone, segmentor or detector state dict, without prefixes."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = _strip(state_dict, 'module.')
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = OrderedDict((k[len('backbone.'):], v) for k, v in state_dict.items()
                                 if k.startswith('backbone.'))
    return state_dict


# ----------------------------------------------------------------------------- dense FFN keys

def mmcv_ffn_linear_names(num_fcs: int) -> List[str]:
    """Where an mmcv ``FFN`` keeps its projections: ``layers.0.0``, ..., ``layers.{n-1}``."""
    return [f'layers.{i}.0' for i in range(num_fcs - 1)] + [f'layers.{num_fcs - 1}']


def dense_ffn_keys(ffn_prefix: str, linear_names: Sequence[str]) -> List[Tuple[str, str]]:
    """(weight key, bias key) of each projection of a dense FFN at ``ffn_prefix``.

    Args:
        ffn_prefix (str): the FFN's module path with a trailing dot, e.g. ``'layers.3.ffn.'``.
        linear_names (Sequence[str]): its projections' names inside it, in order:
            :func:`mmcv_ffn_linear_names` for an mmcv ``FFN``, ``('fc1', 'fc2')`` for a timm
            ``Mlp`` and its like.
    """
    return [(f'{ffn_prefix}{n}.weight', f'{ffn_prefix}{n}.bias') for n in linear_names]


def core_keys(ffn_prefix: str, num_projections: int) -> List[Tuple[str, str]]:
    """(weight key, bias key) of each core projection of an ``RMoEFFN`` at ``ffn_prefix``."""
    return [(f'{ffn_prefix}moe.experts.core_weights.{i}',
             f'{ffn_prefix}moe.experts.core_biases.{i}') for i in range(num_projections)]


def dense_ffn_to_core(state_dict: StateDict, ffn_prefix: str,
                      linear_names: Sequence[str]) -> bool:
    """Rename a dense FFN's keys at ``ffn_prefix`` to RMoE core keys, in place.

    Returns whether anything was renamed (nothing is when the keys are already RMoE ones).
    """
    renamed = False
    pairs = zip(dense_ffn_keys(ffn_prefix, linear_names),
                core_keys(ffn_prefix, len(linear_names)))
    for dense, core in pairs:
        for d, c in zip(dense, core):
            if d in state_dict and c not in state_dict:
                state_dict[c] = state_dict.pop(d)
                renamed = True
    return renamed


# ------------------------------------------------------------------------ stacked MoE experts

def expert_keys(ffn_prefix: str, num_projections: int) -> List[Tuple[str, str]]:
    """(weight key, bias key) of each projection of an MoE layer's stacked experts, as an
    MoE checkpoint (a converted Swin-MoE, say) gives them to an ``RMoEFFN`` at ``ffn_prefix``:
    ``moe.experts.weights.{i}`` (E, out, in) and ``moe.experts.biases.{i}`` (E, out)."""
    return [(f'{ffn_prefix}moe.experts.weights.{i}', f'{ffn_prefix}moe.experts.biases.{i}')
            for i in range(num_projections)]


def moe_experts_to_core(state_dict: StateDict, ffn_prefix: str, num_projections: int) -> bool:
    """Factor the stacked experts at ``ffn_prefix`` into RMoE's core, their mean, and
    residuals, each expert minus that mean; in place.

    ``core + residual`` equals each expert up to one fp32 rounding of the subtraction.

    Returns whether there were experts to factor.

    Raises:
        ValueError: a weight or bias is missing, or their expert counts disagree.
    """
    pairs = list(zip(expert_keys(ffn_prefix, num_projections),
                     core_keys(ffn_prefix, num_projections)))
    present = [k for (w, b), _ in pairs for k in (w, b) if k in state_dict]
    if not present:
        return False
    counts = {k: state_dict[k].shape[0] for k in present}
    for (w, b), _ in pairs:
        for key in (w, b):
            if key not in state_dict:
                raise ValueError(f'MoE experts at {ffn_prefix!r}: {present[0]!r} is given but '
                                 f'not {key!r}')
    if len(set(counts.values())) > 1:
        raise ValueError(f'MoE experts at {ffn_prefix!r} disagree on the number of experts: '
                         f'{counts}')
    for experts, core in pairs:
        for expert_key, core_key in zip(experts, core):
            experts_tensor = state_dict.pop(expert_key)
            mean = experts_tensor.double().mean(0).to(experts_tensor.dtype)
            state_dict[core_key] = mean
            state_dict[core_key.replace('.core_', '.residual_')] = experts_tensor - mean
    return True


def factor_moe_experts(state_dict: StateDict) -> StateDict:
    """A copy of ``state_dict`` whose stacked MoE experts (see :func:`expert_keys`) are
    factored into core and residuals, every layer of them."""
    out = OrderedDict(state_dict)
    for ffn, count in _layer_projections(state_dict, _EXPERTS).items():
        moe_experts_to_core(out, ffn, count)
    return out


def rmoe_experts(state_dict: StateDict, ffn_prefix: str,
                 num_projections: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(weights (E, out, in), biases (E, out)) of each projection of the RMoE layer at
    ``ffn_prefix``: ``core + residual``, as the layer computes them."""
    out = []
    for cw, cb in core_keys(ffn_prefix, num_projections):
        out.append(tuple(state_dict[c] + state_dict[c.replace('.core_', '.residual_')]
                         for c in (cw, cb)))
    return out


def _layer_projections(state_dict: StateDict, pattern: 're.Pattern') -> Dict[str, int]:
    """The layers whose projection keys ``pattern`` matches (its groups ``ffn`` and ``i``):
    prefix with a trailing dot, and how many projections."""
    projections: Dict[str, int] = {}
    for key in state_dict:
        m = pattern.match(key)
        if m:
            ffn = m.group('ffn') + '.'
            projections[ffn] = max(projections.get(ffn, 0), int(m.group('i')) + 1)
    return projections


def rmoe_layer_prefixes(state_dict: StateDict) -> Dict[str, int]:
    """Every RMoE layer of a state dict (prefix with a trailing dot) and its projections."""
    return _layer_projections(state_dict, _CORE)


def neighbour_linear_names(state_dict: StateDict, layer: str) -> Optional[List[str]]:
    """The projection names of the dense FFNs beside RMoE layer ``layer`` (same place in the
    other blocks of its block list), if they agree on one layout; else None.

    ``backbone.stage2.blocks.1.mlp`` looks at ``backbone.stage2.blocks.{j}.mlp.*.weight``.
    """
    parts = layer.split('.')
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numeric:
        return None
    i = numeric[-1]
    pattern = re.compile(re.escape('.'.join(parts[:i])) + r'\.\d+\.'
                         + re.escape('.'.join(parts[i + 1:])) + r'\.(?P<name>.+)\.weight$')
    layouts = set()
    for key in state_dict:
        m = pattern.match(key)
        if m and '.moe.' not in key:
            layouts.add(m.group('name'))
    for names in (['fc1', 'fc2'], mmcv_ffn_linear_names(len(layouts))):
        if layouts == set(names):
            return names
    return None


def fold_rmoe_to_dense(state_dict: StateDict,
                       linear_names: Optional[Mapping[str, Sequence[str]]] = None
                       ) -> Tuple[StateDict, List[str]]:
    """Fold every RMoE layer into a dense FFN holding its mean expert (core + mean residual).

    Router parameters are dropped.

    Args:
        state_dict (dict): an RMoE model's (or backbone's) state dict.
        linear_names (Mapping[str, Sequence[str]], optional): for an RMoE layer (its key
            prefix without the trailing dot, e.g. ``'backbone.stage2.blocks.1.mlp'``), the
            names of the dense FFN's projections it replaced (``RMoEFFN.dense_linear_names``).
            A layer not named here was an mmcv ``FFN``. Default: None.

    Returns:
        (the dense state dict, the RMoE layers folded, without the trailing dot)

    Raises:
        ValueError: ``linear_names`` gives a layer a number of projections its cores lack.
    """
    linear_names = dict(linear_names or {})
    projections = rmoe_layer_prefixes(state_dict)
    out = OrderedDict((k, v) for k, v in state_dict.items()
                      if not any(k.startswith(f + 'moe.') for f in projections))
    for ffn, count in projections.items():
        names = linear_names.get(ffn[:-1]) or mmcv_ffn_linear_names(count)
        if len(names) != count:
            raise ValueError(f'RMoE layer {ffn[:-1]!r} has {count} core projections, but its '
                             f'dense layout names {len(names)}: {list(names)}')
        for (dw, db), (cw, cb) in zip(dense_ffn_keys(ffn, names), core_keys(ffn, count)):
            for dense_key, core_key in ((dw, cw), (db, cb)):
                residual_key = core_key.replace('.core_', '.residual_')
                out[dense_key] = state_dict[core_key] + state_dict[residual_key].mean(0)
    return out, sorted(f[:-1] for f in projections)


# ------------------------------------------------------------------------------------- Swin

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


# PatchMerging concatenates its 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1) in the
# official Swin and (0,0), (0,1), (1,0), (1,1) in the OpenMMLab one (an unfold): swapping the
# middle two is its own inverse.
_MERGE_ORDER = [0, 2, 1, 3]


def _official_reduction(weight: torch.Tensor) -> torch.Tensor:
    out_channels, in_channels = weight.shape
    weight = weight.reshape(out_channels, in_channels // 4, 4).transpose(1, 2)
    return weight[:, _MERGE_ORDER].reshape(out_channels, in_channels)


def _official_merge_norm(vector: torch.Tensor) -> torch.Tensor:
    channels = vector.shape[0]
    return vector.reshape(channels // 4, 4).transpose(0, 1)[_MERGE_ORDER].reshape(channels)


def openmmlab_to_official_swin(state_dict: StateDict) -> StateDict:
    """An OpenMMLab Swin backbone's keys (no ``backbone.`` prefix) in microsoft/Swin-
    Transformer's layout: the inverse of the upstream ``swin_converter``, PatchMerging's
    channel order included. Keys it does not know keep their names."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('stages.'):
            key = 'layers.' + key[len('stages.'):]
            if '.downsample.reduction.' in key:
                value = _official_reduction(value)
            elif '.downsample.norm.' in key:
                value = _official_merge_norm(value)
            for mmlab, official in (('.attn.w_msa.', '.attn.'), ('.ffn.layers.0.0.', '.mlp.fc1.'),
                                    ('.ffn.layers.1.', '.mlp.fc2.'), ('.ffn.', '.mlp.')):
                if mmlab in key:
                    key = key.replace(mmlab, official, 1)
                    break
        elif key.startswith('patch_embed.projection.'):
            key = key.replace('patch_embed.projection.', 'patch_embed.proj.', 1)
        out[key] = value
    return out


def is_swin_derived_buffer(key: str) -> bool:
    """Whether ``key`` names a buffer Swin derives from its window size (see above)."""
    return key.rsplit('.', 1)[-1] in SWIN_DERIVED_BUFFERS


# -------------------------------------------------------------------------------------- CvT

CVT_CLASSIFIER_PREFIXES = ('head.', 'norm.')


def cvt_backbone_state_dict(state_dict: StateDict) -> StateDict:
    """The backbone tensors of an official CvT classifier or an mmseg/mmdet checkpoint.

    The official keys (``stage{i}.blocks.{j}.mlp.fc1.weight``, ...) are the backbone's own;
    the classifier's ``head.*`` and final ``norm.*`` are dropped. A full OpenMMLab model keeps
    the backbone under ``backbone.``.
    """
    if any(k.startswith(('backbone.', 'module.backbone.')) for k in state_dict):
        return backbone_state_dict(state_dict)
    return OrderedDict((k, v) for k, v in state_dict.items()
                       if not k.startswith(CVT_CLASSIFIER_PREFIXES))

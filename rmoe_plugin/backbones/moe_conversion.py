"""Where a backbone becomes RMoE: one conversion for every backbone the plugin serves.

An RMoE backbone is its dense backbone's own class with :class:`RMoEBackboneMixin` in front:

- ``RMoESwinTransformer`` and ``RMoECvT`` are such classes, registered by name;
- ``type='RMoEBackbone', backbone_type='BEiT', ...`` makes one from any registered backbone
  (mmseg's ``BEiT`` and ``VisionTransformer``, mmpretrain's ``VisionTransformer`` and
  ``BEiTViT``, ``mmpretrain.TIMMBackbone``, ...), all its own arguments beside.

Building one builds the dense backbone as it is, finds its FFNs (:func:`find_ffns`: mmcv ``FFN``,
timm ``Mlp`` and other ``fc1``/``act``/``fc2`` MLPs), chooses some (:func:`select_ffns`, from
``moe_blocks``) and puts ``RMoEFFN.from_dense`` in the place of each: at that moment the backbone
computes exactly what the dense one did. Module paths, and so checkpoint keys, do not change
except inside the replaced FFNs.

``init_weights`` is the dense backbone's own (its ``init_cfg``, its checkpoint conversions and
interpolations); the dense FFN weights it loads become the experts' cores through
``RMoEFFN``'s state-dict hook. Layers it loaded nothing into start fresh, and one log line says
which layers got what.

Under ``with_cp=True`` the blocks that hold an RMoE layer checkpoint without re-entry, so the
balance losses keep their gradient (:mod:`.checkpointing`); a backbone without a ``with_cp`` of
its own gets one. The classes made at build time (an RMoE backbone, its checkpointed blocks)
are found in this module by their qualified names, so whole models pickle.
"""
import fnmatch
import importlib
import inspect
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.registry import MODELS, DefaultScope
from torch import nn

from ..engine.checkpoint import extract_state_dict, load_checkpoint_file
from ..engine.convert import backbone_state_dict
from ..models.dense_ffn import is_dense_ffn
from ..models.ffn import RMoEFFN
from .checkpointing import CheckpointWithoutReentryMixin, checkpointing_module

MoEBlocks = Union[None, str, Sequence[Sequence[int]], Sequence[str]]
MOE_BLOCKS_FORMS = ("None (every other block, the odd ones, of the last two block lists), "
                    "'all', 'none', one list of block indices per block list, or a list of "
                    "FFN path patterns such as ['layers.*.ffn']")


@dataclass(frozen=True)
class FFNSite:
    """Where an FFN sits in a backbone.

    Attributes:
        path: its module path, e.g. ``'stages.2.blocks.1.ffn'``.
        group: the block list holding it, e.g. ``'stages.2.blocks'`` (a Swin or CvT stage, the
            ``layers`` of a ViT), the path up to its last numeric part.
        index: its block's index in that list.
    """
    path: str
    group: str
    index: int

    @classmethod
    def of(cls, path: str) -> 'FFNSite':
        parts = path.split('.')
        for i in range(len(parts) - 1, -1, -1):
            if parts[i].isdigit():
                return cls(path, '.'.join(parts[:i]), int(parts[i]))
        return cls(path, path, 0)


def find_ffns(backbone: nn.Module) -> List[Tuple[FFNSite, nn.Module]]:
    """Every FFN of ``backbone`` (dense or already RMoE) with its site, in module order."""
    found = []
    inside = None
    for name, module in backbone.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if name and (isinstance(module, RMoEFFN) or is_dense_ffn(module)):
            found.append((FFNSite.of(name), module))
            inside = name + '.'
    return found


def group_sites(sites: Sequence[FFNSite]) -> 'OrderedDict[str, List[FFNSite]]':
    """The sites of each block list, the lists in order of appearance."""
    groups: 'OrderedDict[str, List[FFNSite]]' = OrderedDict()
    for site in sites:
        groups.setdefault(site.group, []).append(site)
    return groups


def resolve_moe_blocks(moe_blocks: MoEBlocks, depths: Sequence[int]) -> List[List[int]]:
    """Which blocks of each block list become MoE, as indices per list.

    Args:
        moe_blocks: None for the default (every other block, the odd ones, of the last two
            lists: Swin-MoE's choice for Swin, V-MoE's "every other layer" for a ViT);
            ``'all'``; ``'none'``; or one list of block indices per list, e.g.
            ``[[], [], [1, 3, 5], [1]]``.
        depths: blocks per list.

    Raises:
        ValueError: ``moe_blocks`` is none of these, or names a block that does not exist.
    """
    if moe_blocks is None:
        return [list(range(1, d, 2)) if s >= len(depths) - 2 else []
                for s, d in enumerate(depths)]
    if moe_blocks == 'all':
        return [list(range(d)) for d in depths]
    if moe_blocks == 'none':
        return [[] for _ in depths]
    if (isinstance(moe_blocks, str) or len(moe_blocks) != len(depths)
            or not all(isinstance(b, (list, tuple)) for b in moe_blocks)):
        raise ValueError(f'moe_blocks must be {MOE_BLOCKS_FORMS}; this backbone has '
                         f'{len(depths)} block lists, got {moe_blocks!r}')
    for stage, (blocks, depth) in enumerate(zip(moe_blocks, depths)):
        bad = [b for b in blocks if not (isinstance(b, int) and 0 <= b < depth)]
        if bad:
            raise ValueError(f'moe_blocks: stage {stage} has blocks 0..{depth - 1}, got {bad}')
    return [sorted(set(blocks)) for blocks in moe_blocks]


def select_ffns(backbone: nn.Module, moe_blocks: MoEBlocks) -> List[FFNSite]:
    """The FFN sites of ``backbone`` that ``moe_blocks`` chooses (see MOE_BLOCKS_FORMS).

    Raises:
        ValueError: the backbone has no FFN, or ``moe_blocks`` is malformed, names a block
            without an FFN, or holds a pattern that matches no FFN.
    """
    sites = [site for site, _ in find_ffns(backbone)]
    if not sites:
        raise ValueError(f'{type(backbone).__name__} has no FFN RMoE can take over (an mmcv '
                         "FFN, or an MLP of fc1, act, fc2 such as timm's Mlp)")
    if (isinstance(moe_blocks, (list, tuple)) and moe_blocks
            and all(isinstance(p, str) for p in moe_blocks)):
        return _match_patterns(backbone, sites, moe_blocks)
    groups = group_sites(sites)
    depths = [max(s.index for s in group) + 1 for group in groups.values()]
    chosen = resolve_moe_blocks(moe_blocks, depths)
    selected = []
    for (name, group), blocks in zip(groups.items(), chosen):
        by_index = {site.index: site for site in group}
        missing = [b for b in blocks if b not in by_index]
        if missing and moe_blocks not in (None, 'all'):
            raise ValueError(f'moe_blocks: blocks {missing} of {name} hold no FFN')
        selected += [by_index[b] for b in blocks if b in by_index]
    return selected


def _match_patterns(backbone: nn.Module, sites: List[FFNSite],
                    patterns: Sequence[str]) -> List[FFNSite]:
    selected = []
    for pattern in patterns:
        matched = [s for s in sites if fnmatch.fnmatchcase(s.path, pattern)]
        if not matched:
            others = [f'{n} ({type(m).__name__})' for n, m in backbone.named_modules()
                      if n and fnmatch.fnmatchcase(n, pattern)]
            what = (f'it matches {others[:3]}, which are not FFNs' if others
                    else 'it matches no module')
            raise ValueError(f'moe_blocks pattern {pattern!r} selects no FFN: {what}; the '
                             f'FFNs are {[s.path for s in sites[:4]]}...')
        selected += [s for s in matched if s not in selected]
    return sorted(selected, key=sites.index)


def _without_reentry(block: nn.Module) -> None:
    if not isinstance(block, CheckpointWithoutReentryMixin):
        block.__class__ = derived_class('RMoEBlock', type(block))


def checkpoint_without_reentry(backbone: nn.Module, sites: Sequence[FFNSite]) -> None:
    """Make each block that checkpoints one of ``sites`` under its ``with_cp`` do so without
    re-entry (see :mod:`.checkpointing`), so that the balance losses of the RMoE layers keep
    their gradient."""
    for site in sites:
        path = checkpointing_module(backbone, site.path)
        if path is not None:
            _without_reentry(backbone.get_submodule(path))


def checkpoint_blocks(backbone: nn.Module, with_cp: bool) -> None:
    """Give every block holding an FFN (the entry of a block list that holds it) a
    ``with_cp`` flag that checkpoints it without re-entry: activation checkpointing for a
    backbone that has none of its own."""
    for site, _ in find_ffns(backbone):
        if site.group != site.path:  # in a block list
            block = backbone.get_submodule(f'{site.group}.{site.index}')
            block.with_cp = with_cp
            _without_reentry(block)


def convert_ffns(backbone: nn.Module, sites: Sequence[FFNSite],
                 moe_cfg: Optional[dict] = None) -> List[str]:
    """Put ``RMoEFFN.from_dense(ffn, **moe_cfg)`` in the place of the FFN at each site.

    Returns:
        list[str]: the module paths of the new RMoE layers.
    """
    for site in sites:
        parent_path, _, attr = site.path.rpartition('.')
        parent = backbone.get_submodule(parent_path)
        dense = getattr(parent, attr)
        if isinstance(dense, RMoEFFN):
            raise ValueError(f'{site.path} is an RMoE layer already')
        setattr(parent, attr, RMoEFFN.from_dense(dense, name=site.path, **dict(moe_cfg or {})))
    return [site.path for site in sites]


def moe_blocks_of(backbone: nn.Module, paths: Sequence[str]) -> List[List[int]]:
    """``paths`` as ``moe_blocks`` (block indices per block list of ``backbone``)."""
    groups = group_sites([site for site, _ in find_ffns(backbone)])
    chosen = {FFNSite.of(p) for p in paths}
    return [[s.index for s in group if s in chosen] for group in groups.values()]


class RMoEBackboneMixin:
    """Turns chosen FFNs of the backbone class it precedes into ``RMoEFFN`` layers.

    Args (besides every argument of the dense backbone):
        moe_cfg (dict, optional): ``RMoEFFN`` arguments of every MoE layer, e.g.
            ``dict(num_experts=8, top_k=1, capacity_factor=1.25)``.
        moe_blocks (None | str | list): which FFNs become MoE: None (every other block, the
            odd ones, of the last two block lists), ``'all'``, ``'none'``, block indices per
            block list (``[[], [], [1, 3, 5], [1]]`` for a Swin), or FFN path patterns
            (``['layers.1[13579].ffn', 'layers.2[13].ffn']``).
        with_cp (bool): activation checkpointing. A backbone with a ``with_cp`` argument of
            its own (mmseg's ViT and Swin, CvT) takes it, and its blocks that hold an RMoE
            layer checkpoint without re-entry, so their balance losses keep their gradient;
            for one without (mmseg's BEiT, mmpretrain's ViT and BEiT, ``TIMMBackbone``) every
            block that holds an FFN checkpoints without re-entry. Default: the backbone's own
            default, else False.
    """
    # Whether the class's own with_cp checkpoints without re-entry (the balance loss keeps
    # its gradient); the OpenMMLab layers' with_cp does not, and their blocks that hold an
    # RMoE layer are made to.
    checkpoints_without_reentry = False

    def __init__(self, *args, moe_cfg: Optional[dict] = None, moe_blocks: MoEBlocks = None,
                 **kwargs):
        own_with_cp = None
        if 'with_cp' not in inspect.signature(super().__init__).parameters:
            own_with_cp = kwargs.pop('with_cp', None)
        super().__init__(*args, **kwargs)
        sites = select_ffns(self, moe_blocks)
        if not self.checkpoints_without_reentry:
            checkpoint_without_reentry(self, sites)
        self.moe_layer_names = convert_ffns(self, sites, moe_cfg)
        if own_with_cp is not None:
            checkpoint_blocks(self, own_with_cp)
        self.moe_blocks = moe_blocks_of(self, self.moe_layer_names)
        if isinstance(self, nn.Module):
            self.train(self.training)  # frozen stages, norm_eval: the new layers too

    def moe_layers(self) -> List[RMoEFFN]:
        return [self.get_submodule(name) for name in self.moe_layer_names]

    def init_weights(self) -> None:
        upstream = getattr(super(), 'init_weights', None)
        if getattr(self, '_is_init', False):  # weights loaded at construction (timm)
            if upstream is not None:
                upstream()
            return
        layers = dict(zip(self.moe_layer_names, self.moe_layers()))
        for layer in layers.values():
            layer.loaded_from = None
        if upstream is not None:
            upstream()
        for layer in layers.values():
            if layer.loaded_from is None:  # the dense init only knows nn.Linear
                layer.moe.experts.reset_parameters()
                layer.moe.router.reset_parameters()
        log_rmoe_init(self, layers)


def log_rmoe_init(backbone: nn.Module, layers: Dict[str, RMoEFFN]) -> None:
    """One log line: which layers are RMoE and where their weights came from."""
    by_source: Dict[Optional[str], List[str]] = {}
    for name, layer in layers.items():
        by_source.setdefault(layer.loaded_from, []).append(name)
    experts = '/'.join(str(e) for e in sorted({layer.num_experts for layer in layers.values()}))
    parts = [f'{type(backbone).__name__}: {len(layers)} RMoE layers ({experts} experts): '
             + ', '.join(layers)]
    if by_source.get('dense'):
        parts.append(f'{len(by_source["dense"])} took the checkpoint\'s dense FFNs as their '
                     'cores (routers and residuals start fresh)')
    if by_source.get('moe'):
        parts.append(f'{len(by_source["moe"])} loaded MoE experts (core: their mean, residuals: '
                     'each expert minus it) and their routers')
    if by_source.get('rmoe'):
        parts.append(f'{len(by_source["rmoe"])} loaded RMoE weights')
    if by_source.get(None):
        parts.append(f'{len(by_source[None])} start fresh (no checkpoint weights for them): '
                     + ', '.join(by_source[None]))
    MMLogger.get_current_instance().info('; '.join(parts))


def rmoe_class(dense_class: type) -> type:
    """``dense_class`` with :class:`RMoEBackboneMixin` in front (one class per dense class).

    Raises:
        ValueError: ``dense_class`` is not a class, or is an RMoE backbone already.
    """
    if not isinstance(dense_class, type):
        raise ValueError(f'backbone_type must name a backbone class, got {dense_class!r}')
    if issubclass(dense_class, RMoEBackboneMixin):
        raise ValueError(f'backbone_type {dense_class.__name__} is an RMoE backbone already; '
                         'give its dense type')
    return derived_class('RMoE', dense_class)


# The classes made at build time: a mixin in front of an upstream class, by name prefix.
_MIXINS = {'RMoE': RMoEBackboneMixin, 'RMoEBlock': CheckpointWithoutReentryMixin}
_DERIVED: Dict[Tuple[str, type], type] = {}


def derived_class(prefix: str, base: type) -> type:
    """``base`` with the mixin named by ``prefix`` (``'RMoE'``, ``'RMoEBlock'``) in front, made
    once per pair and named ``<prefix><base name>``.

    Its qualified name, e.g. ``RMoE[mmseg/models/backbones/beit:BEiT]``, is an attribute of
    this module, made again on first access in a process that has not built it yet, so that
    pickle (``torch.save`` of a whole model, worker processes) finds the class by name.
    """
    if (prefix, base) not in _DERIVED:
        mixin = _MIXINS[prefix]
        where = f'{base.__module__}:{base.__qualname__}'
        _DERIVED[prefix, base] = type(f'{prefix}{base.__name__}', (mixin, base), dict(
            __module__=__name__, __qualname__=f'{prefix}[{where.replace(".", "/")}]',
            __doc__=f'``{where}`` with :class:`{mixin.__name__}` in front.\n\n'
                    + (mixin.__doc__ or '')))
    return _DERIVED[prefix, base]


def __getattr__(name: str) -> type:
    """The class of :func:`derived_class` whose qualified name is ``name``."""
    match = re.fullmatch(r'(\w+)\[([\w/]+):([\w/]+)\]', name)
    if match is None or match[1] not in _MIXINS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    base = importlib.import_module(match[2].replace('/', '.'))
    for part in match[3].split('/'):
        base = getattr(base, part)
    return derived_class(match[1], base)


def rmoe_backbone_builder(registry):
    """The ``RMoEBackbone`` builder of one framework's ``MODELS`` registry."""

    def RMoEBackbone(backbone_type, moe_cfg: Optional[dict] = None,  # noqa: N802
                     moe_blocks: MoEBlocks = None, **backbone_args) -> nn.Module:
        """Any registered backbone with RMoE FFNs.

        Args:
            backbone_type (str | type): the dense backbone's ``type``, e.g. ``'BEiT'`` or
                ``'mmpretrain.TIMMBackbone'``.
            moe_cfg (dict, optional): ``RMoEFFN`` arguments of every MoE layer.
            moe_blocks: which FFNs become MoE (see :class:`RMoEBackboneMixin`).
            **backbone_args: the dense backbone's own arguments, ``init_cfg`` included.

        Raises:
            ValueError: ``backbone_type`` is unknown or not a backbone class, or a selection
                or MoE argument is bad.
        """
        dense_class = (backbone_type if isinstance(backbone_type, type)
                       else registry.get(backbone_type))
        if dense_class is None:
            raise ValueError(f'backbone_type {backbone_type!r} is not registered in '
                             f'{registry.scope}::MODELS (or the scope it names)')
        return rmoe_class(dense_class)(moe_cfg=moe_cfg, moe_blocks=moe_blocks, **backbone_args)

    return RMoEBackbone


def register_rmoe_backbone(registry) -> None:
    registry.register_module(name='RMoEBackbone', module=rmoe_backbone_builder(registry))


def dense_linear_names(model: nn.Module, prefix: str = '') -> Dict[str, List[str]]:
    """Each RMoE layer of ``model`` (path with ``prefix``) and the names of the dense
    projections it replaced, for :func:`rmoe_plugin.engine.convert.fold_rmoe_to_dense`."""
    return {f'{prefix}{name}': list(m.dense_linear_names) for name, m in model.named_modules()
            if isinstance(m, RMoEFFN)}


def _is_timm(cfg: ConfigDict) -> bool:
    return cfg.get('type') == 'RMoEBackbone' and \
        str(cfg.get('backbone_type', '')).split('.')[-1] == 'TIMMBackbone'


def _saved(state_dict: dict, folder: str) -> str:
    path = os.path.join(folder, 'backbone.pth')
    torch.save({'state_dict': state_dict}, path)
    return path


def _build_backbone(cfg: ConfigDict, scope: str) -> nn.Module:
    with DefaultScope.overwrite_default_scope(scope):
        backbone = MODELS.build(cfg)
    backbone.init_weights()
    return backbone


def dense_to_rmoe_checkpoint(in_path: str, backbone_cfg: dict, scope: str) -> Tuple[dict, str]:
    """An RMoE checkpoint from a dense one, built as the RMoE config's backbone would load it.

    The backbone of ``backbone_cfg`` (any RMoE backbone config) is built in ``scope`` and
    initialised from ``in_path`` through its own loading (``init_cfg``; ``checkpoint_path``
    for ``TIMMBackbone``): its cores are the dense FFNs, its routers and residuals start as
    configured. Entries of a full segmentor/detector checkpoint outside the backbone are kept
    as they are.

    Returns:
        (checkpoint with ``state_dict`` in the full-model layout, a summary of what changed)

    Raises:
        ValueError: ``backbone_cfg`` has no ``moe_cfg``, or the checkpoint does not fit.
    """
    if not backbone_cfg.get('moe_cfg'):
        raise ValueError(
            'model.backbone has no moe_cfg, the arguments of the RMoE layers to make (e.g. '
            "moe_cfg=dict(num_experts=8, top_k=1)); give an RMoE config that sets it")
    checkpoint = load_checkpoint_file(in_path)
    source = extract_state_dict(checkpoint)
    cfg = ConfigDict(backbone_cfg)
    with tempfile.TemporaryDirectory() as folder:
        if _is_timm(cfg):  # timm loads its own checkpoints, from a local file, at construction
            cfg.checkpoint_path = in_path if os.path.isfile(in_path) else _saved(source, folder)
            cfg.pop('init_cfg', None)
        else:
            # Not every backbone takes a full model's checkpoint (mmseg's BEiT does not):
            # each is given the backbone part, as init_cfg's prefix='backbone.' would give it.
            bare = backbone_state_dict(source)
            path = in_path if bare is source else _saved(bare, folder)
            cfg.init_cfg = ConfigDict(type='Pretrained', checkpoint=path)
        backbone = _build_backbone(cfg, scope)
    state_dict = OrderedDict((k, v) for k, v in source.items()
                             if not k.startswith(('backbone.', 'module.backbone.')))
    if len(state_dict) == len(source):  # a bare backbone checkpoint
        state_dict.clear()
    state_dict.update((f'backbone.{k}', v) for k, v in backbone.state_dict().items())
    layers = [n for n, m in backbone.named_modules() if isinstance(m, RMoEFFN)]
    summary = (f'{len(layers)} FFNs became RMoE layers ({dict(backbone_cfg["moe_cfg"])}): '
               + ', '.join(f'backbone.{n}' for n in layers))
    meta = dict(checkpoint.get('meta', {}) if isinstance(checkpoint.get('meta'), dict) else {})
    source_uri = in_path if '://' in in_path else os.path.abspath(in_path)
    meta['rmoe_conversion'] = dict(source=source_uri, moe_layers=layers,
                                   dense_linear_names=dense_linear_names(backbone, 'backbone.'))
    return dict(state_dict=state_dict, meta=meta), summary


def _framework_registries() -> list:
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    registries = [MMSEG_MODELS, MMDET_MODELS]
    try:  # mmpretrain is optional
        from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
    except ImportError:
        return registries
    return registries + [MMPRETRAIN_MODELS]


for _registry in _framework_registries():
    register_rmoe_backbone(_registry)

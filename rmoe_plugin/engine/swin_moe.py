"""Swin-MoE's released checkpoints (microsoft/Swin-Transformer, trained with Tutel), read and
written, and turned into the OpenMMLab RMoE-Swin layout and back.

A released checkpoint is ``NAME.pth.master`` (everything but the experts, saved by rank 0) and
``NAME.pth.rank0`` ... ``NAME.pth.rank{R-1}`` (each rank's experts), or one ``.pth.global`` or
merged file; each holds its state under ``'model'``. Per MoE block the experts are Tutel's
``..._moe_layer.experts.batched_fc1_w`` (E_local, H/s, C), ``batched_fc2_w`` (E_local, H/s, C),
fc2's weight transposed, ``batched_fc1_bias`` (E_local, H/s) and ``batched_fc2_bias``
(E_local, ceil(C/s)) (the Tutel of 2022: (E_local, 1, ...)). Rank r holds experts
``r * E_local ...``; with sharded experts (``NUM_LOCAL_EXPERTS: -s``) each expert is split
along its hidden units over s consecutive ranks. A frozen fc2 bias (``MLP_FC2_BIAS: False``) is
not an expert parameter for Swin-Transformer's saver, so ``.master`` holds rank 0's slice.

Attention uses a continuous position bias, ``attn.cpb_mlp`` applied to a log-spaced table of
relative coordinates; mmseg's and mmdet's Swin take a bias table, which
:func:`cpb_bias_table` evaluates at any window, the coordinates normalised by the window the
model was trained with (as Swin-Transformer's ``pretrained_window_size`` does).

The converted checkpoint holds the backbone in the OpenMMLab layout with the stacked experts
(``ffn.moe.experts.weights.{i}`` (E, out, in), ``biases.{i}``), which ``RMoEFFN`` loads as
core (their mean) plus residuals; its ``meta['swin_moe']`` records how the source was laid
out and keeps the tensors the backbone has no place for (``cpb_mlp``, the derived buffers,
the final norm, the classifier), so :func:`to_released` writes the released layout back.
"""
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .checkpoint import extract_state_dict, load_checkpoint_file
from .convert import (StateDict, backbone_state_dict, expert_keys, is_swin_derived_buffer,
                      openmmlab_to_official_swin, rmoe_experts, rmoe_layer_prefixes,
                      to_openmmlab_swin)

EXPERT_PARAMS = ('batched_fc1_w', 'batched_fc2_w', 'batched_fc1_bias', 'batched_fc2_bias')
COSINE_ROUTER = ('temperature', 'cosine_projector.weight', 'cosine_projector.bias',
                 'sim_matrix')
_BLOCK = r'layers\.\d+\.blocks\.\d+\.'
KNOWN_KEYS = [re.compile(p) for p in (
    r'patch_embed\.(proj|norm)\.(weight|bias)', r'absolute_pos_embed',
    _BLOCK + r'(norm1|norm2)\.(weight|bias)', _BLOCK + r'attn\.(qkv|proj)\.(weight|bias)',
    _BLOCK + r'attn\.cpb_mlp\.(0\.weight|0\.bias|2\.weight)',
    _BLOCK + r'attn\.(relative_coords_table|relative_position_index)', _BLOCK + 'attn_mask',
    _BLOCK + r'mlp\.(fc1|fc2)\.(weight|bias)',
    _BLOCK + r'mlp\._moe_layer\.(_num_global_experts|gates\.0\.(wg\.weight|temperature|'
             r'cosine_projector\.(weight|bias)|sim_matrix)|experts\.batched_(fc1_w|fc2_w|'
             r'fc1_bias|fc2_bias))',
    r'layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))',
    r'(norm|head)\.(weight|bias)')]
_EXPERT_KEY = re.compile(r'^(?P<block>' + _BLOCK + r')mlp\._moe_layer\.experts\.(?P<name>\w+)$')
_MOE_LAYER = '{block}mlp._moe_layer.'


# ------------------------------------------------------------------------------------ files

def released_files(src: str, num_ranks: Optional[int] = None) -> Tuple[Optional[str], List[str]]:
    """The files of a released checkpoint: (``.master`` or None, the rank files in order).

    ``src`` is ``NAME.pth`` with ``NAME.pth.master`` and ``NAME.pth.rank*`` beside it (or one
    of those), or a single file (``.pth.global``, merged; a path or URL), returned as the one
    "rank" file with no master. The ranks expected are ``num_ranks``, else the ``{R}gpu`` of the
    released file names, else as many as are found.

    Raises:
        FileNotFoundError: nothing is there, or a rank file is missing (named).
        ValueError: rank files beyond the ranks expected.
    """
    if '://' in src or (os.path.isfile(src) and not re.search(r'\.(master|rank\d+)$', src)):
        return None, [src]
    base = re.sub(r'\.(master|rank\d+)$', '', src)
    folder = os.path.dirname(base) or '.'
    name = os.path.basename(base)
    rank_file = re.compile(re.escape(name) + r'\.rank(\d+)')
    matches = [rank_file.fullmatch(f) for f in (os.listdir(folder) if os.path.isdir(folder)
                                                else [])]
    found = sorted(int(m.group(1)) for m in matches if m)
    master = base + '.master' if os.path.isfile(base + '.master') else None
    if not found and master is None:
        raise FileNotFoundError(f'Swin-MoE checkpoint {src!r}: no such file, nor '
                                f'{base}.master / {base}.rank0 ... beside it')
    in_name = re.search(r'(\d+)gpu', name)
    expected = num_ranks or (int(in_name.group(1)) if in_name else max(found, default=0) + 1)
    for rank in range(expected):
        if rank not in found:
            raise FileNotFoundError(f'Swin-MoE checkpoint {base}: rank file {base}.rank{rank} '
                                    f'is missing ({expected} ranks expected)')
    extra = [r for r in found if r >= expected]
    if extra:
        raise ValueError(f'Swin-MoE checkpoint {base}: {expected} ranks expected, but '
                         f'{base}.rank{extra[0]} exists too; pass the number of ranks')
    return master, [f'{base}.rank{r}' for r in range(expected)]


def _read(path: str) -> StateDict:
    try:
        checkpoint = load_checkpoint_file(path)
    except EOFError as e:  # an old-format (non-zip) file cut short
        raise ValueError(f'checkpoint {path!r} is truncated ({e})') from e
    return backbone_state_dict(extract_state_dict(checkpoint))  # without a DDP 'module.'


def _check_known(state: StateDict, path: str, whole: bool) -> None:
    """Refuse a file that is not (part of) a Swin-MoE checkpoint, naming it and the key."""
    if whole and not any('.attn.cpb_mlp.' in k for k in state):
        raise ValueError(f'{path}: not a Swin-MoE checkpoint: it has no layers.*.attn.cpb_mlp '
                         "(Swin-MoE's position bias); a dense Swin checkpoint loads through "
                         "RMoESwinTransformer's init_cfg as it is")
    unknown = [k for k in state if not any(p.fullmatch(k) for p in KNOWN_KEYS)]
    if unknown:
        raise ValueError(f'{path}: key {unknown[0]!r} is not part of a Swin-MoE checkpoint'
                         + (f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''))


def is_released_swin_moe(state: StateDict) -> bool:
    """Whether ``state`` is a Swin-MoE model in Swin-Transformer's keys."""
    return any(re.match(r'(module\.)?layers\.\d+\.blocks\.\d+\.attn\.cpb_mlp\.', k)
               for k in state)


# ---------------------------------------------------------------------------------- reading

def read_released(src: str, num_ranks: Optional[int] = None) -> Tuple[StateDict, dict]:
    """A released Swin-MoE checkpoint as one state dict in Swin-Transformer's keys, every
    expert of a layer in one tensor (global expert order), and what was found.

    Args:
        src (str): see :func:`released_files`.
        num_ranks (int, optional): the ranks the experts were saved on. Default: from the
            file names.

    Returns:
        (state dict, info): see :func:`join_released`.

    Raises:
        FileNotFoundError: a file is missing. ValueError: a file is not a Swin-MoE checkpoint,
        is truncated, holds an unknown key, or its experts do not fit the others'.
    """
    master_path, rank_paths = released_files(src, num_ranks)
    master = _read(master_path) if master_path else None
    return join_released(master, [_read(p) for p in rank_paths], master_path, rank_paths)


def join_released(master: Optional[StateDict], ranks: List[StateDict],
                  master_path: Optional[str], rank_paths: List[str]) -> Tuple[StateDict, dict]:
    """Join the read files of a released Swin-MoE checkpoint (``master`` None for a single
    ``.pth.global`` or merged file, given as the one rank).

    Returns:
        (state dict, info): info holds ``files``, ``num_ranks``, ``moe_layers`` (per block
        prefix: ``num_experts``, ``shards``, ``router``), ``frozen`` (keys taken from rank 0's
        slice in ``.master``), ``legacy_bias_shape`` and ``mlp_fc2_bias``.
    """
    if master is not None:
        _check_known(master, master_path, whole=True)
    for i, (path, state) in enumerate(zip(rank_paths, ranks)):
        _check_known(state, path, whole=master is None and i == 0)
    master = master if master is not None else OrderedDict()
    state = OrderedDict(master or ((k, v) for k, v in ranks[0].items()
                                   if not _EXPERT_KEY.match(k)))
    pieces, frozen = _expert_pieces(master, ranks, rank_paths, master_path)
    legacy = any(v.dim() == 3 for (_, name), vs in pieces.items() if name.endswith('_bias')
                 for v in vs)
    moe_layers = OrderedDict()
    for block in sorted({b for b, _ in pieces}, key=_block_order):
        moe_layers[block] = _merge_layer(block, pieces, frozen, state, len(rank_paths),
                                         rank_paths)
    dense_fc2 = [k for k in state if k.endswith('.mlp.fc2.weight')]
    info = dict(files=[p for p in [master_path, *rank_paths] if p], num_ranks=len(rank_paths),
                moe_layers=moe_layers, frozen=sorted(frozen), legacy_bias_shape=legacy,
                mlp_fc2_bias=not dense_fc2 or any(k.endswith('.mlp.fc2.bias') for k in state))
    return state, info


def _block_order(block: str) -> Tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r'\d+', block))


def _expert_pieces(master: StateDict, ranks: List[StateDict], paths: List[str],
                   master_path: Optional[str]):
    """Each expert tensor's per-rank pieces, ``{(block, name): [piece of rank 0, ...]}``,
    and the expert keys only ``.master`` holds (frozen: rank 0's piece)."""
    pieces: Dict[Tuple[str, str], List[torch.Tensor]] = OrderedDict()
    keys = [k for k in ranks[0] if _EXPERT_KEY.match(k)]
    for path, state in zip(paths, ranks):
        here = [k for k in state if _EXPERT_KEY.match(k)]
        for key in set(keys) ^ set(here):
            where = path if key in keys else paths[0]
            raise ValueError(f'{where}: has no expert tensor {key!r}, which '
                             f'{paths[0] if key in keys else path} has')
        for key in keys:
            m = _EXPERT_KEY.match(key)
            piece, first = state[key], ranks[0][key]
            if piece.shape != first.shape:
                raise ValueError(f'{path}: {key!r} has shape {tuple(piece.shape)}, '
                                 f'{paths[0]} {tuple(first.shape)}')
            pieces.setdefault((m['block'], m['name']), []).append(piece)
    frozen = []
    for key in master:
        m = _EXPERT_KEY.match(key)
        if m and key in ranks[0] and master_path != paths[0]:
            raise ValueError(f'{master_path}: expert tensor {key!r} is in the rank files too')
        if m and key not in ranks[0]:
            frozen.append(key)
            pieces[(m['block'], m['name'])] = [master[key]]
    return pieces, frozen


def _merge_layer(block: str, pieces, frozen: List[str], state: StateDict, num_ranks: int,
                 paths: List[str]) -> dict:
    """Join one MoE block's pieces into (E, ...) tensors in ``state``; its summary."""
    prefix = _MOE_LAYER.format(block=block)
    for name in EXPERT_PARAMS:
        if (block, name) not in pieces:
            raise ValueError(f'{paths[0]}: MoE block {block[:-1]} has no '
                             f'{prefix}experts.{name}')
    experts_local, hidden_local, channels = pieces[(block, 'batched_fc1_w')][0].shape
    shards = _shards(block, state, prefix, hidden_local, experts_local, num_ranks, paths)
    num_experts = experts_local * num_ranks // shards
    merged = {}
    for name in EXPERT_PARAMS:
        parts = [p.squeeze(1) if p.dim() == 3 and name.endswith('_bias') else p
                 for p in pieces[(block, name)]]
        key = f'{prefix}experts.{name}'
        if key not in frozen and len(parts) == 1 and parts[0].shape[0] != experts_local:
            # one file (merged from the rank files) that took this tensor from .master
            frozen.append(key)
        if key in frozen:
            merged[name] = _broadcast_frozen(key, parts[0], num_experts, channels,
                                             hidden_local * shards)
            continue
        joined = torch.cat(parts, dim=0)  # (E_local * R, ...), rank-major
        if shards > 1:  # expert e = pieces e*s ... e*s+s-1, along its hidden units
            joined = joined.reshape(num_experts, shards, *joined.shape[1:])
            joined = torch.cat(joined.unbind(1), dim=1) if name.endswith('_w') else \
                joined.reshape(num_experts, -1)
        merged[name] = joined[:, :channels] if name == 'batched_fc2_bias' else joined
    _check_merged(block, prefix, merged, num_experts, channels, paths)
    for name, value in merged.items():
        state[f'{prefix}experts.{name}'] = value
    router = 'cosine' if f'{prefix}gates.0.sim_matrix' in state else 'linear'
    gate = state.get(f'{prefix}gates.0.wg.weight', state.get(f'{prefix}gates.0.sim_matrix'))
    if gate is None:
        raise ValueError(f'{paths[0]}: MoE block {block[:-1]} has no router '
                         f'({prefix}gates.0.wg.weight or gates.0.sim_matrix)')
    routed = gate.shape[0] if router == 'linear' else gate.shape[1]
    if routed != num_experts:
        raise ValueError(f'{paths[0]}: the router of {block[:-1]} routes to {routed} experts, '
                         f'its expert tensors hold {num_experts}')
    return dict(num_experts=num_experts, shards=shards, router=router)


def _shards(block: str, state: StateDict, prefix: str, hidden_local: int, experts_local: int,
            num_ranks: int, paths: List[str]) -> int:
    """How many ranks share one expert: from Tutel's ``_num_global_experts`` where saved,
    else from the hidden width of the dense blocks of the same stage."""
    recorded = state.get(f'{prefix}_num_global_experts')
    stage = block.split('.blocks.')[0]
    dense = [v.shape[0] for k, v in state.items()
             if k.startswith(stage + '.blocks.') and k.endswith('.mlp.fc1.weight')]
    if recorded is not None:
        num_experts = int(recorded)
        if num_experts >= num_ranks:
            if num_experts != experts_local * num_ranks:
                raise ValueError(f'{prefix}_num_global_experts is {num_experts}, but '
                                 f'{num_ranks} files of {experts_local} experts hold '
                                 f'{experts_local * num_ranks}')
            return 1
        if num_ranks % num_experts or experts_local != 1:
            raise ValueError(f'{prefix}_num_global_experts is {num_experts}, which does not '
                             f'share {num_ranks} ranks of {experts_local} expert(s)')
        return num_ranks // num_experts
    if not dense or dense[0] == hidden_local:
        return 1
    shards = dense[0] // hidden_local
    if dense[0] % hidden_local or experts_local != 1 or num_ranks % shards:
        raise ValueError(f'{paths[0]}: {prefix}experts.batched_fc1_w has {hidden_local} hidden '
                         f'units per rank, which does not divide the {dense[0]} of the dense '
                         f'blocks of {stage} over {num_ranks} ranks')
    return shards


def _broadcast_frozen(key: str, piece: torch.Tensor, num_experts: int, channels: int,
                      hidden: int) -> torch.Tensor:
    """A frozen expert tensor, of which ``.master`` holds rank 0's piece only, for all experts:
    frozen parameters keep their initial value, the same on every rank, so the piece must be
    one constant (Swin-MoE initialises the fc2 bias to zero)."""
    if piece.numel() == 0 or not torch.all(piece == piece.flatten()[0]):
        raise ValueError(f'{key!r} is in .master (a frozen parameter, saved from rank 0 only) '
                         'and its values differ, so the other experts\' cannot be known')
    width = channels if key.endswith('fc2_bias') else hidden
    return piece.flatten()[0].expand(num_experts, width).clone()


def _check_merged(block: str, prefix: str, merged: dict, num_experts: int, channels: int,
                  paths: List[str]) -> None:
    hidden = merged['batched_fc1_w'].shape[1]
    expected = dict(batched_fc1_w=(num_experts, hidden, channels),
                    batched_fc2_w=(num_experts, hidden, channels),
                    batched_fc1_bias=(num_experts, hidden),
                    batched_fc2_bias=(num_experts, channels))
    for name, shape in expected.items():
        if tuple(merged[name].shape) != shape:
            raise ValueError(f'{paths[0]}: {prefix}experts.{name} joins to '
                             f'{tuple(merged[name].shape)}, expected {shape}')


# ------------------------------------------------------------------------ position bias

def log_spaced_coords(window: int, norm_window: int) -> torch.Tensor:
    """Swin's continuous-position-bias inputs: relative coordinates ``-(W-1) ... W-1`` on
    both axes, scaled to +-8 by ``norm_window - 1`` and log-spaced; shape (2W-1, 2W-1, 2)."""
    axis = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid([axis, axis], indexing='ij'), dim=-1)
    table = table / (norm_window - 1) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def norm_window_of(table: torch.Tensor, key: str) -> Tuple[int, int]:
    """(window, normalising window) of a stored ``relative_coords_table`` (1, 2W-1, 2W-1, 2).

    Raises:
        ValueError: the table is not Swin's log-spaced coordinates for any window.
    """
    window = (table.shape[1] + 1) // 2
    if window == 1:
        return 1, 1
    top = float(table[0, -1, window - 1, 0])  # the coordinate (W-1, 0)
    norm = round(8 * (window - 1) / (2 ** (3 * top) - 1) + 1)
    for candidate in (window, norm):
        if candidate > 1 and torch.allclose(log_spaced_coords(window, candidate), table[0]):
            return window, candidate
    raise ValueError(f'{key}: not the log-spaced relative coordinates of a {window}x{window} '
                     'window; cannot tell the window the position bias was trained with')


def cpb_bias_table(state: StateDict, attn: str, window: int) -> torch.Tensor:
    """The relative position bias table ((2W-1)^2, heads) that ``{attn}cpb_mlp`` gives at
    ``window``, its coordinates normalised by the model's own (pre-training) window."""
    key = f'{attn}relative_coords_table'
    if key not in state:
        raise ValueError(f'{key} is missing: it tells the window the position bias was '
                         'trained with')
    stored_window, norm = norm_window_of(state[key], key)
    coords = state[key][0] if window == stored_window else log_spaced_coords(window, norm)
    hidden = F.relu(F.linear(coords.float(), state[f'{attn}cpb_mlp.0.weight'].float(),
                             state[f'{attn}cpb_mlp.0.bias'].float()))
    table = F.linear(hidden, state[f'{attn}cpb_mlp.2.weight'].float())
    return table.reshape(-1, table.shape[-1]).to(state[f'{attn}cpb_mlp.2.weight'].dtype)


# ------------------------------------------------------------------ to the OpenMMLab layout

def _ffn_prefix(block: str) -> str:
    """``layers.2.blocks.1.`` -> ``stages.2.blocks.1.ffn.``"""
    return 'stages.' + block[len('layers.'):] + 'ffn.'


def released_to_openmmlab(state: StateDict, info: dict,
                          window_size: Optional[int] = None) -> Tuple[StateDict, dict]:
    """The backbone of a read Swin-MoE (see :func:`read_released`) as RMoE-Swin keys.

    Args:
        state (dict): Swin-Transformer's keys, experts joined.
        info (dict): what :func:`read_released` found.
        window_size (int, optional): the window to evaluate the position bias at. Default:
            the window of the first block (the pre-training one).

    Returns:
        (backbone state dict, ``meta['swin_moe']``)
    """
    state = OrderedDict(state)
    tables = [k for k in state if k.endswith('relative_coords_table')]
    if window_size is None and not tables:
        raise ValueError('no layers.*.attn.relative_coords_table tells the pre-training '
                         'window: give the window to evaluate the position bias at')
    window = window_size or norm_window_of(state[tables[0]], tables[0])[0]
    out = OrderedDict()
    kept = OrderedDict()
    for block, layer in info['moe_layers'].items():
        out.update(_moe_layer_to_openmmlab(state, block, layer['router']))
    for key in [k for k in state if k.endswith('.attn.cpb_mlp.0.weight')]:
        attn = key[:-len('cpb_mlp.0.weight')]
        table_key = 'stages.' + attn[len('layers.'):] + 'w_msa.relative_position_bias_table'
        out[table_key] = cpb_bias_table(state, attn, window)
    for key in list(state):
        if ('.attn.cpb_mlp.' in key or is_swin_derived_buffer(key)
                or key.startswith(('norm.', 'head.')) or key.endswith('_num_global_experts')):
            kept[key] = state.pop(key)
        elif '._moe_layer.' in key:
            state.pop(key)
    if not info['mlp_fc2_bias']:  # Swin-MoE's MLP_FC2_BIAS: False: no bias is a zero bias
        for key in [k for k in state if k.endswith('.mlp.fc2.weight')]:
            state[key[:-len('weight')] + 'bias'] = state[key].new_zeros(state[key].shape[0])
    dense, _ = to_openmmlab_swin(state)
    out.update(dense)
    meta = dict(window_size=window, num_ranks=info['num_ranks'], files=info['files'],
                moe_layers={_ffn_prefix(b)[:-1]: dict(v) for b, v in info['moe_layers'].items()},
                frozen=info['frozen'], legacy_bias_shape=info['legacy_bias_shape'],
                mlp_fc2_bias=info['mlp_fc2_bias'], kept=kept)
    return OrderedDict(sorted(out.items(), key=lambda kv: _key_order(kv[0]))), meta


def _key_order(key: str):
    return [int(p) if p.isdigit() else p for p in key.split('.')]


def _moe_layer_to_openmmlab(state: StateDict, block: str, router: str) -> StateDict:
    prefix = _MOE_LAYER.format(block=block)
    ffn = _ffn_prefix(block)
    experts = {n: state[f'{prefix}experts.{n}'] for n in EXPERT_PARAMS}
    (w1, b1), (w2, b2) = expert_keys(ffn, 2)
    out = OrderedDict([
        (w1, experts['batched_fc1_w']), (b1, experts['batched_fc1_bias']),
        (w2, experts['batched_fc2_w'].transpose(1, 2).contiguous()),
        (b2, experts['batched_fc2_bias'])])
    if router == 'linear':
        out[f'{ffn}moe.router.weight'] = state[f'{prefix}gates.0.wg.weight']
    else:
        for name in COSINE_ROUTER:
            out[f'{ffn}moe.router.{name.replace("cosine_projector", "projector")}'] = \
                state[f'{prefix}gates.0.{name}']
    return out


def convert_released(src: str, window_size: Optional[int] = None,
                     num_ranks: Optional[int] = None) -> Tuple[dict, List[str]]:
    """A released Swin-MoE checkpoint as a weights-only checkpoint that an
    ``RMoESwinTransformer``'s ``init_cfg`` (or ``load_from``) loads.

    Returns:
        (``{'state_dict': {'backbone.' + key: ...}, 'meta': {'swin_moe': ...}}``, a summary)
    """
    state, info = read_released(src, num_ranks)
    backbone, meta = released_to_openmmlab(state, info, window_size)
    checkpoint = dict(state_dict=OrderedDict((f'backbone.{k}', v) for k, v in backbone.items()),
                      meta=dict(swin_moe=meta))
    return checkpoint, describe(meta)


def load_swin_checkpoint(path: str, window_size: int) -> Tuple[StateDict, Optional[dict]]:
    """The state dict of the checkpoint at ``path`` and, for a Swin-MoE one, its
    ``meta['swin_moe']``.

    A released Swin-MoE checkpoint (``NAME.pth`` beside its ``.master`` and ``.rank*`` files,
    one of those, a ``.pth.global`` or a merged file) is converted here, its position bias
    evaluated at ``window_size``; one converted earlier comes as it is, its keys without the
    ``backbone.`` prefix. Any other checkpoint comes as :func:`extract_state_dict` gives it,
    with None.
    """
    split = re.search(r'\.(master|rank\d+)$', path) or (
        '://' not in path and not os.path.isfile(path)
        and any(os.path.isfile(f'{path}.{part}') for part in ('master', 'rank0')))
    if split:
        state, info = read_released(path)
        return released_to_openmmlab(state, info, window_size)
    checkpoint = load_checkpoint_file(path)
    state = extract_state_dict(checkpoint)
    meta = checkpoint.get('meta')
    if isinstance(meta, dict) and isinstance(meta.get('swin_moe'), dict):
        return backbone_state_dict(state), meta['swin_moe']
    if is_released_swin_moe(state):
        state, info = join_released(None, [backbone_state_dict(state)], None, [path])
        return released_to_openmmlab(state, info, window_size)
    return state, None


def describe(meta: dict) -> List[str]:
    """What a conversion read, in a few lines."""
    layers = meta['moe_layers']
    experts = sorted({v['num_experts'] for v in layers.values()})
    shards = sorted({v['shards'] for v in layers.values()})
    routers = sorted({v['router'] for v in layers.values()})
    lines = [f'read {len(meta["files"])} file(s): {", ".join(meta["files"])}',
             f'ranks: {meta["num_ranks"]}; experts: {"/".join(map(str, experts)) or "none"}'
             + (f', each sharded over {shards[0]} ranks' if shards and shards != [1] else '')
             + f'; router: {"/".join(routers) or "none (dense)"}',
             f'MoE blocks ({len(layers)}): ' + (', '.join(layers) or 'none'),
             f'position bias: cpb_mlp evaluated at window {meta["window_size"]}']
    if not meta['mlp_fc2_bias']:
        lines.append('dense fc2 has no bias (MLP_FC2_BIAS: False): a zero bias')
    if meta['frozen']:
        lines.append(f'frozen in .master, one value for every expert: {len(meta["frozen"])} '
                     f'tensor(s) ({meta["frozen"][0]}, ...)')
    return lines


def check_fits(state: StateDict, meta: dict, own: Dict[str, torch.Size]) -> List[str]:
    """Why a converted Swin-MoE backbone state dict does not fit a backbone whose state dict
    has the shapes ``own``; empty if it fits. The out norms (``norm{i}``), which Swin-MoE does
    not have, and the derived buffers may be absent."""
    problems = []
    for ffn, layer in meta['moe_layers'].items():
        key = expert_keys(ffn + '.', 2)[0][0]
        if f'{ffn}.moe.experts.core_weights.0' not in own:
            problems.append(f'{key}: the checkpoint has {layer["num_experts"]} experts here, '
                            'the backbone a dense FFN (moe_blocks)')
        elif own[f'{ffn}.moe.experts.residual_weights.0'][0] != layer['num_experts']:
            problems.append(f'{key}: the checkpoint has {layer["num_experts"]} experts, the '
                            f'backbone {own[f"{ffn}.moe.experts.residual_weights.0"][0]} '
                            '(moe_cfg.num_experts)')
    moe = set(meta['moe_layers'])
    for ffn in rmoe_layer_prefixes(dict.fromkeys(own)):
        if ffn[:-1] not in moe:
            problems.append(f'{ffn}moe: an MoE layer of the backbone, a dense FFN in the '
                            'checkpoint (moe_blocks)')
    if problems:
        return problems
    factored = {}
    for key, value in state.items():
        m = re.match(r'(.*)\.moe\.experts\.(weights|biases)\.(\d+)$', key)
        if m:
            base = f'{m[1]}.moe.experts.'
            kind = 'weights' if m[2] == 'weights' else 'biases'
            factored[f'{base}core_{kind}.{m[3]}'] = value.shape[1:]
            factored[f'{base}residual_{kind}.{m[3]}'] = value.shape
        else:
            factored[key] = value.shape
    for key, shape in factored.items():
        if key not in own:
            problems.append(f'{key}: in the checkpoint, not in the backbone'
                            + (' (the router kind: moe_cfg.router_type)' if '.router.' in key
                               else ''))
        elif tuple(own[key]) != tuple(shape):
            hint = (f': converted at window {meta["window_size"]}, convert again with '
                    '--window-size set to the backbone\'s' if key.endswith('bias_table')
                    else '')
            problems.append(f'{key}: shape {tuple(shape)} in the checkpoint, '
                            f'{tuple(own[key])} in the backbone{hint}')
    for key in own:
        if (key not in factored and not is_swin_derived_buffer(key)
                and not re.match(r'norm\d+\.', key)):
            problems.append(f'{key}: in the backbone, not in the checkpoint'
                            + (' (the router kind: moe_cfg.router_type)' if '.router.' in key
                               else ''))
    return problems


# ------------------------------------------------------------------------ back to released

def to_released(backbone: StateDict, meta: dict, num_ranks: int,
                force_position_bias: bool = False) -> Tuple[Dict[str, StateDict], List[str]]:
    """An RMoE-Swin backbone (a converted checkpoint, or one trained from it) in the released
    layout for ``num_ranks`` ranks.

    Args:
        backbone (dict): the backbone's state dict (no ``backbone.`` prefix), with MoE layers
            as stacked experts or as core and residuals.
        meta (dict): ``meta['swin_moe']`` of the converted checkpoint it started from.
        num_ranks (int): ranks to lay the experts out for; the experts must divide among them
            or they among the experts (sharded experts).
        force_position_bias (bool): write ``meta``'s ``cpb_mlp`` even where the backbone's bias
            tables are no longer its evaluation (trained). Default: False.

    Returns:
        (``{'master': state, 'rank0': state, ...}``, notes on what was written)

    Raises:
        ValueError: the experts do not divide among the ranks, or a bias table was trained
            and ``force_position_bias`` is off.
    """
    notes = []
    kept = meta['kept']
    state = OrderedDict(backbone)
    experts = {}
    for ffn, layer in meta['moe_layers'].items():
        experts[ffn] = _stacked_experts(state, ffn + '.')
        _split_routers(state, ffn, layer['router'])
    tables = {k: state.pop(k) for k in [k for k in state if k.endswith('bias_table')]}
    _check_tables(tables, kept, meta['window_size'], force_position_bias, notes)
    fc2_bias = meta['mlp_fc2_bias'] or _nonzero_dense_fc2_bias(state, notes)
    if not fc2_bias:
        for key in [k for k in state if re.search(r'\.ffn\.layers\.1\.bias$', k)]:
            state.pop(key)
    official = openmmlab_to_official_swin(state)
    for key in list(official):
        if re.match(r'norm\d+\.', key):
            official.pop(key)
    official.update(kept)
    master = OrderedDict(official)
    ranks = [OrderedDict() for _ in range(num_ranks)]
    for ffn in meta['moe_layers']:
        block = 'layers.' + ffn[len('stages.'):-len('ffn')]
        _write_experts(experts[ffn], block, meta, num_ranks, master, ranks, notes)
    files = OrderedDict(master=_ordered(master))
    files.update((f'rank{r}', _ordered(s)) for r, s in enumerate(ranks))
    return files, notes


def _ordered(state: StateDict) -> StateDict:
    return OrderedDict(sorted(state.items(), key=lambda kv: _key_order(kv[0])))


def _stacked_experts(state: StateDict, ffn: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    if f'{ffn}moe.experts.weights.0' in state:
        pairs = [(state.pop(w), state.pop(b)) for w, b in expert_keys(ffn, 2)]
    else:
        pairs = rmoe_experts(state, ffn, 2)
        for key in [k for k in state if k.startswith(f'{ffn}moe.experts.')]:
            state.pop(key)
    return pairs


def _split_routers(state: StateDict, ffn: str, router: str) -> None:
    """Router parameters renamed to Tutel's gate, in place."""
    block = 'layers.' + ffn[len('stages.'):-len('ffn')]
    prefix = _MOE_LAYER.format(block=block) + 'gates.0.'
    if router == 'linear':
        state[prefix + 'wg.weight'] = state.pop(f'{ffn}.moe.router.weight')
    else:
        for name in COSINE_ROUTER:
            state[prefix + name] = state.pop(
                f'{ffn}.moe.router.{name.replace("cosine_projector", "projector")}')


def _check_tables(tables: StateDict, kept: StateDict, window: int, force: bool,
                  notes: List[str]) -> None:
    for key, table in tables.items():
        attn = 'layers.' + key[len('stages.'):-len('w_msa.relative_position_bias_table')]
        expected = cpb_bias_table(kept, attn, window)
        if expected.shape != table.shape or not torch.allclose(expected, table, atol=1e-6):
            if not force:
                raise ValueError(
                    f'{key} is not the evaluation of {attn}cpb_mlp at window {window} any '
                    "more (trained): the released layout holds cpb_mlp, not a table; pass "
                    "--force-position-bias to write the converted checkpoint's cpb_mlp")
            notes.append(f'{key}: trained table replaced by the original cpb_mlp')


def _nonzero_dense_fc2_bias(state: StateDict, notes: List[str]) -> bool:
    trained = [k for k in state if re.search(r'\.ffn\.layers\.1\.bias$', k)
               and bool(state[k].any())]
    if trained:
        notes.append(f'{len(trained)} dense fc2 biases are non-zero (trained, e.g. {trained[0]}):'
                     ' written as mlp.fc2.bias, which Swin-Transformer reads with '
                     'MLP_FC2_BIAS: True')
    return bool(trained)


def _write_experts(pairs, block: str, meta: dict, num_ranks: int, master: StateDict,
                   ranks: List[StateDict], notes: List[str]) -> None:
    (w1, b1), (w2, b2) = pairs
    prefix = _MOE_LAYER.format(block=block) + 'experts.'
    tensors = dict(batched_fc1_w=w1, batched_fc2_w=w2.transpose(1, 2), batched_fc1_bias=b1,
                   batched_fc2_bias=b2)
    num_experts, hidden, channels = w1.shape
    if num_experts % num_ranks and num_ranks % num_experts:
        raise ValueError(f'{num_experts} experts of {block[:-1]} neither divide among '
                         f'{num_ranks} ranks nor those ranks among them')
    shards = max(1, num_ranks // num_experts)
    if hidden % shards:
        raise ValueError(f'{block[:-1]}: {hidden} hidden units do not split over {shards} '
                         'ranks per expert')
    for name, value in tensors.items():
        key = prefix + name
        pieces = _rank_pieces(name, value, num_ranks, shards, channels)
        if meta['legacy_bias_shape'] and name.endswith('_bias'):
            pieces = [p.unsqueeze(1) for p in pieces]
        if key in meta['frozen'] and bool((value == value.flatten()[0]).all()):
            master[key] = pieces[0]
            continue
        if key in meta['frozen']:
            notes.append(f'{key}: frozen in the source, trained here: written in the rank files')
        for rank, piece in zip(ranks, pieces):
            rank[key] = piece


def _rank_pieces(name: str, value: torch.Tensor, num_ranks: int, shards: int,
                 channels: int) -> List[torch.Tensor]:
    if shards == 1:
        return [p.contiguous().clone() for p in value.chunk(num_ranks, dim=0)]
    if name == 'batched_fc2_bias':  # each shard holds ceil(C/s) channels, the last padded
        width = -(-channels // shards)
        value = F.pad(value, (0, width * shards - channels))
        return [value[e:e + 1, s * width:(s + 1) * width].clone()
                for e in range(value.shape[0]) for s in range(shards)]
    return [p.clone() for e in range(value.shape[0])
            for p in value[e:e + 1].chunk(shards, dim=1)]

"""Geometry of the experts of each RMoE layer in a checkpoint: do they cluster around the core?

Expert e of a layer is the vector of all its projections' weights and biases,
``W_e = C + R_e``. Everything here follows from the Gram matrix of the residuals
(``K[e, f] = <R_e, R_f>``), formed one projection at a time: norms ``||R_e|| / ||C||``, distances
``||W_e - W_f|| = ||R_e - R_f||`` and a 2-D PCA of the points ``{C, W_1, ..., W_E}`` (translated
by ``-C``, which changes no distance, so the core's large norm never enters a subtraction).
"""
import json
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch

from ..engine.convert import factor_moe_experts
from ..fileio import atomic_write

StateDict = Dict[str, torch.Tensor]
_CORE0 = re.compile(r'^(?P<layer>.+)\.moe\.experts\.core_weights\.0$')
_KINDS = ('core_weights', 'core_biases', 'residual_weights', 'residual_biases')
OUTPUT_FILES = dict(json='expert_weights.json', residual_norms='residual_norms.png',
                    distances='expert_distances.png', pca='expert_pca.png')


def find_rmoe_layers(state_dict: StateDict) -> Dict[str, Dict[str, List[torch.Tensor]]]:
    """The RMoE layers of a state dict, found by their ``*.moe.experts.core_weights.0`` keys.

    Returns:
        dict: layer name (e.g. ``backbone.stages.2.blocks.1.ffn``) to its tensors,
        ``{kind: [projection 0, projection 1, ...]}`` for the four kinds of ``_KINDS``.

    Raises:
        ValueError: a layer misses a tensor or its residuals do not fit its core.
    """
    layers = OrderedDict()
    for key in state_dict:
        match = _CORE0.match(key)
        if match:
            layers[match['layer']] = _layer_tensors(state_dict, match['layer'])
    return layers


def _layer_tensors(state_dict: StateDict, layer: str) -> Dict[str, List[torch.Tensor]]:
    prefix = f'{layer}.moe.experts.'
    count = sum(1 for k in state_dict if re.fullmatch(re.escape(prefix) + r'core_weights\.\d+', k))
    tensors = {}
    for kind in _KINDS:
        keys = [f'{prefix}{kind}.{i}' for i in range(count)]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f'RMoE layer {layer!r} has no {missing[0]!r}')
        tensors[kind] = [state_dict[k].float() for k in keys]
    for i in range(count):
        for core, residual in (('core_weights', 'residual_weights'),
                               ('core_biases', 'residual_biases')):
            c, r = tensors[core][i], tensors[residual][i]
            if r.dim() != c.dim() + 1 or r.shape[1:] != c.shape:
                raise ValueError(f'RMoE layer {layer!r}: {residual}.{i} of shape '
                                 f'{tuple(r.shape)} does not fit {core}.{i} of shape '
                                 f'{tuple(c.shape)}')
    return tensors


def residual_gram(tensors: Dict[str, List[torch.Tensor]]) -> torch.Tensor:
    """``K[e, f] = <R_e, R_f>`` over every projection's weight and bias, float64, (E, E)."""
    gram = 0
    for residual in [*tensors['residual_weights'], *tensors['residual_biases']]:
        flat = residual.reshape(residual.shape[0], -1)
        gram = gram + (flat @ flat.T).double()
    return gram


def core_norm(tensors: Dict[str, List[torch.Tensor]]) -> float:
    """``||C||`` over every projection's weight and bias."""
    return math.sqrt(sum(float(t.double().square().sum())
                         for t in [*tensors['core_weights'], *tensors['core_biases']]))


def pca_2d(gram: torch.Tensor) -> Dict[str, object]:
    """2-D PCA of the core (the origin) and the experts (``R_e``), from the residual Gram.

    The points are centred on their mean; classical MDS of the centred Gram matrix gives
    the same coordinates as PCA of the points, without forming the (E+1) x P matrix.

    Returns:
        dict: ``core`` [x, y], ``experts`` [[x, y]] * E, ``explained_variance_ratio`` [2].
    """
    num_experts = gram.shape[0]
    points = torch.zeros(num_experts + 1, num_experts + 1, dtype=torch.float64)
    points[1:, 1:] = gram  # row/column 0: the core, at the origin
    centre = torch.eye(num_experts + 1, dtype=torch.float64) - 1.0 / (num_experts + 1)
    values, vectors = torch.linalg.eigh(centre @ points @ centre)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    coords = vectors[:, :2] * values[:2].sqrt()  # E + 1 >= 2 points, so two axes exist
    total = float(values.sum())
    ratio = [float(v) / total if total > 0 else 0.0 for v in values[:2]]
    return dict(core=coords[0].tolist(), experts=coords[1:].tolist(),
                explained_variance_ratio=ratio)


def layer_geometry(tensors: Dict[str, List[torch.Tensor]]) -> Dict[str, object]:
    """Norms, distances and PCA of one RMoE layer's experts (see the module docstring)."""
    gram = residual_gram(tensors)
    norm_c = core_norm(tensors)
    sq = gram.diagonal()
    distances = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt()
    distances.fill_diagonal_(0)
    scale = norm_c if norm_c > 0 else float('nan')
    return dict(
        num_experts=gram.shape[0],
        core_norm=norm_c,
        residual_norm=sq.sqrt().tolist(),
        relative_residual_norm=(sq.sqrt() / scale).tolist(),
        distances=distances.tolist(),
        relative_distances=(distances / scale).tolist(),
        pca=pca_2d(gram))


def analyze_state_dict(state_dict: StateDict) -> Dict[str, Dict[str, object]]:
    """:func:`layer_geometry` of every RMoE layer of ``state_dict``, by layer name. Stacked
    MoE experts (a converted Swin-MoE's) are first factored as ``RMoEFFN`` loads them: core =
    their mean, residual = each expert minus it.

    Raises:
        ValueError: the state dict holds no RMoE layer.
    """
    layers = find_rmoe_layers(factor_moe_experts(state_dict))
    if not layers:
        raise ValueError('no RMoE layer (no *.moe.experts.core_weights.0 or '
                         '*.moe.experts.weights.0 key) in the state dict')
    return OrderedDict((name, layer_geometry(t)) for name, t in layers.items())


def _short(layer: str) -> str:
    return layer[len('backbone.'):] if layer.startswith('backbone.') else layer


def _figure(num_panels: int, width: float = 3.0, height: float = 2.6):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = min(num_panels, 4)
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[num_panels:]:
        ax.axis('off')
    return plt, fig, list(axes.flat)


def plot_residual_norms(results: Dict[str, dict], path: str) -> None:
    """Bars of ``||R_e|| / ||C||`` per expert, one panel per layer."""
    plt, fig, axes = _figure(len(results))
    for ax, (layer, r) in zip(axes, results.items()):
        ax.bar(range(r['num_experts']), r['relative_residual_norm'], color='tab:blue')
        ax.set_title(_short(layer), fontsize=8)
        ax.set_xlabel('expert', fontsize=8)
        ax.set_ylabel('||R_e|| / ||C||', fontsize=8)
        ax.set_xticks(range(r['num_experts']))
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=80)
    plt.close(fig)


def plot_distances(results: Dict[str, dict], path: str) -> None:
    """Heat maps of ``||W_e - W_f|| / ||C||``, one panel per layer."""
    plt, fig, axes = _figure(len(results), width=3.2)
    for ax, (layer, r) in zip(axes, results.items()):
        image = ax.imshow(np.asarray(r['relative_distances']), cmap='viridis')
        ax.set_title(_short(layer), fontsize=8)
        ax.set_xlabel('expert', fontsize=8)
        ax.set_ylabel('expert', fontsize=8)
        ax.set_xticks(range(r['num_experts']))
        ax.set_yticks(range(r['num_experts']))
        ax.tick_params(labelsize=7)
        cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label('||W_e - W_f|| / ||C||', fontsize=7)
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=80)
    plt.close(fig)


def plot_pca(results: Dict[str, dict], path: str) -> None:
    """The experts (dots, numbered) and the core (star) on the first two principal axes."""
    plt, fig, axes = _figure(len(results))
    for ax, (layer, r) in zip(axes, results.items()):
        pca = r['pca']
        experts = np.asarray(pca['experts'])
        ax.scatter(experts[:, 0], experts[:, 1], s=18, color='tab:blue', label='experts')
        for e, (x, y) in enumerate(experts):
            ax.annotate(str(e), (x, y), fontsize=6, xytext=(2, 2), textcoords='offset points')
        ax.scatter(*pca['core'], marker='*', s=90, color='tab:red', label='core')
        ax.set_aspect('equal', adjustable='datalim')
        ratio = pca['explained_variance_ratio']
        ax.set_xlabel(f'PC1 ({ratio[0]:.0%})', fontsize=8)
        ax.set_ylabel(f'PC2 ({ratio[1]:.0%})', fontsize=8)
        ax.set_title(_short(layer), fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=80)
    plt.close(fig)


def write_analysis(results: Dict[str, dict], out_dir: str) -> Dict[str, str]:
    """The JSON file and the three plots of :func:`analyze_state_dict`'s results.

    Returns:
        dict: kind to written path (``json``, ``residual_norms``, ``distances``, ``pca``).
    """
    paths = {kind: os.path.join(out_dir, name) for kind, name in OUTPUT_FILES.items()}
    with atomic_write(paths['json']) as f:
        json.dump(results, f, indent=1)
    plot_residual_norms(results, paths['residual_norms'])
    plot_distances(results, paths['distances'])
    plot_pca(results, paths['pca'])
    return paths

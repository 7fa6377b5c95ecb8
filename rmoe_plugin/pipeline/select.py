"""Choosing which FFNs become MoE: a first-order estimate of what splitting each one gains.

If the tokens (here: images) of a batch could each move an FFN's weights their own way, one
gradient step of size lr would lower the loss by about ``lr * mean_i |g_i|^2``; a single dense
FFN only by ``lr * |mean_i g_i|^2``. The difference, the trace of the per-sample gradient
covariance, is what experts can win over the dense layer to first order. FFNs whose samples
pull their weights in the most different directions are split first.
"""
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..backbones.moe_conversion import find_ffns, group_sites

BlockId = Tuple[int, int]


def gradient_variance(sample_losses: Callable[[int], torch.Tensor], num_samples: int,
                      groups: Dict[BlockId, List[nn.Parameter]]) -> Dict[BlockId, float]:
    """``mean_i |g_i|^2 - |mean_i g_i|^2`` of each parameter group, over ``num_samples``.

    Args:
        sample_losses: the loss of sample ``i`` (a scalar with a graph to the parameters).
        num_samples: how many samples to average over.
        groups: the parameters of each candidate.
    """
    params = [p for ps in groups.values() for p in ps]
    sizes = [sum(p.numel() for p in ps) for ps in groups.values()]
    sum_sq = torch.zeros(len(groups), dtype=torch.float64)
    total = torch.zeros(sum(sizes), dtype=torch.float64)
    for i in range(num_samples):
        grads = torch.autograd.grad(sample_losses(i), params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                          for g, p in zip(grads, params)])
        total += flat
        sum_sq += torch.stack([c.square().sum() for c in flat.split(sizes)])
    mean_sq = (total / num_samples).split(sizes)
    return {key: float(sum_sq[j] / num_samples - mean_sq[j].square().sum())
            for j, key in enumerate(groups)}


def ffn_groups(backbone: nn.Module) -> Dict[BlockId, List[nn.Parameter]]:
    """The parameters of every FFN of ``backbone``, keyed by (block list, block) as
    ``moe_blocks`` counts them (a Swin or CvT stage, the layers of a ViT)."""
    sites = [site for site, _ in find_ffns(backbone)]
    lists = list(group_sites(sites))
    return {(lists.index(site.group), site.index):
            list(backbone.get_submodule(site.path).parameters()) for site in sites}


def block_list_depths(backbone: nn.Module) -> List[int]:
    """Blocks per block list of ``backbone`` (the lengths ``moe_blocks`` refers to)."""
    return [max(s.index for s in group) + 1
            for group in group_sites([site for site, _ in find_ffns(backbone)]).values()]


def choose_blocks(scores: Dict[BlockId, float], num_blocks: int,
                  depths: Sequence[int]) -> List[List[int]]:
    """The ``num_blocks`` best-scoring blocks, as ``moe_blocks`` (indices per stage)."""
    if not 1 <= num_blocks <= len(scores):
        raise ValueError(f'num_blocks must be in 1..{len(scores)}, got {num_blocks}')
    best = sorted(scores, key=scores.get, reverse=True)[:num_blocks]
    return [sorted(b for s, b in best if s == stage) for stage in range(len(depths))]


def score_model(model: nn.Module, batches, max_samples: int) -> Dict[BlockId, float]:
    """Score every FFN of a segmentor's/detector's backbone on up to ``max_samples`` images.

    ``batches`` yields dataloader batches; each image's task loss (no MoE loss) is one sample.
    SyncBN layers must have been reverted to BN (``revert_sync_batchnorm``).
    """
    samples = []
    for batch in batches:
        data = model.data_preprocessor(batch, True)
        for i in range(len(data['data_samples'])):
            samples.append((data['inputs'][i:i + 1], [data['data_samples'][i]]))
            if len(samples) == max_samples:
                break
        if len(samples) == max_samples:
            break
    # Eval mode: batch norm on running statistics (a single image per sample) and no
    # stochastic depth, so each sample's gradient is its own and deterministic.
    model.eval()

    def sample_loss(i: int) -> torch.Tensor:
        losses = model.loss(*samples[i])
        return sum(v for k, v in losses.items() if 'loss' in k and not k.startswith('loss_moe')
                   for v in ([v] if isinstance(v, torch.Tensor) else v))

    return gradient_variance(sample_loss, len(samples), ffn_groups(model.backbone))

"""Gathering the side-channel losses of every MoE layer inside a model."""
from collections import defaultdict
from typing import Dict

import torch
from torch import nn

from .layer import MoEFeedForward


def collect_moe_losses(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Balance losses of the last training forward of every MoE layer in ``module``.

    Losses of the same kind are summed over layers (as Swin-MoE sums its aux losses), under
    their ``loss_moe_*`` keys, so mmengine's ``parse_losses`` optimises and logs them.
    """
    totals: Dict[str, torch.Tensor] = defaultdict(lambda: 0)
    for layer in module.modules():
        if isinstance(layer, MoEFeedForward):
            for key, value in layer.last_losses.items():
                totals[key] = totals[key] + value
    return dict(totals)

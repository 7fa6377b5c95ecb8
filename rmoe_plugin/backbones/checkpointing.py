"""Activation checkpointing of the blocks that hold RMoE layers, without re-entry.

The OpenMMLab transformer blocks (mmseg's ViT, BEiT and Swin blocks, mmdet's Swin block,
mmpretrain's ViT and BEiT layers) checkpoint with ``torch.utils.checkpoint``'s re-entrant
variant when ``with_cp=True``. Its first forward runs without grad, so what an RMoE layer keeps
on the side, its balance loss, would get no gradient. A block made with
:class:`CheckpointWithoutReentryMixin` in front frees and recomputes the same activations
without re-entry, and keeps its ``with_cp`` flag, so the upstream argument still switches it.
"""
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointWithoutReentryMixin:
    """A block whose ``with_cp`` checkpoints it without re-entry.

    While ``with_cp`` is on and grad is enabled, the block's own forward runs inside
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` with its flag off for that
    call, so it does not checkpoint a second time. The RNG state is preserved, so dropout and
    drop path recompute what they did. Under ``torch.compile`` the block is not checkpointed.
    """

    def forward(self, *args, **kwargs):
        if not (self.with_cp and torch.is_grad_enabled()):
            return super().forward(*args, **kwargs)
        if torch.compiler.is_compiling():
            # torch.compile's checkpoint operator takes no side effects, and an RMoE layer
            # keeps its losses on the side: compiled, the block runs unchecked, in the graph.
            return self._forward_without_cp(*args, **kwargs)
        return checkpoint(self._forward_without_cp, *args, use_reentrant=False, **kwargs)

    def _forward_without_cp(self, *args, **kwargs):
        self.with_cp = False
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.with_cp = True


def checkpointing_module(backbone: nn.Module, path: str) -> Optional[str]:
    """The path of the module that checkpoints the one at ``path``: its nearest ancestor
    below ``backbone`` with a ``with_cp`` flag (None where there is none)."""
    parts = path.split('.')
    for i in reversed(range(1, len(parts))):
        ancestor = '.'.join(parts[:i])
        if isinstance(getattr(backbone.get_submodule(ancestor), 'with_cp', None), bool):
            return ancestor
    return None

"""Experts as stacked parameters: ``W_e = W_core + R_e`` for every projection."""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .grouped_linear import residual_grouped_linear


class ResidualExperts(nn.Module):
    """E feed-forward experts sharing a core: expert e's projection i is ``core_i + residual_i[e]``.

    Parameters follow ``nn.Linear``'s (out, in) layout so a dense FFN's weights are the core as
    they are. Experts are single stacked tensors, so an expert that receives no token still
    takes part in the graph and DDP never sees an unused parameter. Nothing derived from the
    parameters is kept between forwards, so every forward sees the weights as they are now,
    however they were changed.

    Args:
        widths (Sequence[int]): widths through the FFN, e.g. ``(D, H, D)`` for two projections.
        num_experts (int): E.
        activation (Callable[[], nn.Module]): builds the activation applied after every
            projection but the last.
        dropout (float): dropout after each activation and after the last projection.
        residual_init_std (float): std of the normal noise the residuals start from (zero mean);
            0 makes every expert equal to the core. Default: 0.
        freeze_core (bool): keep the core fixed and train only the residuals. Default: False.
    """

    def __init__(self, widths: Sequence[int], num_experts: int,
                 activation: Callable[[], nn.Module] = nn.GELU, dropout: float = 0.0,
                 residual_init_std: float = 0.0, freeze_core: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.residual_init_std = residual_init_std
        shapes = list(zip(widths[1:], widths[:-1]))
        self.core_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(o, i)) for o, i in shapes])
        self.core_biases = nn.ParameterList([nn.Parameter(torch.empty(o)) for o, _ in shapes])
        self.residual_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts, o, i)) for o, i in shapes])
        self.residual_biases = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts, o)) for o, _ in shapes])
        self.activations = nn.ModuleList([activation() for _ in shapes[:-1]])
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()
        self.freeze_core(freeze_core)

    @property
    def num_projections(self) -> int:
        return len(self.core_weights)

    def reset_parameters(self) -> None:
        """Core like a freshly initialised ViT linear layer; residuals from zero plus noise."""
        for w, b in zip(self.core_weights, self.core_biases):
            nn.init.trunc_normal_(w, std=0.02)
            nn.init.zeros_(b)
        self.reset_residuals()

    def reset_residuals(self) -> None:
        for p in [*self.residual_weights, *self.residual_biases]:
            if self.residual_init_std > 0:
                nn.init.normal_(p, std=self.residual_init_std)
            else:
                nn.init.zeros_(p)

    def freeze_core(self, frozen: bool = True) -> None:
        for p in [*self.core_weights, *self.core_biases]:
            p.requires_grad_(not frozen)

    @torch.no_grad()
    def load_core(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> None:
        """Copy a dense FFN's projections into the core (residuals untouched)."""
        for dst, src in zip([*self.core_weights, *self.core_biases], [*weights, *biases]):
            if dst.shape != src.shape:
                raise ValueError(f'dense projection of shape {tuple(src.shape)} does not fit '
                                 f'the core of shape {tuple(dst.shape)}')
            dst.copy_(src)

    def expert_weights(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full weight (E, out, in) and bias (E, out) of projection ``i`` for every expert."""
        return (self.core_weights[i] + self.residual_weights[i],
                self.core_biases[i] + self.residual_biases[i])

    @torch.no_grad()
    def mean_expert(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Weights and biases of the average expert, ``core + mean_e R_e``, per projection."""
        pairs = [self.expert_weights(i) for i in range(self.num_projections)]
        return [w.mean(0) for w, _ in pairs], [b.mean(0) for _, b in pairs]

    def forward(self, x: torch.Tensor, group_end: torch.Tensor, row_expert: torch.Tensor,
                sizes: Optional[torch.Tensor] = None, backend: str = 'grouped_mm') -> torch.Tensor:
        """Run every row of ``x`` through its expert; rows come grouped by expert.

        Args:
            x (Tensor): shape (N, D), in the dtype to compute in.
            group_end (Tensor): int32 end of each expert's rows, shape (E,).
            row_expert (Tensor): expert of each row, E for a dropped row, shape (N,).
            sizes (Tensor, optional): rows per expert and the dropped rows, shape (E + 1,),
                on the host (the ``'loop'`` backend only).
            backend (str): ``'grouped_mm'`` or ``'loop'`` (see :mod:`.grouped_linear`).

        Returns:
            Tensor: shape (N, D); rows past ``group_end[-1]`` are undefined.
        """
        for i in range(self.num_projections):
            x = residual_grouped_linear(
                x, self.core_weights[i], self.residual_weights[i], self.core_biases[i],
                self.residual_biases[i], group_end, row_expert, sizes, backend)
            if i < self.num_projections - 1:
                x = self.activations[i](x)
            x = self.dropout(x)
        return x

"""Experts as stacked parameters: ``W_e = W_core + R_e`` for every projection."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .expert_exchange import (DataParallelExpertGrad, ExpertParallelGroups, gather_expert_rows,
                              rank0_copy)
from .grouped_linear import residual_grouped_linear


class ResidualExperts(nn.Module):
    """E feed-forward experts sharing a core: expert e's projection i is ``core_i + residual_i[e]``.

    Parameters follow ``nn.Linear``'s (out, in) layout so a dense FFN's weights are the core as
    they are. Experts are single stacked tensors, so an expert that receives no token still
    takes part in the graph and DDP never sees an unused parameter. Nothing derived from the
    parameters is kept between forwards, so every forward sees the weights as they are now,
    however they were changed.

    Under expert parallelism (:meth:`shard_`) the residuals hold this rank's E/P experts only;
    the core stays whole. The state dict still holds all E experts (gathered from the group,
    collectively), and loading one takes this rank's share, so checkpoints do not depend on P.

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
        self.parallel: Optional[ExpertParallelGroups] = None
        # Set on the saving rank by gathered_experts(): the full residuals its state dict holds.
        self.full_residuals: Optional[Dict[str, Tensor]] = None
        self._register_state_dict_hook(_state_dict_with_every_expert)
        self.reset_parameters()
        self.freeze_core(freeze_core)

    @property
    def num_projections(self) -> int:
        return len(self.core_weights)

    def named_residuals(self) -> List[Tuple[str, nn.Parameter]]:
        """The per-expert parameters, named as in the state dict (``residual_weights.0``...)."""
        return [(f'{kind}.{i}', p) for kind in ('residual_weights', 'residual_biases')
                for i, p in enumerate(getattr(self, kind))]

    @torch.no_grad()
    def shard_(self, groups: ExpertParallelGroups) -> None:
        """Keep only this rank's experts' residuals (every rank holds the same E before).

        Raises:
            ValueError: the group's size does not divide the number of experts.
        """
        if self.num_experts % groups.size:
            raise ValueError(f'expert_parallel_size={groups.size} must divide num_experts='
                             f'{self.num_experts}')
        local = groups.local_experts(self.num_experts)
        for kind in (self.residual_weights, self.residual_biases):
            for i, p in enumerate(kind):
                kind[i] = nn.Parameter(p[local.start:local.stop].clone(),
                                       requires_grad=p.requires_grad)
        self.parallel = groups

    def reset_parameters(self) -> None:
        """Core like a freshly initialised ViT linear layer; residuals from zero plus noise."""
        for w, b in zip(self.core_weights, self.core_biases):
            nn.init.trunc_normal_(w, std=0.02)
            nn.init.zeros_(b)
        self.reset_residuals()

    @torch.no_grad()
    def reset_residuals(self) -> None:
        """Zero, or zero-mean noise; an expert-parallel rank takes its share of rank 0's draw
        of all E (what data parallelism's broadcast from rank 0 would give it)."""
        for _, p in self.named_residuals():
            if self.residual_init_std <= 0:
                nn.init.zeros_(p)
            elif self.parallel is None:
                nn.init.normal_(p, std=self.residual_init_std)
            else:
                full = p.new_empty(self.num_experts, *p.shape[1:])
                nn.init.normal_(full, std=self.residual_init_std)
                local = self.parallel.local_experts(self.num_experts)
                p.copy_(rank0_copy(full)[local.start:local.stop])

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
        if self.parallel is not None:
            raise RuntimeError('the mean expert of an expert-parallel layer needs every '
                               'expert; compute it from its state dict')
        pairs = [self.expert_weights(i) for i in range(self.num_projections)]
        return [w.mean(0) for w, _ in pairs], [b.mean(0) for _, b in pairs]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, _ in self.named_residuals():
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if value.dim() == 0 or value.shape[0] != self.num_experts:
                raise ValueError(
                    f'{key}: the checkpoint holds {value.shape[0] if value.dim() else 0} '
                    f'experts, this layer {self.num_experts} (num_experts); load a checkpoint '
                    'made with the same number of experts')
            if self.parallel is not None:
                local = self.parallel.local_experts(self.num_experts)
                state_dict[key] = value[local.start:local.stop]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            residual_weight, residual_bias = self.residual_weights[i], self.residual_biases[i]
            if self.parallel is not None:
                residual_weight = DataParallelExpertGrad.apply(residual_weight, self.parallel)
                residual_bias = DataParallelExpertGrad.apply(residual_bias, self.parallel)
            x = residual_grouped_linear(x, self.core_weights[i], residual_weight,
                                        self.core_biases[i], residual_bias, group_end,
                                        row_expert, sizes, backend)
            if i < self.num_projections - 1:
                x = self.activations[i](x)
            x = self.dropout(x)
        return x


def _state_dict_with_every_expert(module: ResidualExperts, state_dict, prefix, local_metadata):
    """State-dict hook: all E experts' residuals, whatever share of them this rank holds."""
    if module.parallel is None:
        return
    for name, p in module.named_residuals():
        if module.full_residuals is not None:
            state_dict[prefix + name] = module.full_residuals[name]
        else:
            state_dict[prefix + name] = gather_expert_rows(p.detach(), module.parallel)

"""Top-k routers: fp32 logits (a linear or a cosine gate), optional training noise, softmax
gates."""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_TYPES = ('linear', 'cosine')


class Routing(NamedTuple):
    """What a router decided for a group of S tokens over E experts.

    Attributes:
        logits (Tensor): fp32 router logits (noise included), shape (S, E).
        probs (Tensor): softmax of ``logits``, shape (S, E).
        expert_index (Tensor): the chosen experts, best first, shape (S, k).
        gates (Tensor): ``probs`` at ``expert_index``, shape (S, k).
    """
    logits: torch.Tensor
    probs: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor


class Router(nn.Module):
    """Top-k selection over fp32 logits, with optional training noise; subclasses give the
    noise-free logits (:meth:`router_logits`).

    Args:
        num_experts (int): number of experts E.
        top_k (int): experts chosen per token.
        noise_std (float): std of Gaussian noise added to the logits in training
            (V-MoE and Tutel use 1/E). 0 disables it. Default: 0.
    """

    def __init__(self, num_experts: int, top_k: int = 1, noise_std: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Noise-free logits of fp32 ``tokens`` (S, D), shape (S, E)."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor,
                noise: Optional[torch.Tensor] = None) -> Routing:
        # Routing decisions are brittle under fp16/bf16, so the router never autocasts.
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = self.router_logits(tokens.float())
        if self.training and self.noise_std > 0:
            if noise is None:
                noise = torch.randn_like(logits)
            logits = logits + noise * self.noise_std
        probs = logits.softmax(dim=-1)
        if self.top_k == 1:  # max is several times cheaper than topk on the CPU
            gates, expert_index = probs.max(dim=-1, keepdim=True)
        else:
            gates, expert_index = probs.topk(self.top_k, dim=-1)
        return Routing(logits, probs, expert_index, gates)


class TopKRouter(Router):
    """Linear router without bias, computed in fp32 whatever the input dtype.

    Args:
        embed_dims (int): token width D.
        num_experts (int): number of experts E.
        top_k (int): experts chosen per token.
        noise_std (float): std of Gaussian noise added to the logits in training
            (V-MoE uses 1/E). 0 disables it. Default: 0.
        init_std (float): std of the normal init of the router weight. Default: 0.02.
    """

    def __init__(self, embed_dims: int, num_experts: int, top_k: int = 1,
                 noise_std: float = 0.0, init_std: float = 0.02):
        super().__init__(num_experts, top_k, noise_std)
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, embed_dims))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.float())

    def flops_per_token(self) -> int:
        return self.weight.numel()


class CosineTopKRouter(Router):
    """Cosine router of Swin-MoE (Tutel's ``cosine_top`` gate), in fp32.

    ``logits = normalize(projector(x)) @ normalize(sim_matrix, dim=0) * exp(min(t, ln 100))``:
    tokens and experts meet as unit vectors in a ``proj_dims``-wide space, at a learnt
    temperature ``t`` capped so that logits stay within +-100.

    Args:
        embed_dims (int): token width D.
        num_experts (int): number of experts E.
        top_k (int): experts chosen per token.
        noise_std (float): std of Gaussian noise added to the logits in training. Default: 0.
        proj_dims (int): width of the projected space. Default: 256.
        init_temperature (float): initial ``1 / exp(t)``, Swin-MoE's ``cosine_router_init_t``.
            Default: 0.5.
        init_std (float): std of the normal init of the projector weight. Default: 0.02.
    """
    max_log_scale = math.log(100.0)

    def __init__(self, embed_dims: int, num_experts: int, top_k: int = 1,
                 noise_std: float = 0.0, proj_dims: int = 256, init_temperature: float = 0.5,
                 init_std: float = 0.02):
        super().__init__(num_experts, top_k, noise_std)
        self.init_std = init_std
        self.init_temperature = init_temperature
        self.temperature = nn.Parameter(torch.empty(1))
        self.projector = nn.Linear(embed_dims, proj_dims)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dims, num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.temperature.fill_(math.log(1.0 / self.init_temperature))
        nn.init.trunc_normal_(self.projector.weight, std=self.init_std)
        nn.init.zeros_(self.projector.bias)
        nn.init.normal_(self.sim_matrix, std=0.01)

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        projected = F.linear(tokens, self.projector.weight.float(), self.projector.bias.float())
        cosine = F.normalize(projected, dim=1) @ F.normalize(self.sim_matrix.float(), dim=0)
        return cosine * self.temperature.float().clamp(max=self.max_log_scale).exp()

    def flops_per_token(self) -> int:
        return self.projector.weight.numel() + self.sim_matrix.numel()


def build_router(router_type: str, embed_dims: int, num_experts: int, top_k: int,
                 noise_std: float, **cosine_args) -> Router:
    """A ``'linear'`` (:class:`TopKRouter`) or ``'cosine'`` (:class:`CosineTopKRouter`)
    router; ``cosine_args`` (``proj_dims``, ``init_temperature``) go to the cosine one."""
    if router_type == 'cosine':
        return CosineTopKRouter(embed_dims, num_experts, top_k, noise_std, **cosine_args)
    return TopKRouter(embed_dims, num_experts, top_k, noise_std=noise_std)

"""Top-k router: fp32 logits, optional training noise, softmax gates."""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


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


class TopKRouter(nn.Module):
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
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, embed_dims))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, tokens: torch.Tensor,
                noise: Optional[torch.Tensor] = None) -> Routing:
        # Routing decisions are brittle under fp16/bf16, so the router never autocasts.
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.weight.float())
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

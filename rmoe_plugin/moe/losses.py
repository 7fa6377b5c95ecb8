"""Balance losses as pure functions of the router's outputs for one routing group."""
import torch

from .dispatch import histogram


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, ``(std(x) / mean(x))^2`` (population std)."""
    mean = x.mean()
    return x.var(unbiased=False) / (mean * mean + 1e-10)


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Importance CV^2 (Shazeer et al.; V-MoE; the RMoE paper): 0 when every expert
    receives the same total router probability.

    Args:
        probs (Tensor): router probabilities, shape (S, E).
    """
    return cv_squared(probs.sum(dim=0))


def switch_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch / GShard load balancing, ``E * sum_e f_e * P_e``: 1 at uniform routing.

    ``f_e`` is the share of tokens whose first choice is e (no gradient), ``P_e`` the mean
    router probability of e.

    Args:
        probs (Tensor): router probabilities, shape (S, E).
        expert_index (Tensor): chosen experts, best first, shape (S, k).
    """
    num_tokens, num_experts = probs.shape
    top1 = histogram(expert_index[:, 0], num_experts)
    fraction = top1.to(probs.dtype) / num_tokens
    return num_experts * torch.dot(fraction, probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(logits, dim=-1).square().mean()

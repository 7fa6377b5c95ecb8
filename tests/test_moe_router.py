"""Swin-MoE's routing as options of the layer: the cosine router, Tutel's noise and the
gate-weighted output, against the definitions of Swin-MoE and Tutel."""
import math

import pytest
import torch
import torch.nn.functional as F

from rmoe_plugin.moe import CosineTopKRouter, MoEFeedForward
from test_moe_layer import assert_matches_reference


def cosine_layer(**kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=8, feedforward_channels=16, num_experts=4, residual_init_std=0.1,
                router_type='cosine', cosine_router_dims=6, straight_through=False)
    args.update(kwargs)
    return MoEFeedForward(**args)


def tutel_cosine_logits(x, router):
    """Tutel's cosine gate: unit projected tokens against unit expert columns, scaled by
    exp(temperature) with the temperature capped at ln(1 / 0.01)."""
    projected = F.normalize(x @ router.projector.weight.T + router.projector.bias, dim=1)
    scale = torch.clamp(router.temperature, max=math.log(1 / 0.01)).exp()
    return projected @ F.normalize(router.sim_matrix, dim=0) * scale


@pytest.mark.parametrize('temperature', [math.log(2.0), 6.0])  # below and above the cap
def test_cosine_router_logits_follow_tutels_definition(temperature):
    router = cosine_layer().router
    assert isinstance(router, CosineTopKRouter)
    with torch.no_grad():
        router.temperature.fill_(temperature)
    x = torch.randn(9, 8)
    routing = router.eval()(x)
    torch.testing.assert_close(routing.logits, tutel_cosine_logits(x, router))
    assert routing.logits.abs().max() <= 100.0 + 1e-4  # |cosine| <= 1 times at most 100
    torch.testing.assert_close(routing.gates[:, 0], routing.logits.softmax(-1).max(-1).values)


def test_cosine_router_starts_at_swin_moes_initial_temperature_and_stays_fp32():
    layer = cosine_layer(cosine_router_init_temperature=0.25)
    assert layer.router.temperature.item() == pytest.approx(math.log(4.0))
    assert layer.router.sim_matrix.shape == (6, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        routing = layer.router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert routing.logits.dtype == torch.float32
    keys = set(layer.state_dict())
    assert {'router.temperature', 'router.projector.weight', 'router.projector.bias',
            'router.sim_matrix'} <= keys and 'router.weight' not in keys


@pytest.mark.parametrize('top_k,normalize', [(1, False), (2, True)])
def test_gate_weighted_output_with_the_cosine_router_matches_per_token_reference(top_k,
                                                                                 normalize):
    layer = cosine_layer(top_k=top_k, normalize_gates=normalize, capacity_factor=1.0)
    assert_matches_reference(layer, torch.randn(2, 7, 8, requires_grad=True))


def test_gate_weighted_top1_scales_the_expert_output_by_its_gate():
    layer = cosine_layer(capacity_factor=None, residual_init_std=0.0)
    x = torch.randn(20, 8)
    routing = layer.router(x)
    core = layer.experts
    dense = F.linear(F.gelu(F.linear(x, core.core_weights[0], core.core_biases[0])),
                     core.core_weights[1], core.core_biases[1])
    torch.testing.assert_close(layer(x), routing.gates * dense)


@pytest.mark.parametrize('router_type', ['linear', 'cosine'])
def test_gate_noise_is_tutels_normal_noise_over_the_expert_count(router_type):
    layer = cosine_layer(router_type=router_type, gate_noise=2.0, num_experts=8)
    assert layer.router.noise_std == pytest.approx(2.0 / 8)
    x = torch.randn(20000, 8)
    clean = layer.router.eval()(x).logits
    torch.manual_seed(1)
    noisy = layer.router.train()(x).logits
    assert (noisy - clean).std().item() == pytest.approx(0.25, rel=0.02)
    assert (noisy - clean).mean().abs().item() < 0.01


@pytest.mark.parametrize('kwargs,names', [
    (dict(router_type='softmax'), ['router_type']),
    (dict(router_noise_std=0.1, gate_noise=1.0), ['router_noise_std', 'gate_noise']),
    (dict(gate_noise=-1.0), ['gate_noise']),
])
def test_bad_router_arguments_are_named(kwargs, names):
    with pytest.raises(ValueError) as error:
        cosine_layer(**kwargs)
    assert all(name in str(error.value) for name in names)

import math

import pytest
import torch
import torch.nn.functional as F

from rmoe_plugin.moe import (MoEFeedForward, importance_loss, router_z_loss,
                             switch_balance_loss)


def reference_forward(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token MoE: each token runs through each chosen expert that has a slot left."""
    tokens = x.reshape(-1, layer.embed_dims)
    num_tokens, num_experts, k = tokens.shape[0], layer.num_experts, layer.top_k
    routing = layer.router(tokens)
    factor = layer.current_capacity_factor()
    capacity = math.inf if factor is None else k * math.ceil(factor * num_tokens / num_experts)
    if layer.batch_prioritized:
        order = sorted(range(num_tokens), key=lambda s: -routing.gates[s, 0].item())
    else:
        order = list(range(num_tokens))
    used = [0] * num_experts
    kept = set()
    for choice in range(k):
        for s in order:
            e = routing.expert_index[s, choice].item()
            if used[e] < capacity:
                used[e] += 1
                kept.add((s, choice))
    experts = layer.experts
    rows = []
    for s in range(num_tokens):
        y = torch.zeros(layer.embed_dims)
        for choice in range(k):
            if (s, choice) not in kept:
                continue
            e = routing.expert_index[s, choice].item()
            h = tokens[s]
            for i in range(experts.num_projections):
                w = experts.core_weights[i] + experts.residual_weights[i][e]
                b = experts.core_biases[i] + experts.residual_biases[i][e]
                h = h @ w.T + b
                if i < experts.num_projections - 1:
                    h = F.gelu(h)
            g = routing.gates[s, choice]
            if layer.straight_through:
                weight = g + (1.0 / k - g).detach()
            else:
                weight = g / routing.gates[s].sum() if k > 1 else g
            y = y + weight * h
        rows.append(y)
    return torch.stack(rows).view_as(x)


def make_layer(**kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=8, feedforward_channels=16, num_experts=4, residual_init_std=0.1)
    args.update(kwargs)
    return MoEFeedForward(**args)


def grads(layer, x, out):
    x.grad = None
    layer.zero_grad()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize('backend', ['loop', 'grouped_mm'])
@pytest.mark.parametrize('top_k,capacity_factor,straight_through,batch_prioritized', [
    (1, 1.0, True, True),
    (1, 0.5, False, False),
    (2, 0.75, True, False),
    (2, 1.0, False, True),
    (2, None, True, True),
    (3, 0.5, False, True),
])
def test_output_and_gradients_match_per_token_reference(top_k, capacity_factor,
                                                         straight_through, batch_prioritized,
                                                         backend):
    layer = make_layer(top_k=top_k, capacity_factor=capacity_factor,
                       straight_through=straight_through, batch_prioritized=batch_prioritized,
                       num_fcs=3 if top_k == 3 else 2, expert_backend=backend)
    assert_matches_reference(layer, torch.randn(2, 7, 8, requires_grad=True))


def assert_matches_reference(layer, x):
    """The layer's output and gradients are the per-token reference's."""
    out = layer(x)
    expected = reference_forward(layer, x)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads(layer, x, out), grads(layer, x, expected)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('backend', ['loop', 'grouped_mm'])
def test_capacity_drops_are_counted_and_dropped_tokens_output_zero(backend):
    layer = make_layer(num_experts=2, capacity_factor=0.5, expert_backend=backend)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 2.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(40, 8)
    x[:, 0] = torch.linspace(1, 2, 40)
    out = layer(x)
    assert layer.last_stats['expert_load'].tolist() == [40, 0]
    assert layer.last_stats['tokens_per_expert'].tolist() == [10, 0]
    assert layer.last_stats['drop_fraction'].item() == pytest.approx(0.75)
    # batch-prioritised: the 10 most confident tokens (largest x[0]) keep their slot.
    assert torch.count_nonzero(out.abs().sum(-1)).item() == 10
    assert out[:30].abs().sum().item() == 0


def test_eval_uses_eval_capacity_factor():
    layer = make_layer(capacity_factor=0.25, eval_capacity_factor=None)
    x = torch.randn(64, 8)
    layer.train()(x)
    assert layer.last_stats['drop_fraction'].item() > 0
    layer.eval()(x)
    assert layer.last_stats['drop_fraction'].item() == 0
    assert layer.last_losses == {}


@pytest.mark.parametrize('backend', ['loop', 'grouped_mm'])
def test_every_parameter_gets_a_gradient_when_an_expert_gets_no_token(backend):
    layer = make_layer(capacity_factor=None, importance_loss_weight=0.0,
                       expert_backend=backend)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(5.0)
    x = torch.rand(16, 8) + 0.5
    layer(x).sum().backward()
    assert layer.last_stats['expert_load'][1:].sum().item() == 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
    assert layer.experts.residual_weights[0].grad[1:].abs().sum().item() == 0


def test_straight_through_top1_with_zero_residuals_equals_the_core_ffn():
    layer = make_layer(residual_init_std=0.0, capacity_factor=None)
    x = torch.randn(3, 5, 8)
    core = layer.experts
    dense = F.linear(F.gelu(F.linear(x, core.core_weights[0], core.core_biases[0])),
                     core.core_weights[1], core.core_biases[1])
    torch.testing.assert_close(layer(x), dense)


def test_router_runs_in_fp32_and_output_keeps_input_dtype():
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(10, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert layer.router(x).logits.dtype == torch.float32


def test_router_noise_only_in_training():
    layer = make_layer(router_noise_std=1.0)
    x = torch.randn(10, 8)
    layer.eval()
    assert torch.equal(layer.router(x).logits, layer.router(x).logits)
    layer.train()
    assert not torch.equal(layer.router(x).logits, layer.router(x).logits)


def test_freeze_core_trains_only_residuals_and_router():
    layer = make_layer(freeze_core=True)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert not any('core' in n for n in trainable)
    assert any('residual' in n for n in trainable) and 'router.weight' in trainable


def test_residuals_start_at_zero_unless_noise_is_asked_for():
    assert make_layer(residual_init_std=0.0).experts.residual_weights[0].abs().sum() == 0
    noisy = make_layer(residual_init_std=0.01).experts.residual_weights[0]
    assert 0.005 < noisy.std().item() < 0.02


def test_balance_losses_reach_their_known_minimum_on_uniform_routing():
    num_tokens, num_experts = 12, 4
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    balanced = torch.arange(num_tokens).remainder(num_experts)[:, None]
    assert importance_loss(probs).item() == pytest.approx(0.0, abs=1e-7)
    assert switch_balance_loss(probs, balanced).item() == pytest.approx(1.0)
    logits = torch.zeros(num_tokens, num_experts)
    assert router_z_loss(logits).item() == pytest.approx(math.log(num_experts) ** 2)


def test_balance_losses_grow_with_imbalance():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    top1 = torch.zeros(2, 1, dtype=torch.long)
    assert importance_loss(probs).item() == pytest.approx(((1.7 - 0.3) / 2) ** 2, rel=1e-5)
    assert switch_balance_loss(probs, top1).item() == pytest.approx(2 * 0.85)


def test_layer_reports_weighted_losses_with_nonzero_weight_only():
    layer = make_layer(importance_loss_weight=0.5, balance_loss_weight=0.0, z_loss_weight=0.1)
    x = torch.randn(10, 8)
    layer(x)
    assert set(layer.last_losses) == {'loss_moe_importance', 'loss_moe_zloss'}
    routing = layer.router(x)
    torch.testing.assert_close(layer.last_losses['loss_moe_importance'],
                               0.5 * importance_loss(routing.probs))
    torch.testing.assert_close(layer.last_losses['loss_moe_zloss'],
                               0.1 * router_z_loss(routing.logits))


@pytest.mark.parametrize('kwargs,name', [
    (dict(num_experts=0), 'num_experts'),
    (dict(top_k=5), 'top_k'),
    (dict(top_k=0), 'top_k'),
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(eval_capacity_factor=-1.0), 'eval_capacity_factor'),
    (dict(num_fcs=1), 'num_fcs'),
    (dict(z_loss_weight=-1.0), 'z_loss_weight'),
    (dict(expert_backend='cutlass'), 'expert_backend'),
])
def test_bad_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_layer(**kwargs)


@pytest.mark.parametrize('backend', ['loop', 'grouped_mm'])
@pytest.mark.parametrize('top_k', [1, 2])
def test_an_empty_batch_of_tokens_passes_through(top_k, backend):
    layer = make_layer(top_k=top_k, expert_backend=backend)
    out = layer(torch.randn(2, 0, 8))
    assert out.shape == (2, 0, 8)
    assert layer.last_losses['loss_moe_importance'].item() == 0


def test_a_layer_copies_after_a_training_forward_without_its_last_losses():
    import copy
    layer = make_layer()
    layer(torch.randn(6, 8)).sum().backward()
    twin = copy.deepcopy(layer)
    assert twin.last_losses == {} and twin.last_stats == {} and layer.last_losses
    x = torch.randn(4, 8)
    torch.testing.assert_close(twin(x), layer(x))


@pytest.mark.parametrize('backend', ['loop', 'grouped_mm'])
def test_a_jit_trace_records_the_expert_matmuls(backend):
    # FLOP counters (mmengine's, mmdet's get_flops) count the ops a trace records
    layer = make_layer(capacity_factor=None, expert_backend=backend).eval()
    x = torch.randn(12, 8)
    graph, _ = torch.jit._get_trace_graph(layer, (x,))
    kinds = [node.kind() for node in graph.nodes()]
    assert kinds.count('aten::linear') == 1 + 2 * 4  # the router, 2 projections x 4 experts
    assert 'prim::PythonOp' not in kinds
    torch.testing.assert_close(torch.jit.trace(layer, x, check_trace=False)(x), layer(x))

"""torch.compile of the MoE layer: one graph, no graph break, no recompile when the routing
changes, and the same outputs, balance losses and gradients as eager, with both expert
kernels, in fp32 and under bf16/fp16 autocast, in training and in evaluation."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from rmoe_plugin.moe import MoEFeedForward, plan_dispatch

BACKENDS = ['loop', 'grouped_mm']
AMP = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def make_layer(backend, **kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=8, feedforward_channels=16, num_experts=4, top_k=2,
                capacity_factor=1.0, residual_init_std=0.1, router_noise_std=0.1,
                balance_loss_weight=0.01, z_loss_weight=0.001, expert_backend=backend)
    args.update(kwargs)
    return MoEFeedForward(**args)


def batches(num_tokens=(48, 48, 48), seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n // 2, 8, generator=generator) for n in num_tokens]


def step(module, layer, x, amp, seed, dynamic_tokens=False):
    """Output, balance losses and gradients of one step (the output alone in evaluation)."""
    torch.manual_seed(seed)  # the same router noise for the compiled and the eager step
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(layer.training)
    if dynamic_tokens:
        torch._dynamo.mark_dynamic(x, 1)
    with torch.autocast('cpu', dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = module(x)
    if not layer.training:
        return [out]
    losses = list(layer.last_losses.values())
    (out.float().square().mean() + sum(losses)).backward()
    return [out, *losses, x.grad, *(p.grad for p in layer.parameters())]


def assert_equal_steps(got, want, amp):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if amp is None:
            torch.testing.assert_close(a, b)
        else:  # the same kernels; low-precision rounding may still differ in the last bit
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def compile_and_compare(layer, inputs, amp, dynamic_tokens=False):
    """Each input through the compiled and the eager layer; the compiler's frame counter."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    loads = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, x in enumerate(inputs):
            got = step(compiled, layer, x, amp, seed, dynamic_tokens)
            loads.append(tuple(layer.last_stats['tokens_per_expert'].tolist()))
            assert_equal_steps(got, step(layer, layer, x, amp, seed), amp)
    return counter, loads


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('amp', sorted(AMP))
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_one_graph_for_every_routing_and_the_results_of_eager(backend, amp, training):
    layer = make_layer(backend).train(training)
    counter, loads = compile_and_compare(layer, batches(), AMP[amp])
    assert counter.frame_count == 1  # fullgraph: no graph break; error_on_recompile: none
    assert len(set(loads)) == len(loads), loads  # every step routed differently


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('top_k,capacity_factor', [(1, 1.0), (2, None)])
def test_top1_and_dropless_routing_compile_alike_with_bf16_weights(backend, top_k,
                                                                   capacity_factor):
    layer = make_layer(backend, top_k=top_k, capacity_factor=capacity_factor).bfloat16()
    inputs = [x.bfloat16() for x in batches()]
    counter, loads = compile_and_compare(layer, inputs, torch.bfloat16)
    assert counter.frame_count == 1 and len(set(loads)) == len(loads), loads


@pytest.mark.parametrize('backend', BACKENDS)
def test_token_counts_vary_in_one_graph_with_dynamic_shapes(backend):
    # The capacity, k * ceil(f * S / E), becomes an expression of the symbolic token count.
    layer = make_layer(backend)
    counter, _ = compile_and_compare(layer, batches((24, 40, 58)), None, dynamic_tokens=True)
    assert counter.frame_count == 1


@pytest.mark.parametrize('backend', BACKENDS)
def test_inductor_runs_the_expert_op_and_matches_eager(backend):
    layer = make_layer(backend, router_noise_std=0.0)  # inductor draws its own random numbers
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    for seed, x in enumerate(batches((48, 48))):
        got = step(compiled, layer, x, None, seed)
        assert_equal_steps(got, step(layer, layer, x, None, seed), None)


@pytest.mark.parametrize('backend,capacity', [('loop', 4), ('grouped_mm', None)])
def test_the_expert_ops_pass_torch_library_opcheck(backend, capacity):
    # (the grouped GEMM leaves dropped rows undefined, which opcheck would compare: dropless)
    generator = torch.Generator().manual_seed(0)
    num_experts, dims, hidden, rows = 4, 8, 16, 20

    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    plan = plan_dispatch(torch.randint(0, num_experts, (rows, 1), generator=generator),
                         num_experts, capacity)
    routing = (plan.group_end, plan.row_expert,
               plan.group_sizes() if backend == 'loop' else None, backend)
    x, core, residual = randn(rows, dims), randn(hidden, dims), randn(num_experts, hidden, dims)
    forward = [t.requires_grad_() for t in (x.clone(), core.clone(), residual.clone(),
                                            randn(hidden), randn(num_experts, hidden))]
    torch.library.opcheck(torch.ops.rmoe.residual_grouped_linear, (*forward, *routing))
    backward = (randn(rows, hidden), x, core, residual)  # no second derivative
    torch.library.opcheck(torch.ops.rmoe.residual_grouped_linear_backward,
                          (*backward, *routing))

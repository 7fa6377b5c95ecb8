"""The layer on a CUDA GPU: the grouped GEMM path, no host waits, AMP, torch.compile.

Skipped without CUDA (CI has none); run on the GPU machine, where only torch is installed:
``python -m pytest -m cuda tests/test_moe_cuda.py``.
"""
import pytest
import torch

from rmoe_plugin.moe import MoEFeedForward
from rmoe_plugin.moe.grouped_linear import has_fast_grouped_mm

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def make_layer(backend, **kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=256, feedforward_channels=1024, num_experts=8, top_k=2,
                capacity_factor=1.25, residual_init_std=0.01, expert_backend=backend,
                balance_loss_weight=0.01, z_loss_weight=1e-3)
    args.update(kwargs)
    return MoEFeedForward(**args).cuda()


def train_step(layer, x, dtype):
    layer.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=dtype):
        out = layer(x)
        loss = out.float().square().mean() + sum(layer.last_losses.values())
    loss.backward()
    return [out.float()] + [p.grad.float() for p in layer.parameters()]


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_grouped_gemm_agrees_with_the_per_expert_loop(dtype):
    x = torch.randn(4096, 256, device='cuda')
    results = [train_step(make_layer(backend), x, dtype) for backend in ('grouped_mm', 'loop')]
    for got, want in zip(*results):
        assert relative_error(got, want) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available() or not has_fast_grouped_mm(
    torch.device('cuda'), torch.bfloat16), reason="needs torch's fast grouped GEMM (sm90/sm100)")
def test_a_bf16_training_step_never_waits_for_the_host():
    layer = make_layer('auto')
    x = torch.randn(8192, 256, device='cuda', requires_grad=True)
    train_step(layer, x, torch.bfloat16)  # warm up allocator and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        train_step(layer, x, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_fp16_with_grad_scaler_trains_with_finite_losses():
    layer = make_layer('auto')
    head = torch.nn.Linear(256, 1).cuda()
    optimizer = torch.optim.AdamW([*layer.parameters(), *head.parameters()], lr=1e-3)
    scaler = torch.amp.GradScaler('cuda')
    x, target = torch.randn(2048, 256, device='cuda'), torch.randn(2048, 1, device='cuda')
    losses = []
    for _ in range(10):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.float16):
            out = layer(x)
            assert layer.router(x).logits.dtype == torch.float32
            loss = (head(out).float() - target).square().mean() + sum(
                layer.last_losses.values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize('backend', ['grouped_mm', 'loop'])
def test_compiled_layer_matches_eager_on_the_gpu_and_never_recompiles(backend):
    layer = make_layer(backend)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # routed differently
            x = torch.randn(2048, 256, device='cuda',
                            generator=torch.Generator('cuda').manual_seed(seed))
            eager = train_step(layer, x, torch.bfloat16)
            got = train_step(compiled, x, torch.bfloat16)
            for a, b in zip(got, eager):
                assert relative_error(a, b) < 2e-2

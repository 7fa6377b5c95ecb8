"""The MoE layer's hot path: non-finite tokens stay isolated, no host waits, low precision,
and what the backward keeps alive (torch.compile: test_moe_compile.py)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rmoe_plugin.moe import MoEFeedForward
from rmoe_plugin.utils import PeakMemory

BACKENDS = ['loop', 'grouped_mm']
aten = torch.ops.aten


def make_layer(**kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=8, feedforward_channels=16, num_experts=4, residual_init_std=0.1)
    args.update(kwargs)
    return MoEFeedForward(**args)


def route_all_to_expert_0(layer):
    """Every token prefers expert 0, the more the larger its first feature."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 2.0


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('poisoned', ['kept', 'dropped'])
def test_one_non_finite_token_leaves_every_other_token_finite(backend, top_k, poisoned):
    layer = make_layer(top_k=top_k, capacity_factor=0.5, expert_backend=backend)
    route_all_to_expert_0(layer)
    x = torch.randn(32, 8)
    x[:, 0] = torch.linspace(1, 2, 32)  # batch-prioritised: the last tokens are kept
    bad = 31 if poisoned == 'kept' else 0
    x[bad, 1] = float('inf')
    out = layer(x)
    others = torch.arange(32) != bad
    assert torch.isfinite(out[others]).all()
    assert layer.last_stats['drop_fraction'].item() > 0
    assert out[others][:8].abs().sum() == 0  # dropped tokens output zero, not 0 * inf


@pytest.mark.parametrize('backend', BACKENDS)
def test_a_dropped_token_reads_nothing_of_the_first_kept_row(backend):
    # The kept row 0 holds an overflowing output; the dropped tokens must not touch it.
    layer = make_layer(num_experts=2, capacity_factor=0.5, expert_backend=backend)
    route_all_to_expert_0(layer)
    x = torch.randn(16, 8)
    x[:, 0] = torch.linspace(1, 2, 16)
    x[-1, 2] = 1e36  # the most confident token, in row 0: its expert output overflows
    with torch.no_grad():
        layer.experts.core_weights[0][:, 2] = 1e4
    out = layer(x)
    assert not torch.isfinite(out[-1]).all()
    assert torch.isfinite(out[:-1]).all() and out[:12].abs().sum() == 0


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for a device: reading a value (``.item()``)
    and ops whose output size depends on the data."""
    SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default,
               aten.masked_select.default, aten.bincount.default, aten.unique_dim.default,
               aten._unique2.default, aten.repeat_interleave.Tensor}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is aten.index.Tensor and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if func in self.SYNCING or boolean_index:
            self.ops.append(func.__name__)
        return func(*args, **kwargs)


class HostTransfers(TorchFunctionMode):
    """Counts what brings a tensor's values to the host in the layer's own code: reads
    (``tolist``, ``numpy``, ``item``, ``int()``, ``bool()``, which bypass the dispatcher) and
    copies to the CPU (``cpu()``, ``to('cpu')``), counted on the CPU too, where they cost
    nothing. A custom op's body is as opaque to it as to torch.compile: the loop's expert op
    reads the group sizes that the layer copied to the host."""
    READS = {'tolist', 'numpy', 'item', '__int__', '__index__', '__bool__', '__float__', 'cpu'}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        to_cpu = name == 'to' and 'cpu' in map(str, [*args[1:], kwargs.get('device')])
        if name in self.READS or to_cpu:
            self.calls.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize('backend,transfers', [('grouped_mm', []), ('loop', ['cpu'])])
@pytest.mark.parametrize('top_k,capacity_factor', [(1, 1.0), (2, 1.25), (2, None)])
def test_host_synchronisations_per_training_step(backend, transfers, top_k, capacity_factor):
    layer = make_layer(top_k=top_k, capacity_factor=capacity_factor, expert_backend=backend,
                       importance_loss_weight=0.01, balance_loss_weight=0.01,
                       z_loss_weight=0.001, router_noise_std=0.1)
    x = torch.randn(4, 16, 8, requires_grad=True)
    with HostSyncCounter() as counter, HostTransfers() as host:
        out = layer(x)
        loss = out.square().mean() + sum(layer.last_losses.values())
        loss.backward()
    assert counter.ops == [] and host.calls == transfers, (counter.ops, host.calls)
    assert layer.router.weight.grad.abs().sum() > 0


def test_the_counters_see_the_syncs_they_are_meant_to_catch():
    t = torch.tensor([0, 2, 1])
    with HostSyncCounter() as counter, HostTransfers() as host:
        t.tolist()
        t[1].item()
        t[t > 0]
        torch.bincount(t)
        t.nonzero()
        t.cpu()
        t.to(device='cpu')
        int(t[0])
    assert counter.ops == ['_local_scalar_dense.default', 'index.Tensor', 'bincount.default',
                           'nonzero.default', '_local_scalar_dense.default']
    assert host.calls == ['tolist', 'item', 'cpu', 'to', '__int__']


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_training_keeps_router_and_losses_in_fp32(backend, dtype):
    torch.manual_seed(0)
    layer = make_layer(embed_dims=16, feedforward_channels=32, top_k=2,
                       expert_backend=backend, residual_init_std=0.02,
                       balance_loss_weight=0.01, z_loss_weight=0.001)
    head = torch.nn.Linear(16, 1)
    params = [*layer.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler('cpu', enabled=dtype == torch.float16)
    x, target = torch.randn(64, 16), torch.randn(64, 1)
    losses = []
    for _ in range(5):
        with torch.autocast('cpu', dtype=dtype):
            out = layer(x)
            assert out.dtype == dtype
            assert layer.router(x).logits.dtype == torch.float32
            assert all(v.dtype == torch.float32 for v in layer.last_losses.values())
            loss = (head(out).float() - target).square().mean() + sum(
                layer.last_losses.values())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                   for p in params)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.residual_weights[0].grad.abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_backends_agree(dtype):
    layer = make_layer(embed_dims=32, feedforward_channels=64, top_k=2, capacity_factor=1.0)
    layer.to(dtype)
    x = torch.randn(96, 32, dtype=dtype)
    results = []
    for backend in BACKENDS:
        layer.expert_backend = backend
        layer.zero_grad()
        out = layer(x)
        out.float().square().sum().backward()
        results.append([out] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b)
        else:  # bf16: 8 mantissa bits, and the two kernels round at different steps
            assert ((a - b).float().norm() / b.float().norm()).item() < 2e-2


@pytest.mark.parametrize('backend', BACKENDS)
def test_backward_keeps_no_merged_expert_weights(backend):
    layer = make_layer(embed_dims=16, feedforward_channels=48, num_experts=8,
                       expert_backend=backend)
    params = {p.data_ptr() for p in layer.parameters()}
    expert_sized = {16 * 48 * 8, 48 * 8}
    saved = []

    def pack(t):
        saved.append(t)
        return t
    x = torch.randn(64, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    copies = [tuple(t.shape) for t in saved
              if t.numel() in expert_sized and t.data_ptr() not in params]
    assert copies == []
    out.sum().backward()  # and the backward still works from what was kept
    assert layer.experts.residual_weights[1].grad.abs().sum() > 0


def fwd_bwd_peak(layer, x):
    layer(x).sum().backward()  # steady state: gradients exist, then are freed as a step does
    layer.zero_grad(set_to_none=True)
    with PeakMemory() as memory:
        layer(x).sum().backward()
    return memory.peak


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('top_k', [1, 2])
def test_training_memory_is_dense_plus_the_extra_gradients(backend, top_k):
    torch.manual_seed(0)
    dims, hidden, experts, tokens = 128, 512, 8, 64
    dense = torch.nn.Sequential(torch.nn.Linear(dims, hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, dims))
    moe = MoEFeedForward(dims, hidden, num_experts=experts, top_k=top_k,
                         expert_backend=backend, residual_init_std=0.01)
    x = torch.randn(tokens, dims, requires_grad=True)
    param_bytes = [sum(p.numel() * p.element_size() for p in m.parameters())
                   for m in (dense, moe)]
    extra_gradients = param_bytes[1] - param_bytes[0]
    # What an MoE step needs beyond that: merged weights while a kernel runs (one expert's
    # projection in the loop, every expert's for the grouped GEMM), and the k copies of the
    # tokens that dispatch and combine hold, a few times over.
    merged_projection = hidden * dims * 4
    merged = merged_projection * (1 if backend == 'loop' else experts)
    dispatch = 4 * tokens * top_k * (dims + hidden) * 4
    limit = fwd_bwd_peak(dense, x) + extra_gradients + merged + dispatch
    peak = fwd_bwd_peak(moe, x)
    assert peak <= limit, (peak, limit)
    # Keeping every merged weight of both projections for the backward would not fit.
    assert 2 * experts * merged_projection > limit - peak


def test_peak_memory_counts_new_storages_only():
    base = torch.zeros(1000)
    with PeakMemory() as memory:
        view = base[10:]           # shares base's storage: nothing new
        base.add_(1)               # in place: nothing new
        a = torch.ones(1000)       # 4000 bytes
        b = a * 2                  # 8000
        del a, b
        c = torch.empty(250)       # 1000
    assert (memory.peak, memory.current) == (8000, 1000)
    assert view.shape == (990,) and c.numel() == 250

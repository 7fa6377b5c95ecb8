"""torch.compile of whole RMoE backbones, counted with dynamo's own counters: an RMoE Swin or
CvT compiles into as many graphs as the dense one, with no graph break (with_cp too:
compiled, their RMoE blocks run unchecked), and training steps whose routing differs never
recompile; their outputs, balance losses and gradients are eager's."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from openmmlab_helpers import build
from rmoe_plugin import collect_moe_losses
from rmoe_plugin.backbones.cvt import ARCH_SETTINGS

SWIN = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4,
            pretrain_img_size=32)
CVT = dict(arch=dict(ARCH_SETTINGS['cvt-13'], dim_embed=[16, 32, 48], num_heads=[1, 2, 3],
                     depth=[1, 2, 2]), drop_path_rate=0.0)
STEPS = 3


def images(step):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(step))


def train_step(model, module, x, seed):
    """Outputs, balance losses and gradients of one training step of ``module`` (``model``
    or its compiled form)."""
    torch.manual_seed(seed)  # the same drop path and router noise, compiled or not
    model.zero_grad(set_to_none=True)
    outs = list(module(x))
    losses = list(collect_moe_losses(model).values())
    (sum(o.square().mean() for o in outs) + sum(losses, torch.zeros(()))).backward()
    return outs + losses + [p.grad for p in model.parameters() if p.grad is not None]


def compiled_steps(cfg):
    """Train ``STEPS`` steps of the compiled backbone beside an eager copy; the counters."""
    torch.manual_seed(0)
    model = build('mmseg', cfg)
    model.init_weights()
    model.train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    loads = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(STEPS):
            got = train_step(model, compiled, images(step), step)
            want = train_step(eager, eager, images(step), step)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
            loads += [tuple(layer.moe.last_stats['tokens_per_expert'].tolist())
                      for layer in getattr(model, 'moe_layers', list)()]
    return counter.frame_count, sum(counters['graph_break'].values()), loads


@pytest.mark.parametrize('backend,with_cp', [('loop', False), ('grouped_mm', False),
                                             ('loop', True)])
def test_rmoe_swin_compiles_into_the_graphs_of_the_dense_swin(backend, with_cp):
    swin = dict(SWIN, with_cp=with_cp)
    dense_graphs, dense_breaks, _ = compiled_steps(dict(type='SwinTransformer', **swin))
    graphs, breaks, loads = compiled_steps(dict(
        type='RMoESwinTransformer', **swin,
        moe_cfg=dict(num_experts=4, expert_backend=backend, router_noise_std=0.1)))
    assert (graphs, breaks) == (dense_graphs, dense_breaks) == (1, 0)
    assert len(set(loads)) == len(loads), loads  # the routing differed at every step


def test_rmoe_cvt_with_cp_compiles_into_the_graph_of_the_dense_cvt():
    # (CvT's own checkpointing, with its context_fn, runs unchecked when compiled)
    dense_graphs, dense_breaks, _ = compiled_steps(dict(type='CvT', **CVT, with_cp=True))
    graphs, breaks, _ = compiled_steps(dict(type='RMoECvT', **CVT, with_cp=True,
                                            moe_cfg=dict(num_experts=4)))
    assert (graphs, breaks) == (dense_graphs, dense_breaks) == (1, 0)

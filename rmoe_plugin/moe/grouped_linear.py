"""One projection of every expert at once: ``y[r] = x[r] @ (core + residual[e(r)])^T + bias[e(r)]``.

Rows of ``x`` come grouped by expert (``group_end[e]`` is where expert e's rows end); rows
past ``group_end[-1]`` belong to no expert (dropped assignments): their outputs are undefined
and their input gradients are zero.

The merged weights ``core + residual`` exist only while a kernel runs: the backward forms them
again instead of keeping E weight copies per projection alive between forward and backward.
Two kernels compute the same thing:

- ``'grouped_mm'``: torch's grouped GEMM (``torch.nn.functional.grouped_mm`` where it exists,
  ``torch._grouped_mm`` before), fed only device tensors, so it never waits for the host. Its
  fast kernel is bf16 on sm90/sm100; elsewhere torch falls back to a loop of its own.
- ``'loop'``: one matmul per expert on its slice of rows, which needs the group sizes on the
  host (the caller copies them there once per layer forward).

Both run inside custom ops (``torch.ops.rmoe.residual_grouped_linear`` and its backward), which
``torch.compile`` calls as they are: no graph break, and routing never recompiles.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ('auto', 'grouped_mm', 'loop')

_grouped_mm = getattr(torch.nn.functional, 'grouped_mm', None) or getattr(torch, '_grouped_mm',
                                                                           None)


def grouped_mm_available() -> bool:
    return _grouped_mm is not None


def has_fast_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs its own kernel here (not its host-synchronising loop)."""
    if _grouped_mm is None or device.type != 'cuda' or dtype != torch.bfloat16:
        return False
    # get_device_properties, which torch.compile folds to a constant (get_device_capability
    # it does not)
    return torch.cuda.get_device_properties(device).major in (9, 10)


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """``requested`` unless it is ``'auto'``: then the grouped GEMM where its fast kernel runs
    and the per-expert loop elsewhere (on the CPU it is as fast; on other GPUs torch's grouped
    fallback would synchronise with the host once per call, the loop once per layer)."""
    if requested != 'auto':
        return requested
    return 'grouped_mm' if has_fast_grouped_mm(device, dtype) else 'loop'


def _merged(core: Tensor, residual: Tensor, dtype: torch.dtype) -> Tensor:
    """``core + residual`` in ``dtype``, summed at the parameters' precision."""
    return (core + residual).to(dtype)


def _grouped_forward(x, core_w, res_w, core_b, res_b, group_end, row_expert):
    weight = _merged(core_w, res_w, x.dtype)
    y = _grouped_mm(x, weight.transpose(-2, -1), offs=group_end)
    bias = _merged(core_b, res_b, x.dtype)
    # Dropped rows (expert index E) read the last expert's bias: their output is discarded.
    return y.add_(bias.index_select(0, row_expert.clamp(max=bias.shape[0] - 1)))


def _grouped_backward(grad_y, x, core_w, res_w, group_end, row_expert):
    num_experts = res_w.shape[0]
    weight = _merged(core_w, res_w, grad_y.dtype)
    grad_x = _grouped_mm(grad_y, weight, offs=group_end)
    grad_x.masked_fill_((row_expert == num_experts)[:, None], 0)
    grad_w = _grouped_mm(grad_y.t(), x, offs=group_end)
    grad_b = grad_y.new_zeros(num_experts + 1, grad_y.shape[1], dtype=torch.float32)
    grad_b.index_add_(0, row_expert, grad_y.float())
    return grad_x, grad_w, grad_b[:num_experts]


def _spans(sizes: List[int]):
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


def _loop_forward(x, core_w, res_w, core_b, res_b, sizes):
    y = x.new_empty(x.shape[0], core_w.shape[0])
    for e, (start, end) in enumerate(_spans(sizes[:-1])):
        weight = _merged(core_w, res_w[e], x.dtype)  # formed right before its matmul: in cache
        torch.addmm(_merged(core_b, res_b[e], x.dtype), x[start:end], weight.t(),
                    out=y[start:end])
    y[sum(sizes[:-1]):].zero_()
    return y


def _loop_backward(grad_y, x, core_w, res_w, sizes):
    grad_x = torch.empty_like(x)
    grad_x[sum(sizes[:-1]):].zero_()
    grad_w = grad_y.new_empty(res_w.shape)
    grad_b = grad_y.new_empty(res_w.shape[:2], dtype=torch.float32)
    for e, (start, end) in enumerate(_spans(sizes[:-1])):
        gy = grad_y[start:end]
        torch.mm(gy, _merged(core_w, res_w[e], grad_y.dtype), out=grad_x[start:end])
        torch.mm(gy.t(), x[start:end], out=grad_w[e])
        torch.sum(gy, 0, dtype=torch.float32, out=grad_b[e])
    return grad_x, grad_w, grad_b


# The projection and its backward are custom ops: torch.compile sees each as one opaque call
# of known output shape, so the loop's host read of the group sizes happens inside them and
# never reaches the compiled code as Python ints (which would recompile at every new routing).
@torch.library.custom_op('rmoe::residual_grouped_linear', mutates_args=())
def _projection(x: Tensor, core_w: Tensor, res_w: Tensor, core_b: Tensor, res_b: Tensor,
                group_end: Tensor, row_expert: Tensor, sizes: Optional[Tensor],
                backend: str) -> Tensor:
    if backend == 'loop':
        return _loop_forward(x, core_w, res_w, core_b, res_b, sizes.tolist())
    return _grouped_forward(x, core_w, res_w, core_b, res_b, group_end, row_expert)


@_projection.register_fake
def _projection_fake(x, core_w, res_w, core_b, res_b, group_end, row_expert, sizes, backend):
    return x.new_empty(x.shape[0], core_w.shape[0])


@torch.library.custom_op('rmoe::residual_grouped_linear_backward', mutates_args=())
def _projection_backward(grad_y: Tensor, x: Tensor, core_w: Tensor, res_w: Tensor,
                         group_end: Tensor, row_expert: Tensor, sizes: Optional[Tensor],
                         backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of the input, of every expert's weight and (fp32) of its bias."""
    if backend == 'loop':
        return _loop_backward(grad_y, x, core_w, res_w, sizes.tolist())
    return _grouped_backward(grad_y, x, core_w, res_w, group_end, row_expert)


@_projection_backward.register_fake
def _projection_backward_fake(grad_y, x, core_w, res_w, group_end, row_expert, sizes, backend):
    return (torch.empty_like(x), grad_y.new_empty(res_w.shape),
            grad_y.new_empty(res_w.shape[:2], dtype=torch.float32))


def _save_input(ctx, inputs, output):
    """Saves only the projection's input, never merged weights."""
    x, core_w, res_w, _, _, group_end, row_expert, sizes, backend = inputs
    ctx.save_for_backward(x, core_w, res_w, group_end, row_expert, sizes)
    ctx.backend = backend


def _backward(ctx, grad_y):
    x, core_w, res_w, group_end, row_expert, sizes = ctx.saved_tensors
    grad_x, grad_w, grad_b = _projection_backward(grad_y.contiguous(), x, core_w, res_w,
                                                  group_end, row_expert, sizes, ctx.backend)
    need = ctx.needs_input_grad
    grad_core_w = torch.sum(grad_w, 0, dtype=torch.float32).to(core_w.dtype) \
        if need[1] else None
    grad_core_b = grad_b.sum(0).to(core_w.dtype) if need[3] else None
    return (grad_x if need[0] else None, grad_core_w,
            grad_w.to(res_w.dtype) if need[2] else None, grad_core_b,
            grad_b.to(res_w.dtype) if need[4] else None, None, None, None, None)


_projection.register_autograd(_backward, setup_context=_save_input)


def _traceable_forward(x, core_w, res_w, core_b, res_b, sizes):
    """The loop as plain differentiable ops: what ``torch.jit`` tracers (mmengine's FLOP
    counter among them) record, since a custom op is opaque to them."""
    chunks = x.split(sizes)
    out = [F.linear(chunk, core_w + res_w[e], core_b + res_b[e])
           for e, chunk in enumerate(chunks[:-1])]
    return torch.cat(out + [chunks[-1].new_zeros(sizes[-1], core_w.shape[0])])


def residual_grouped_linear(x: Tensor, core_weight: Tensor, residual_weight: Tensor,
                            core_bias: Tensor, residual_bias: Tensor, group_end: Tensor,
                            row_expert: Tensor, sizes: Optional[Tensor],
                            backend: str) -> Tensor:
    """Apply expert ``row_expert[r]``'s projection to every row ``r`` of ``x``.

    Args:
        x (Tensor): rows grouped by expert, shape (N, in), in the compute dtype.
        core_weight (Tensor): shared weight, shape (out, in).
        residual_weight (Tensor): per-expert residuals, shape (E, out, in).
        core_bias (Tensor): shape (out,). residual_bias (Tensor): shape (E, out).
        group_end (Tensor): int32 cumulative row counts per expert, shape (E,).
        row_expert (Tensor): expert of each row, E for a dropped row, shape (N,).
        sizes (Tensor, optional): rows per expert, then the dropped rows, shape (E + 1,), on
            the host (see ``DispatchPlan.group_sizes``); needed by ``'loop'`` only.
        backend (str): ``'grouped_mm'`` or ``'loop'``.

    Returns:
        Tensor: shape (N, out), in ``x``'s dtype; rows past ``group_end[-1]`` undefined.
    """
    if torch.jit.is_tracing():
        return _traceable_forward(x, core_weight, residual_weight, core_bias, residual_bias,
                                  sizes.tolist())
    return _projection(x, core_weight, residual_weight, core_bias, residual_bias, group_end,
                       row_expert, sizes, backend)

"""A Swin-MoE written for the tests from the structure of microsoft/Swin-Transformer's
``models/swin_transformer_moe.py`` and Tutel's MoE layer (their code is not copied), with the
parameter names and shapes of their checkpoints, and the saving of its weights in the layout
Swin-Transformer releases them in.

What it reproduces: Swin V1 blocks (pre-norm, scaled dot-product window attention, shifted
windows with a -100 mask, no shift and a window the size of the feature map where the map is
no larger than the window), the continuous position bias (an MLP on log-spaced relative
coordinates, normalised by the pre-training window), fc2 without bias, PatchMerging of the
2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1); Tutel's top-k routing in fp32 (a
linear gate without bias, or the cosine gate), noise ``gate_noise * N(0,1) / E`` in training,
capacity ``k * int(f * ceil(S / E))`` filled in order of the top gate, output
``gate * expert(x)``, experts stacked with fc2's weight stored transposed.
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def relative_coords(window: int, pretrained_window: int) -> torch.Tensor:
    span = torch.arange(-(window - 1), window, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(span, span, indexing='ij'), dim=-1)  # (2W-1, 2W-1, 2)
    norm = (pretrained_window if pretrained_window > 0 else window) - 1
    grid = grid / norm * 8
    return (torch.sign(grid) * torch.log2(grid.abs() + 1) / 3).unsqueeze(0)


def pair_index(window: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1)  # (W*W, 2)
    delta = points[:, None, :] - points[None, :, :] + (window - 1)
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


class Attention(nn.Module):
    def __init__(self, dim, heads, window, pretrained_window):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True),
                                     nn.Linear(512, heads, bias=False))
        self.register_buffer('relative_coords_table', relative_coords(window, pretrained_window))
        self.register_buffer('relative_position_index', pair_index(window))

    def forward(self, x, mask):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        table = self.cpb_mlp(self.relative_coords_table).reshape(-1, self.heads)
        bias = table[self.relative_position_index.reshape(-1)].reshape(t, t, -1)
        scores = scores + bias.permute(2, 0, 1)
        if mask is not None:
            scores = (scores.reshape(-1, mask.shape[0], self.heads, t, t)
                      + mask[None, :, None]).reshape(n, self.heads, t, t)
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, fc2_bias):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=fc2_bias)  # Swin-MoE's MLP_FC2_BIAS

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LinearGate(nn.Module):
    def __init__(self, dim, num_experts):
        super().__init__()
        self.wg = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x):
        return F.linear(x.float(), self.wg.weight.float())


class CosineGate(nn.Module):
    def __init__(self, dim, num_experts, proj_dim=256, init_t=0.5):
        super().__init__()
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.randn(proj_dim, num_experts) * 0.01)

    def forward(self, x):
        x = F.normalize(self.cosine_projector(x.float()), dim=1)
        sim = F.normalize(self.sim_matrix.float(), dim=0)
        return x @ sim * self.temperature.clamp(max=math.log(100.0)).exp()


class Experts(nn.Module):
    def __init__(self, num_experts, dim, hidden, fc2_bias):
        super().__init__()
        self.batched_fc1_w = nn.Parameter(torch.randn(num_experts, hidden, dim) * 0.05)
        self.batched_fc2_w = nn.Parameter(torch.randn(num_experts, hidden, dim) * 0.05)
        self.batched_fc1_bias = nn.Parameter(torch.randn(num_experts, hidden) * 0.05)
        # Swin-MoE zeroes it, and without MLP_FC2_BIAS it stays frozen at zero
        self.batched_fc2_bias = nn.Parameter(
            torch.randn(num_experts, dim) * 0.05 if fc2_bias else torch.zeros(num_experts, dim),
            requires_grad=fc2_bias)

    def forward(self, x, e):  # x: tokens of expert e
        h = F.gelu(x @ self.batched_fc1_w[e].T + self.batched_fc1_bias[e])
        return h @ self.batched_fc2_w[e] + self.batched_fc2_bias[e]


class MoELayer(nn.Module):
    def __init__(self, dim, hidden, num_experts, top_k, capacity_factor, cosine, gate_noise,
                 fc2_bias):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.gate_noise = capacity_factor, gate_noise
        gate = CosineGate(dim, num_experts) if cosine else LinearGate(dim, num_experts)
        self.gates = nn.ModuleList([gate])
        self.experts = Experts(num_experts, dim, hidden, fc2_bias)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gates[0](x)
        if self.training and self.gate_noise > 0:
            logits = logits + self.gate_noise * torch.randn_like(logits) / self.num_experts
        scores = logits.softmax(dim=1)
        top = scores.topk(self.top_k, dim=1)
        # how far each token is from choosing otherwise: a tie that rounding could break
        ranked = logits.topk(min(self.top_k + 1, self.num_experts), dim=1).values
        self.margin = float((ranked[:, self.top_k - 1] - ranked[:, -1]).min())
        per_expert = -(-x.shape[0] // self.num_experts)
        capacity = self.top_k * int(self.capacity_factor * per_expert)
        order = torch.argsort(-scores.max(dim=1).values, stable=True)  # batch-prioritised
        used = [0] * self.num_experts
        out = torch.zeros_like(x)
        for choice in range(self.top_k):
            for s in order.tolist():
                e = int(top.indices[s, choice])
                if used[e] >= capacity:
                    continue
                used[e] += 1
                y = self.experts(x[s:s + 1], e)
                out[s] += (top.values[s, choice] * y[0]).to(x.dtype)
        self.dropped = self.top_k * x.shape[0] - sum(used)
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift, pretrained_window, moe,
                 fc2_bias):
        super().__init__()
        if min(resolution) <= window:  # the whole map is one window: nothing to shift
            window, shift = min(resolution), 0
        self.window, self.shift, self.resolution = window, shift, resolution
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, window, pretrained_window)
        self.norm2 = nn.LayerNorm(dim)
        if moe is None:
            self.mlp = Mlp(dim, 4 * dim, fc2_bias)
        else:
            self.mlp = nn.Module()
            self.mlp._moe_layer = MoELayer(dim, 4 * dim, fc2_bias=fc2_bias, **moe)
        self.register_buffer('attn_mask', self.shift_mask() if shift else None)

    def shift_mask(self):
        h, w = self.resolution
        region = torch.zeros(1, h, w, 1)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift),
                slice(-self.shift, None))
        for i, (ys, xs) in enumerate((ys, xs) for ys in cuts for xs in cuts):
            region[:, ys, xs] = i
        ids = to_windows(region, self.window)[..., 0]
        mask = ids[:, None, :] - ids[:, :, None]
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x):
        (h, w), (b, _, c) = self.resolution, x.shape
        y = self.norm1(x).reshape(b, h, w, c)
        if self.shift:
            y = y.roll((-self.shift, -self.shift), dims=(1, 2))
        y = from_windows(self.attn(to_windows(y, self.window), self.attn_mask), self.window, h, w)
        if self.shift:
            y = y.roll((self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        mlp = self.mlp._moe_layer if hasattr(self.mlp, '_moe_layer') else self.mlp
        return x + mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        (h, w), (b, _, c) = self.resolution, x.shape
        x = x.reshape(b, h, w, c)
        x = torch.cat([x[:, i::2, j::2] for j in (0, 1) for i in (0, 1)], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, pretrained_window, moe_blocks,
                 moe, fc2_bias, last):
        super().__init__()
        self.blocks = nn.ModuleList([
            Block(dim, resolution, heads, window, window // 2 if i % 2 else 0,
                  pretrained_window, moe if i in moe_blocks else None, fc2_bias)
            for i in range(depth)])
        self.downsample = None if last else PatchMerging(dim, resolution)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x, (x if self.downsample is None else self.downsample(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinMoE(nn.Module):
    """Stage outputs (before each PatchMerging), (B, H*W, C) each.

    Args:
        moe_blocks: block indices per stage; default: the odd ones of the last two stages.
        fc2_bias: Swin-MoE's MLP_FC2_BIAS (the released models: False).
        moe: ``num_experts``, ``top_k``, ``capacity_factor``, ``cosine``, ``gate_noise``.
    """

    def __init__(self, img_size=128, embed_dim=16, depths=(2, 2, 4, 2), heads=(1, 2, 2, 4),
                 window=2, pretrained_windows=(0, 0, 0, 0), moe_blocks=None, num_classes=5,
                 fc2_bias=False, **moe):
        super().__init__()
        moe = dict(dict(num_experts=4, top_k=1, capacity_factor=100.0, cosine=False,
                        gate_noise=0.0), **moe)
        if moe_blocks is None:
            moe_blocks = [list(range(1, d, 2)) if s >= len(depths) - 2 else []
                          for s, d in enumerate(depths)]
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList()
        for s, depth in enumerate(depths):
            res = img_size // 4 // 2 ** s
            self.layers.append(Stage(embed_dim * 2 ** s, (res, res), depth, heads[s], window,
                                     pretrained_windows[s], moe_blocks[s], moe, fc2_bias,
                                     last=s == len(depths) - 1))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.head = nn.Linear(embed_dim * 2 ** (len(depths) - 1), num_classes)
        with torch.no_grad():  # away from the initial values, norms included
            for name, p in self.named_parameters():
                if p.requires_grad and 'batched' not in name:
                    p.add_(torch.randn_like(p) * 0.05)
            for layer in self.moe_layers():  # confident routers: ties stay rare (see margin)
                gate = layer.gates[0]
                if isinstance(gate, CosineGate):
                    gate.temperature.fill_(math.log(40.0))
                else:
                    gate.wg.weight.mul_(4.0)

    def forward(self, x) -> List[torch.Tensor]:
        x = self.patch_embed(x)
        outs = []
        for stage in self.layers:
            out, x = stage(x)
            outs.append(out)
        return outs

    def moe_layers(self) -> List[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]


def load_pretrained(model: SwinMoE, state: dict) -> None:
    """Swin-Transformer's ``load_pretrained``: the derived buffers are the model's own."""
    state = {k: v for k, v in state.items()
             if not k.endswith(('relative_position_index', 'relative_coords_table', 'attn_mask'))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(('relative_position_index',
                                              'relative_coords_table', 'attn_mask'))
                                  for k in missing), (missing, unexpected)


def save_released(state: dict, name: str, num_ranks: int, legacy_bias: bool = False,
                  merged: bool = False, frozen_fc2_bias: bool = True) -> List[str]:
    """Save ``state`` (a :class:`SwinMoE`'s) as Swin-Transformer releases a checkpoint trained
    on ``num_ranks`` GPUs: ``name.master`` (all but the trainable expert tensors: the frozen
    fc2 bias as rank 0's piece, unless not ``frozen_fc2_bias``) and ``name.rank{r}``, rank r's
    experts. With fewer experts than ranks each expert's hidden units are split over
    consecutive ranks, each holding ``ceil(C / s)`` of the fc2 bias (the last piece padded).
    ``legacy_bias``: the biases as the Tutel of 2022 shaped them, (E_local, 1, ...).
    ``merged``: one file, ``name`` itself.

    Returns:
        the files written.
    """
    if merged:
        torch.save({'model': dict(state)}, name)
        return [name]
    master = {}
    ranks = [{} for _ in range(num_ranks)]
    for key, value in state.items():
        if '._moe_layer.experts.' not in key:
            master[key] = value
            continue
        pieces = split_over_ranks(key, value, num_ranks)
        if legacy_bias and key.endswith('_bias'):
            pieces = [p.unsqueeze(1) for p in pieces]
        if frozen_fc2_bias and key.endswith('batched_fc2_bias'):  # no gradient: the saver
            # does not count it among the experts
            master[key] = pieces[0]
        else:
            for rank, piece in zip(ranks, pieces):
                rank[key] = piece
    torch.save({'model': master}, f'{name}.master')
    for r, rank in enumerate(ranks):
        torch.save({'model': rank}, f'{name}.rank{r}')
    return [f'{name}.master'] + [f'{name}.rank{r}' for r in range(num_ranks)]


def split_over_ranks(key: str, value: torch.Tensor, num_ranks: int) -> List[torch.Tensor]:
    num_experts = value.shape[0]
    if num_experts >= num_ranks:
        per_rank = num_experts // num_ranks
        return [value[r * per_rank:(r + 1) * per_rank].clone() for r in range(num_ranks)]
    shards = num_ranks // num_experts
    pieces = []
    for e in range(num_experts):
        if key.endswith('batched_fc2_bias'):
            width = -(-value.shape[1] // shards)
            padded = torch.cat([value[e], value.new_zeros(width * shards - value.shape[1])])
            pieces += [padded[s * width:(s + 1) * width][None].clone() for s in range(shards)]
        else:
            step = value.shape[1] // shards
            pieces += [value[e:e + 1, s * step:(s + 1) * step].clone() for s in range(shards)]
    return pieces


def reference_outputs(model: SwinMoE, images: torch.Tensor, train: bool) -> List[torch.Tensor]:
    model.train(train)
    with torch.no_grad():
        outs = model(images)
    assert all(layer.dropped == 0 for layer in model.moe_layers())
    # No token within rounding of choosing another expert: the model under test, summing in
    # another order, must make the same choices (a fixed seed keeps it so).
    assert min(layer.margin for layer in model.moe_layers()) > 1e-4
    return outs


def stage_outputs(backbone: nn.Module, images: torch.Tensor, train: bool,
                  stages: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """The outputs of an mmseg/mmdet Swin's stages before their PatchMerging, (B, H*W, C)."""
    outs = {}
    hooks = [stage.register_forward_hook(lambda m, i, o, s=s: outs.__setitem__(s, o[2]))
             for s, stage in enumerate(backbone.stages)]
    backbone.train(train)
    try:
        with torch.no_grad():
            backbone(images)
    finally:
        for hook in hooks:
            hook.remove()
    return [outs[s] for s in sorted(outs)]


"""Expert maps of backbones whose layers see a cls token before the patch grid (ViT, BEiT,
CvT's last stage)."""
import pytest
import torch

from rmoe_plugin.analysis import assignment_map
from rmoe_plugin.analysis.expert_maps import prefix_tokens


@pytest.mark.parametrize('tokens, hw, prefix', [
    (16, (64, 64), 0),        # Swin stage 2: no cls token
    (65, (128, 128), 1),      # ViT/BEiT, patch 16: cls + 8 x 8
    (1 + 4 * 6, (64, 96), 1),  # CvT stage 2 (stride 16) of a 64x96 input
    (4 + 16, (64, 64), 4),    # cls + 3 register tokens
    (100, (30, 40), 0),       # no grid fits: nothing is dropped
])
def test_prefix_tokens_before_the_patch_grid(tokens, hw, prefix):
    assert prefix_tokens(tokens, hw) == prefix


def test_assignment_map_leaves_the_cls_token_out():
    index = torch.tensor([3, 0, 1, 2, 0])  # cls, then 2x2 patches of stride 2
    labels = assignment_map(index, input_hw=(4, 4), valid_hw=(4, 4), out_hw=(2, 2))
    assert labels.tolist() == [[0, 1], [2, 0]]

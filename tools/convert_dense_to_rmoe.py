"""Turn a dense checkpoint into an RMoE one, as an RMoE config's backbone would load it.

Any RMoE backbone: the checkpoint goes through the backbone's own loading (``init_cfg``;
``checkpoint_path`` for ``TIMMBackbone``), so every layout that backbone reads is accepted
(Swin: OpenMMLab, official and timm; CvT: official; bare backbones or full segmentor/detector
checkpoints). Writes atomically and never over its input.

    python tools/convert_dense_to_rmoe.py swin_tiny.pth rmoe_swin_tiny.pth \
        --config configs/ade20k/rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py
"""
import argparse
import sys

from mmengine.config import Config

import rmoe_plugin  # noqa: F401  (registers the RMoE modules)
from rmoe_plugin.backbones.moe_conversion import dense_to_rmoe_checkpoint
from rmoe_plugin.engine.checkpoint import check_output_path, save_checkpoint_atomic


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('input', help='dense checkpoint')
    p.add_argument('output', help='where to write the RMoE checkpoint')
    p.add_argument('--config', required=True,
                   help='RMoE config whose model.backbone gives the MoE options')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output')
    args = p.parse_args()
    try:
        check_output_path(args.input, args.output, args.overwrite)
        cfg = Config.fromfile(args.config)
        backbone = cfg.model.backbone
        if 'RMoE' not in backbone.get('type', ''):
            raise ValueError(f'--config {args.config}: model.backbone.type is '
                             f'{backbone.get("type")!r}, expected an RMoE backbone')
        if not backbone.get('moe_cfg'):
            raise ValueError(f'--config {args.config}: model.backbone has no moe_cfg, the '
                             'arguments of the RMoE layers to make (e.g. moe_cfg=dict('
                             'num_experts=8, top_k=1))')
        checkpoint, summary = dense_to_rmoe_checkpoint(
            args.input, backbone, cfg.get('default_scope', 'mmseg'))
        save_checkpoint_atomic(checkpoint, args.output)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'error: {e}')
    print(summary)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()

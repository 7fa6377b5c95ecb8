"""Draw which expert each image patch goes to, per MoE layer, and each layer's expert load.

Runs every image through the config's test pipeline, data preprocessor and feature extractor
(mmseg or mmdet) and writes, in --out: expert_maps.png (rows: images, columns: the image, then
one MoE layer each; colours: top-1 expert of each token, over the patch it covers) and
expert_load.png (share of the images' tokens per expert, one chart per layer).

    python tools/visualize_experts.py CONFIG CHECKPOINT img1.jpg img2.jpg --out vis/ \
        --layers backbone.stages.2.blocks.1.ffn backbone.stages.3.blocks.1.ffn
"""
import argparse
import sys

from mmengine.config import DictAction

import rmoe_plugin  # noqa: F401  (registers the RMoE modules)
from rmoe_plugin.analysis import build_from_config, moe_layers_by_name
from rmoe_plugin.analysis.expert_maps import OUTPUT_FILES, visualize_experts
from rmoe_plugin.analysis.outputs import check_outputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='mmseg or mmdet config of an RMoE model')
    p.add_argument('checkpoint', help='checkpoint of that model')
    p.add_argument('images', nargs='+', help='image files, one row each')
    p.add_argument('--out', required=True, help='folder for the PNG files')
    p.add_argument('--layers', nargs='+', help='MoE layers by module path (default: all)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--overwrite', action='store_true', help='replace earlier outputs')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='config overrides, key=value')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_outputs(args.out, OUTPUT_FILES.values(),
                      [args.config, args.checkpoint, *args.images], args.overwrite)
        model, cfg = build_from_config(args.config, args.checkpoint, args.cfg_options,
                                       args.device)
        layers = moe_layers_by_name(model, args.layers)
        paths = visualize_experts(model, cfg, args.images, layers, args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'error: {e}')
    print(f'{len(args.images)} images, {len(layers)} MoE layers: ' + ', '.join(layers))
    for path in paths.values():
        print(f'wrote {path}')


if __name__ == '__main__':
    main()

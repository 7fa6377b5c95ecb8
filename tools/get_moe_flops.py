"""FLOPs and parameters of an RMoE model as MoE papers report them, from its config.

Dense-equivalent (every MoE layer a dense FFN), activated (router + top-k experts) and
executed (capacity-padded expert slots, at the training and the evaluation capacity factor)
FLOPs, total and activated parameters, for one image of --shape. The rest of the model is
counted by mmengine's get_model_complexity_info; the MoE layers analytically. One FLOP is one
multiply-add, as mmengine/fvcore and mmseg/mmdet's get_flops count them.

    python tools/get_moe_flops.py configs/ade20k/rmoe-swin-tiny-...-512x512.py --shape 512 512
"""
import argparse
import sys

import torch
from mmengine.config import DictAction

import rmoe_plugin  # noqa: F401  (registers the RMoE modules)
from rmoe_plugin.analysis import build_from_config, moe_flops_report
from rmoe_plugin.analysis.flops import format_report
from rmoe_plugin.utils.known_warnings import ignore_known_warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='mmseg or mmdet config of an RMoE model')
    p.add_argument('--shape', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'),
                   help='input height and width (default: 512 512)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='config overrides, key=value')
    return p.parse_args(argv)


def main(argv=None):
    ignore_known_warnings()
    args = parse_args(argv)
    try:
        if min(args.shape) < 1:
            raise ValueError(f'--shape must be two positive sizes, got {args.shape}')
        torch.manual_seed(0)  # initial weights: a detector's head costs follow its proposals
        model, cfg = build_from_config(args.config, cfg_options=args.cfg_options)
        report = moe_flops_report(model, cfg.default_scope, tuple(args.shape))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
    h, w = args.shape
    print(format_report(report, f'{args.config}\ninput 1x3x{h}x{w}, one multiply-add = 1 FLOP'))


if __name__ == '__main__':
    main()

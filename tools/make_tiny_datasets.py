"""Write small ADE20K and COCO datasets in their real on-disk layouts.

    python tools/make_tiny_datasets.py data            # data/ade/ADEChallengeData2016, data/coco
    python tools/make_tiny_datasets.py data --only coco --num-train 64 --seed 1
"""
import argparse

from rmoe_plugin.datasets import make_ade20k, make_coco
from rmoe_plugin.utils.known_warnings import ignore_known_warnings


def main():
    ignore_known_warnings()
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('root', help='folder that will hold ade/ and coco/')
    p.add_argument('--only', choices=['ade20k', 'coco'])
    p.add_argument('--num-train', type=int, default=16)
    p.add_argument('--num-val', type=int, default=8)
    p.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='image size (default: 128 128 for ADE20K, 96 128 for COCO)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--overwrite', action='store_true', help='replace existing datasets')
    args = p.parse_args()
    common = dict(num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                  overwrite=args.overwrite)
    if args.size:
        common['size'] = tuple(args.size)
    if args.only in (None, 'ade20k'):
        print(f'ADE20K layout: {make_ade20k(args.root, **common)}')
    if args.only in (None, 'coco'):
        print(f'COCO layout: {make_coco(args.root, **common)}')


if __name__ == '__main__':
    main()

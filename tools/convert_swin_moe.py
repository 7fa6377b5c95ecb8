"""Convert a released Swin-MoE checkpoint for RMoESwinTransformer, or a trained one back.

    python tools/convert_swin_moe.py SRC DST [--window-size N] [--ranks R]
    python tools/convert_swin_moe.py --to-released SRC DST --ranks R [--reference CONVERTED]

SRC is ``NAME.pth`` (its ``NAME.pth.master`` and ``NAME.pth.rank*`` beside it are found; the
ranks expected are ``--ranks``, else the ``{R}gpu`` of the released names), one of those
files, a ``.pth.global`` or a merged file. DST is a weights-only checkpoint that
``init_cfg=dict(type='Pretrained', checkpoint=DST)`` loads into the backbone of the
``swin-moe-small-*`` configs, by path or URL. The position bias (``cpb_mlp``) is evaluated at
``--window-size`` (default: the pre-training window), normalised by the window each block was
trained with.

``--to-released`` writes the backbone of SRC (a converted checkpoint, or one trained from it:
then give the converted one as ``--reference``; for a run that read the released files
directly, convert them first) as ``DST.master`` and ``DST.rank0`` ...
``DST.rank{R-1}`` in the released layout, which Swin-Transformer's ``main_moe.py`` reads.
Nothing is written over an input or an existing file (``--overwrite`` replaces outputs).
"""
import argparse
import sys

from rmoe_plugin.engine.checkpoint import (check_output_path, extract_state_dict,
                                           load_checkpoint_file, save_checkpoint_atomic)
from rmoe_plugin.engine.convert import backbone_state_dict
from rmoe_plugin.engine.swin_moe import convert_released, released_files, to_released


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('src', help='released Swin-MoE checkpoint (or, with --to-released, a '
                               'converted or trained one)')
    p.add_argument('dst', help='output checkpoint (with --to-released: NAME.pth, written as '
                               'NAME.pth.master and NAME.pth.rank*)')
    p.add_argument('--window-size', type=int, help='window to evaluate the position bias at '
                                                    '(default: the pre-training window)')
    p.add_argument('--ranks', type=int, help='ranks the experts were saved on (reading), or '
                                             'to lay them out for (--to-released)')
    p.add_argument('--to-released', action='store_true',
                   help='write SRC back in the released layout')
    p.add_argument('--reference', help="the converted checkpoint SRC was trained from, for its "
                                       "meta['swin_moe'] (--to-released)")
    p.add_argument('--force-position-bias', action='store_true',
                   help='--to-released: write the reference cpb_mlp even where SRC\'s bias '
                        'tables were trained')
    p.add_argument('--overwrite', action='store_true', help='replace existing outputs')
    return p.parse_args(argv)


def convert(args) -> None:
    inputs = [args.src]
    if '://' not in args.src:
        master, ranks = released_files(args.src, args.ranks)
        inputs = [p for p in [master, *ranks] if p]
    check_output_path(inputs, args.dst, args.overwrite)
    checkpoint, summary = convert_released(args.src, args.window_size, args.ranks)
    save_checkpoint_atomic(checkpoint, args.dst)
    print('\n'.join(summary))
    print(f'wrote {args.dst}')


def back_to_released(args) -> None:
    if not args.ranks:
        raise ValueError('--to-released needs --ranks, the number of rank files to write')
    checkpoint = load_checkpoint_file(args.src)
    meta = (checkpoint.get('meta') or {}).get('swin_moe')
    if meta is None and args.reference:
        meta = (load_checkpoint_file(args.reference).get('meta') or {}).get('swin_moe')
    if meta is None:
        raise ValueError(f"{args.src} has no meta['swin_moe'] (it was not written by this "
                         "tool): give the converted checkpoint it was trained from as "
                         "--reference")
    backbone = backbone_state_dict(extract_state_dict(checkpoint))
    files, notes = to_released(backbone, meta, args.ranks, args.force_position_bias)
    paths = {part: f'{args.dst}.{part}' for part in files}
    inputs = [p for p in (args.src, args.reference) if p]
    for path in paths.values():
        check_output_path(inputs, path, args.overwrite)
    for part, state in files.items():
        save_checkpoint_atomic({'model': state}, paths[part])
    for note in notes:
        print(note)
    experts = sorted({v['num_experts'] for v in meta['moe_layers'].values()})
    print(f'{len(meta["moe_layers"])} MoE blocks of {"/".join(map(str, experts))} experts '
          f'on {args.ranks} ranks')
    print(f'wrote {paths["master"]} and {args.ranks} rank files {args.dst}.rank0 ...')


def main(argv=None):
    args = parse_args(argv)
    try:
        (back_to_released if args.to_released else convert)(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()

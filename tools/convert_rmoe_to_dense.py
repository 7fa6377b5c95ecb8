"""Fold an RMoE checkpoint back into a dense one: each RMoE layer becomes a dense FFN holding
its mean expert (core + mean residual); routers are dropped. Writes atomically, never over
its input.

    python tools/convert_rmoe_to_dense.py work_dirs/rmoe/iter_160000.pth dense.pth
"""
import argparse
import sys

from rmoe_plugin.engine.checkpoint import (check_output_path, extract_state_dict,
                                           load_checkpoint_file, save_checkpoint_atomic)
from rmoe_plugin.engine.convert import fold_rmoe_to_dense


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('input', help='RMoE checkpoint')
    p.add_argument('output', help='where to write the dense checkpoint')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output')
    args = p.parse_args()
    try:
        check_output_path(args.input, args.output, args.overwrite)
        checkpoint = load_checkpoint_file(args.input)
        dense, folded = fold_rmoe_to_dense(extract_state_dict(checkpoint))
        if not folded:
            raise ValueError(f'{args.input} holds no RMoE layer (no *.moe.experts.core_* keys)')
        save_checkpoint_atomic(dict(state_dict=dense, meta=checkpoint.get('meta', {})),
                               args.output)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'error: {e}')
    print(f'{len(folded)} RMoE layers folded into dense FFNs: ' + ', '.join(folded))
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()

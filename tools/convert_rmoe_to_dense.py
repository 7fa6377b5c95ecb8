"""Fold an RMoE checkpoint back into a dense one: each RMoE layer becomes a dense FFN holding
its mean expert (core + mean residual), named as the FFN it replaced; routers are dropped.
Writes atomically, never over its input.

    python tools/convert_rmoe_to_dense.py work_dirs/rmoe/iter_160000.pth dense.pth \
        [--config configs/ade20k/rmoe-cvt-13-e8_upernet_8xb2-160k_ade20k-512x512.py]

The dense names of each layer's projections (``layers.0.0``/``layers.1`` of an mmcv FFN,
``fc1``/``fc2`` of a timm or CvT MLP) come from the model of ``--config`` when given; else from
what ``convert_dense_to_rmoe.py`` recorded in the checkpoint; else from the dense FFNs beside
the layer; else an mmcv FFN is assumed, and said so. The checkpoint's own config text is never
run.
"""
import argparse
import sys

from rmoe_plugin.engine.checkpoint import (check_output_path, extract_state_dict,
                                           load_checkpoint_file, save_checkpoint_atomic)
from rmoe_plugin.engine.convert import (fold_rmoe_to_dense, mmcv_ffn_linear_names,
                                        neighbour_linear_names, rmoe_layer_prefixes)


def names_from_config(config):
    from rmoe_plugin.analysis import build_from_config
    from rmoe_plugin.backbones.moe_conversion import dense_linear_names
    model, _ = build_from_config(config)
    return dense_linear_names(model)


def dense_names(state_dict, meta, config):
    """Each RMoE layer's dense projection names, and where they came from."""
    projections = {prefix[:-1]: n for prefix, n in rmoe_layer_prefixes(state_dict).items()}
    layers = list(projections)
    if config:
        known = names_from_config(config)
        missing = [layer for layer in layers if layer not in known]
        if missing:
            raise ValueError(f'--config {config}: its model has no RMoE layers {missing}; is '
                             'it the config of this checkpoint?')
        return known, {layer: '--config' for layer in layers}
    recorded = (meta.get('rmoe_conversion') or {}).get('dense_linear_names') or {}
    names, sources = {}, {}
    for layer in layers:
        if layer in recorded:
            names[layer], sources[layer] = recorded[layer], 'the conversion record'
        elif neighbour_linear_names(state_dict, layer):
            names[layer] = neighbour_linear_names(state_dict, layer)
            sources[layer] = 'the dense FFNs beside it'
        else:
            names[layer] = mmcv_ffn_linear_names(projections[layer])
            sources[layer] = 'assumed an mmcv FFN; give --config to be sure'
    return names, sources


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('input', help='RMoE checkpoint')
    p.add_argument('output', help='where to write the dense checkpoint')
    p.add_argument('--config', help="the checkpoint's config: names the dense FFN layouts")
    p.add_argument('--overwrite', action='store_true', help='replace an existing output')
    args = p.parse_args()
    try:
        check_output_path(args.input, args.output, args.overwrite)
        checkpoint = load_checkpoint_file(args.input)
        state_dict = extract_state_dict(checkpoint)
        meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
        names, sources = dense_names(state_dict, meta, args.config)
        dense, folded = fold_rmoe_to_dense(state_dict, names)
        if not folded:
            raise ValueError(f'{args.input} holds no RMoE layer (no *.moe.experts.core_* keys)')
        save_checkpoint_atomic(dict(state_dict=dense, meta=meta), args.output)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'error: {e}')
    print(f'{len(folded)} RMoE layers folded into dense FFNs:')
    for layer in folded:
        print(f'  {layer}: {", ".join(names[layer])} ({sources[layer]})')
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()

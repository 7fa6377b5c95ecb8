"""How the experts of each RMoE layer sit around their core, from a checkpoint alone.

Per RMoE layer (found by its *.moe.experts.core_weights.0 key, or the stacked experts of a
converted Swin-MoE, factored as RMoEFFN loads them): the residual norm of each
expert relative to the core, ||R_e|| / ||C||; the distances ||W_e - W_f|| between experts;
and a 2-D PCA of the core and the experts (every projection's weights and biases, flattened).
Writes, in --out: expert_weights.json, residual_norms.png, expert_distances.png and
expert_pca.png. The checkpoint is read with torch.load(weights_only=True).

    python tools/analyze_experts.py work_dirs/rmoe/iter_160000.pth --out analysis/
"""
import argparse
import sys

from rmoe_plugin.analysis.outputs import check_outputs
from rmoe_plugin.analysis.weights import OUTPUT_FILES, analyze_state_dict, write_analysis
from rmoe_plugin.engine.checkpoint import extract_state_dict, load_checkpoint_file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoint', help='checkpoint holding RMoE layers')
    p.add_argument('--out', required=True, help='folder for the JSON and PNG files')
    p.add_argument('--overwrite', action='store_true', help='replace earlier outputs')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_outputs(args.out, OUTPUT_FILES.values(), [args.checkpoint], args.overwrite)
        state_dict = extract_state_dict(load_checkpoint_file(args.checkpoint))
        try:
            results = analyze_state_dict(state_dict)
        except ValueError as e:
            raise ValueError(f'{args.checkpoint}: {e}') from e
        paths = write_analysis(results, args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f'error: {e}')
    print(f'{"RMoE layer":<34} {"E":>3} {"||C||":>8} {"||R_e||/||C|| mean":>18} '
          f'{"max":>7} {"dist/||C|| mean":>15}')
    for name, r in results.items():
        rel = r['relative_residual_norm']
        num = r['num_experts']
        pairs = [r['relative_distances'][e][f] for e in range(num) for f in range(e + 1, num)]
        mean_dist = sum(pairs) / len(pairs) if pairs else 0.0
        print(f'{name:<34} {num:>3} {r["core_norm"]:>8.3g} {sum(rel) / num:>18.3g} '
              f'{max(rel):>7.3g} {mean_dist:>15.3g}')
    for path in paths.values():
        print(f'wrote {path}')


if __name__ == '__main__':
    main()

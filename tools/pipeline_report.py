"""Accuracy and cost of finished pipeline runs: RMoE's extra cost over dense, saving over MoE.

    python tools/pipeline_report.py work_dirs/pipelines [--metric mIoU]

Prints a markdown table and writes report.md and pipelines.png into the same folder.
"""
import argparse
import os

from rmoe_plugin.fileio import atomic_write
from rmoe_plugin.pipeline import load_runs, markdown_table, plot, summarise


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('root', help='the folder given to tools/run_pipelines.py')
    p.add_argument('--metric', default='mIoU', help='downstream metric to compare')
    args = p.parse_args()
    try:
        runs = load_runs(args.root)
        rows = summarise(runs, args.metric)
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f'error: {e}')
    table = markdown_table(rows, args.metric)
    print(table)
    plot(rows, args.metric, os.path.join(args.root, 'pipelines.png'))
    with atomic_write(os.path.join(args.root, 'report.md')) as f:
        f.write('# RMoE pipelines\n\n' + table + '\n\n![accuracy against cost](pipelines.png)\n')
    print(f'wrote {args.root}/report.md and pipelines.png')


if __name__ == '__main__':
    main()

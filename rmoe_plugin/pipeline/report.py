"""Accuracy against cost for finished pipeline runs: a table and a plot."""
import glob
import json
import os
import statistics
from collections import defaultdict
from typing import Dict, List

from ..fileio import atomic_write

ORDER = ('dense', 'rmoe_d', 'rmoe_i', 'moe')
LABELS = dict(dense='dense (lower bound)', rmoe_d='RMoE-D', rmoe_i='RMoE-I',
              moe='MoE (upper bound)')
COSTS = ('wall_s', 'process_s', 'train_flops')


def load_runs(root: str) -> Dict[str, List[dict]]:
    """Pipeline records under ``root`` (``seed*/<pipeline>.json``), grouped by pipeline."""
    runs: Dict[str, List[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, 'seed*', '*.json'))):
        with open(path) as f:
            record = json.load(f)
        runs[record['pipeline']].append(record)
    if not runs:
        raise FileNotFoundError(f'no finished pipeline under {root!r} (seed*/<pipeline>.json)')
    return runs


def pipeline_cost(record: dict) -> Dict[str, float]:
    """Total cost of a pipeline: every stage it needs, shared ones included."""
    return {k: sum(s['cost'][k] for s in record['stages']) for k in COSTS}


def final_metric(record: dict, metric: str) -> float:
    return record['stages'][-1]['metrics'][metric]


def summarise(runs: Dict[str, List[dict]], metric: str) -> List[dict]:
    """One row per pipeline: metric mean and std over seeds, mean costs, relative costs."""
    rows = []
    for name in [n for n in ORDER if n in runs] + sorted(set(runs) - set(ORDER)):
        records = runs[name]
        values = [final_metric(r, metric) for r in records]
        costs = [pipeline_cost(r) for r in records]
        rows.append(dict(
            pipeline=name, seeds=len(records), metric=statistics.mean(values),
            metric_std=statistics.stdev(values) if len(values) > 1 else 0.0,
            **{k: statistics.mean(c[k] for c in costs) for k in COSTS}))
    by_name = {r['pipeline']: r for r in rows}
    if 'dense' in runs:  # seeds share data order and init, so compare seed by seed
        dense = {r['seed']: final_metric(r, metric) for r in runs['dense']}
        for row in rows:
            deltas = [final_metric(r, metric) - dense[r['seed']]
                      for r in runs[row['pipeline']] if r['seed'] in dense]
            row['delta'] = statistics.mean(deltas)
            row['delta_std'] = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    for row in rows:
        for ref, key in (('dense', 'vs_dense'), ('moe', 'vs_moe')):
            if ref in by_name:
                row[key] = row['process_s'] / by_name[ref]['process_s'] - 1
                row[key + '_flops'] = row['train_flops'] / by_name[ref]['train_flops'] - 1
    return rows


def markdown_table(rows: List[dict], metric: str) -> str:
    lines = [f'| pipeline | {metric} | vs dense, same seed | seeds | wall (s) | CPU (s) | '
             'train GFLOPs | cost vs dense (CPU / FLOPs) | cost vs MoE (CPU / FLOPs) |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        def rel(key):
            return (f'{r[key]:+.1%} / {r[key + "_flops"]:+.1%}' if key in r else '-')
        delta = f'{r["delta"]:+.2f} ± {r["delta_std"]:.2f}' if 'delta' in r else '-'
        lines.append(
            f'| {LABELS.get(r["pipeline"], r["pipeline"])} | {r["metric"]:.2f} '
            f'± {r["metric_std"]:.2f} | {delta} | {r["seeds"]} | {r["wall_s"]:.0f} | '
            f'{r["process_s"]:.0f} | {r["train_flops"] / 1e9:.0f} | {rel("vs_dense")} | '
            f'{rel("vs_moe")} |')
    return '\n'.join(lines)


def plot(rows: List[dict], metric: str, path: str):
    """Accuracy against training FLOPs, one point per pipeline (error bar: std over seeds).

    The cost axis starts at zero and the legend gives each pipeline's cost over dense, so
    that a few percent more FLOPs look like a few percent (points of equal cost overlap, so
    the numbers go in the legend rather than beside them).

    Returns:
        matplotlib.figure.Figure: the figure written to ``path`` (already closed).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        x = r['train_flops'] / 1e9
        label = LABELS.get(r['pipeline'], r['pipeline'])
        if 'vs_dense_flops' in r:
            label += f' ({r["vs_dense_flops"]:+.1%} FLOPs)'
        ax.errorbar(x, r['metric'], yerr=r['metric_std'], fmt='o', capsize=4, label=label)
    ax.set_xlim(left=0, right=1.1 * max(r['train_flops'] for r in rows) / 1e9)
    ax.set_xlabel('training cost (GFLOPs, all stages)')
    ax.set_ylabel(metric)
    ax.set_title('RMoE pipelines: accuracy against cost')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower left')
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=120)
    plt.close(fig)
    return fig

"""Run the four RMoE pipelines (dense, RMoE-I, RMoE-D, MoE) stage by stage.

    python tools/run_pipelines.py work_dirs/pipelines \
        --cls-dense CONFIG --cls-rmoe CONFIG --seg-dense CONFIG --seg-rmoe CONFIG \
        --iters 400 20 200 --seeds 0 1 2 --cfg-options-cls data_root=... --cfg-options-seg ...

Finished stages are reused, so an interrupted run continues where it stopped. Then
`python tools/pipeline_report.py work_dirs/pipelines`.
"""
import argparse

from mmengine.config import DictAction

import rmoe_plugin  # noqa: F401
from rmoe_plugin.pipeline import make_pipelines, print_stage, run_pipeline
from rmoe_plugin.utils.known_warnings import KnownLogMessages, ignore_known_warnings


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('root', help='folder for every stage and pipeline record')
    for name in ('cls-dense', 'cls-rmoe', 'seg-dense', 'seg-rmoe'):
        p.add_argument(f'--{name}', required=True, help=f'{name} config')
    p.add_argument('--iters', type=int, nargs=3, required=True,
                   metavar=('UPSTREAM', 'INTERMEDIATE', 'DOWNSTREAM'))
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--pipelines', nargs='+', default=['dense', 'rmoe_d', 'rmoe_i', 'moe'])
    p.add_argument('--cfg-options-cls', nargs='+', action=DictAction, default={})
    p.add_argument('--cfg-options-seg', nargs='+', action=DictAction, default={})
    return p.parse_args()


def main():
    ignore_known_warnings()
    args = parse_args()
    configs = dict(cls_dense=args.cls_dense, cls_rmoe=args.cls_rmoe,
                   seg_dense=args.seg_dense, seg_rmoe=args.seg_rmoe)
    pipelines = make_pipelines(configs, *args.iters)
    unknown = set(args.pipelines) - set(pipelines)
    if unknown:
        raise SystemExit(f'error: --pipelines: unknown {sorted(unknown)}, '
                         f'expected some of {sorted(pipelines)}')
    options = {args.cls_dense: args.cfg_options_cls, args.cls_rmoe: args.cfg_options_cls,
               args.seg_dense: args.cfg_options_seg, args.seg_rmoe: args.cfg_options_seg}
    for seed in args.seeds:
        for name in args.pipelines:
            run_pipeline(name, pipelines[name], args.root, seed, options,
                         on_stage=print_stage, log_filter=KnownLogMessages())


if __name__ == '__main__':
    main()

"""The four pipelines of the RMoE paper, run stage by stage through mmengine's Runner.

    dense   dense upstream                       -> dense downstream
    rmoe_i  dense upstream -> RMoE intermediate  -> RMoE downstream
    rmoe_d  dense upstream                       -> RMoE downstream (converted at its start)
    moe     MoE upstream (from scratch)          -> RMoE downstream

Each stage's checkpoint initialises the next stage's backbone through ``init_cfg``; the dense
upstream stage runs once and serves three pipelines (its cost counts in each).
"""
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from mmengine.config import Config
from mmengine.runner import Runner

from ..fileio import atomic_write


@dataclass
class Stage:
    """One training stage.

    Attributes:
        name (str): 'upstream', 'intermediate' or 'downstream'.
        config (str): its config file.
        max_iters (int): its length in iterations.
        init_from (str, optional): the earlier stage whose checkpoint initialises the backbone.
        key (str, optional): stages with the same key are run once and shared.
    """
    name: str
    config: str
    max_iters: int
    init_from: Optional[str] = None
    key: Optional[str] = None


@dataclass
class StageResult:
    name: str
    config: str
    work_dir: str
    checkpoint: str
    cost: Dict[str, float]
    metrics: Dict[str, float] = field(default_factory=dict)


def make_pipelines(configs: Dict[str, str], upstream_iters: int, intermediate_iters: int,
                   downstream_iters: int) -> Dict[str, List[Stage]]:
    """The four pipelines from four configs: ``cls_dense``, ``cls_rmoe``, ``seg_dense``,
    ``seg_rmoe`` (the downstream configs may be detection ones)."""
    dense_up = Stage('upstream', configs['cls_dense'], upstream_iters, key='dense-upstream')
    return {
        'dense': [dense_up, Stage('downstream', configs['seg_dense'], downstream_iters,
                                  init_from='upstream')],
        'rmoe_i': [dense_up,
                   Stage('intermediate', configs['cls_rmoe'], intermediate_iters,
                         init_from='upstream'),
                   Stage('downstream', configs['seg_rmoe'], downstream_iters,
                         init_from='intermediate')],
        'rmoe_d': [dense_up, Stage('downstream', configs['seg_rmoe'], downstream_iters,
                                   init_from='upstream')],
        'moe': [Stage('upstream', configs['cls_rmoe'], upstream_iters, key='moe-upstream'),
                Stage('downstream', configs['seg_rmoe'], downstream_iters,
                      init_from='upstream')],
    }


def fit_schedule(schedulers: List[dict], max_iters: int) -> None:
    """Warm-up (LinearLR) as configured but at most a fifth of the stage, then the decay to
    the stage's end, so the same config serves stages of any length."""
    warmup_end = 0
    for scheduler in schedulers:
        if scheduler['type'] == 'LinearLR':
            warmup_end = scheduler['end'] = min(scheduler['end'], max(1, max_iters // 5))
        else:
            scheduler['begin'], scheduler['end'] = warmup_end, max_iters


def run_stage(stage: Stage, work_dir: str, init_checkpoint: Optional[str], seed: int,
              options: Dict, log_filter: Optional[logging.Filter] = None) -> StageResult:
    """Train one stage (skipped when ``work_dir`` holds a finished one), then test it.

    ``log_filter`` is added to the stage Runner's logger (a command line's way to hide
    known-harmless messages).
    """
    done = os.path.join(work_dir, 'result.json')
    if os.path.exists(done):
        with open(done) as f:
            return StageResult(**json.load(f))
    cfg = Config.fromfile(stage.config)
    cfg.merge_from_dict(options)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=seed)
    cfg.train_cfg.max_iters = stage.max_iters
    cfg.train_cfg.val_interval = stage.max_iters + 1  # evaluated once, by runner.test()
    cfg.default_hooks.checkpoint.interval = stage.max_iters
    fit_schedule(cfg.param_scheduler, stage.max_iters)
    cfg.model.backbone.init_cfg = (dict(type='Pretrained', checkpoint=init_checkpoint)
                                   if init_checkpoint else None)
    # Runners share a message hub, logger and visualizer when their names match (mmengine
    # names them by the second a Runner starts, the visualizer from the config): each stage
    # gets its own, or a short stage would log into the one before.
    started = time.strftime('%Y%m%d_%H%M%S')
    cfg.experiment_name = f'seed{seed}-{os.path.basename(work_dir)}-{started}'
    if cfg.get('visualizer'):
        cfg.visualizer.name = f'visualizer-{cfg.experiment_name}'
    runner = Runner.from_cfg(cfg)
    if log_filter is not None:
        runner.logger.addFilter(log_filter)
    runner.train()
    metrics = {k: float(v) for k, v in runner.test().items()}
    with open(os.path.join(work_dir, 'cost.json')) as f:
        cost = json.load(f)
    result = StageResult(stage.name, stage.config, work_dir,
                         os.path.join(work_dir, f'iter_{stage.max_iters}.pth'), cost, metrics)
    with atomic_write(done) as f:
        json.dump(asdict(result), f, indent=2)
    return result


# on_stage(pipeline, seed, result, reused, seconds): after each stage of run_pipeline.
StageCallback = Callable[[str, int, StageResult, bool, float], None]
# The metric a stage is shown with: segmentation or detection downstream, classification up.
STAGE_METRICS = ('mIoU', 'coco/bbox_mAP', 'accuracy/top1')


def format_stage(pipeline: str, seed: int, result: StageResult, reused: bool,
                 seconds: float) -> str:
    """A progress line for ``on_stage``: the stage, its time, the metric it reached."""
    metric = next((f'{k} {result.metrics[k]:.2f}' for k in STAGE_METRICS
                   if k in result.metrics), '')
    if reused:
        took = f'reused ({os.path.basename(result.work_dir)})'
    else:
        took = f'{seconds:4.0f} s (training {result.cost["wall_s"]:.0f} s)'
    return f'seed {seed}  {pipeline:7s} {result.name:12s} {took:28s} {metric}'.rstrip()


def print_stage(*stage) -> None:
    """An ``on_stage`` for command lines: :func:`format_stage`'s line, at once."""
    print(format_stage(*stage), flush=True)


def run_pipeline(name: str, stages: List[Stage], root: str, seed: int,
                 options: Dict[str, Dict], on_stage: Optional[StageCallback] = None,
                 log_filter: Optional[logging.Filter] = None) -> Dict:
    """Run (or reuse) every stage of one pipeline; write and return its record.

    Args:
        name (str): the pipeline ('dense', 'rmoe_i', ...).
        stages (list[Stage]): its stages, in order.
        root (str): folder of every seed's stages and records.
        seed (int): the seed of every stage.
        options (dict): config path -> ``--cfg-options``-style dict for its stages (data
            roots, say).
        on_stage (callable, optional): called after each stage with the pipeline's name, the
            seed, the stage's result, whether it was reused (finished earlier, or shared with
            a pipeline that ran it) and the seconds it took here. Default: None.
        log_filter (logging.Filter, optional): added to every stage Runner's logger.
            Default: None.
    """
    results: Dict[str, StageResult] = {}
    for stage in stages:
        folder = stage.key or f'{name}-{stage.name}'
        work_dir = os.path.join(root, f'seed{seed}', 'stages', folder)
        init = results[stage.init_from].checkpoint if stage.init_from else None
        reused = os.path.exists(os.path.join(work_dir, 'result.json'))
        start = time.perf_counter()
        results[stage.name] = run_stage(stage, work_dir, init, seed,
                                        options.get(stage.config, {}), log_filter)
        if on_stage is not None:
            on_stage(name, seed, results[stage.name], reused, time.perf_counter() - start)
    record = dict(pipeline=name, seed=seed,
                  stages=[asdict(results[s.name]) for s in stages])
    path = os.path.join(root, f'seed{seed}', f'{name}.json')
    with atomic_write(path) as f:
        json.dump(record, f, indent=2)
    return record

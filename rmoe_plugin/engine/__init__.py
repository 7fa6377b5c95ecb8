from .checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals
from .expert_parallel import RMoEDistributedDataParallel, install_runner_hooks
from .hooks import MoEStatsHook
from .launch import CPUSyncBatchNorm, run_tool, setup_launch  # noqa: F401

__all__ = ['MoEStatsHook', 'RMoEDistributedDataParallel', 'allow_mmengine_checkpoints',
           'install_runner_hooks', 'mmengine_checkpoint_globals']

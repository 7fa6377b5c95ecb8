from .checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals
from .hooks import MoEStatsHook
from .launch import CPUSyncBatchNorm, run_tool, setup_launch  # noqa: F401

__all__ = ['MoEStatsHook', 'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals']

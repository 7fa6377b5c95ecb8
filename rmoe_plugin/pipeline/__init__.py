"""Pipelines of the RMoE paper (dense, RMoE-I, RMoE-D, MoE), their cost and their report."""
from .cost import CostHook, forward_flops
from .report import load_runs, markdown_table, plot, summarise
from .run import Stage, format_stage, make_pipelines, print_stage, run_pipeline, run_stage

__all__ = ['CostHook', 'Stage', 'format_stage', 'forward_flops', 'load_runs', 'make_pipelines',
           'markdown_table', 'plot', 'print_stage', 'run_pipeline', 'run_stage', 'summarise']

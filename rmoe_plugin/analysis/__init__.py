"""Looking inside trained RMoE models: expert assignment maps, expert weight geometry, FLOPs.

The tools in ``tools/`` (``visualize_experts.py``, ``analyze_experts.py``, ``get_moe_flops.py``)
are thin command lines over these functions.
"""
from .build import build_from_config, moe_layers_by_name
from .expert_maps import assignment_map, token_grid
from .flops import MoELayerCost, moe_flops_report
from .weights import analyze_state_dict, find_rmoe_layers

__all__ = [
    'MoELayerCost', 'analyze_state_dict', 'assignment_map', 'build_from_config',
    'find_rmoe_layers', 'moe_flops_report', 'moe_layers_by_name', 'token_grid'
]

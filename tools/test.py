"""Test (and evaluate) with the ``tools/test.py`` of the config's framework, CPU processes too.

Same arguments and behaviour as mmseg's, mmdet's or mmpretrain's own ``tools/test.py`` (the
framework is the config's ``default_scope``). Without CUDA, ``--launcher pytorch|slurm|mpi``
tests data-parallel over gloo (see ``rmoe_plugin.engine.launch``)::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--show-dir DIR]
    torchrun --nproc_per_node 2 tools/test.py CONFIG CHECKPOINT --launcher pytorch
"""
from rmoe_plugin.engine.launch import run_tool
from rmoe_plugin.utils.known_warnings import ignore_known_warnings

if __name__ == '__main__':
    ignore_known_warnings()
    run_tool('test')

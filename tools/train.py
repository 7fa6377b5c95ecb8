"""Train with the ``tools/train.py`` of the config's framework, CPU processes included.

Same arguments and behaviour as mmseg's, mmdet's or mmpretrain's own ``tools/train.py`` (the
framework is the config's ``default_scope``); ``--resume`` takes an optional checkpoint path
for every framework. Without CUDA, ``--launcher pytorch|slurm|mpi`` trains data-parallel over
gloo (see ``rmoe_plugin.engine.launch``)::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options ...]
    torchrun --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch [--cfg-options ...]
"""
from rmoe_plugin.engine.launch import run_tool
from rmoe_plugin.utils.known_warnings import ignore_known_warnings

if __name__ == '__main__':
    ignore_known_warnings()
    run_tool('train')

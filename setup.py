from setuptools import find_packages, setup

# The lowest versions the code needs (the pinned, measured stack is requirements/constraints.txt).
install_requires = [
    # torch.serialization.add_safe_globals with (object, 'module.name') entries, which let a
    # checkpoint name numpy 1's or numpy 2's module for the same function; torch.autocast's
    # get_autocast_dtype(device_type).
    'torch>=2.6',
    # runner.checkpoint's loader tables and CheckpointLoader schemes as 0.10 has them,
    # mmengine.analysis (FLOP counting), HistoryBuffer.
    'mmengine>=0.10.0',
    'mmcv>=2.0.0,<2.2.0',  # mmdet 3.x and mmsegmentation 1.x refuse mmcv >= 2.2.0
    'mmsegmentation>=1.2.0',
    'mmdet>=3.2.0',
    'timm',  # the design card's stack; mmpretrain's TIMMBackbone wraps its models
    'numpy',
    'matplotlib',  # the pipeline report, expert maps and weight plots
]

setup(
    name='rmoe_plugin',
    version='0.1.0',
    description='Residual Mixture of Experts (RMoE) for vision transformers, as an OpenMMLab plugin',
    packages=find_packages(include=['rmoe_plugin', 'rmoe_plugin.*']),
    python_requires='>=3.9',
    install_requires=install_requires,
    extras_require={
        # the upstream classification stages of the pipelines (tools/demo.py, run_pipelines)
        'pipelines': ['mmpretrain>=1.2.0'],
    },
)

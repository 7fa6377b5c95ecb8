from setuptools import find_packages, setup

setup(
    name='rmoe_plugin',
    version='0.1.0',
    description='Residual Mixture of Experts (RMoE) for vision transformers, as an OpenMMLab plugin',
    packages=find_packages(include=['rmoe_plugin', 'rmoe_plugin.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.0',
        'mmengine>=0.10.0',
        'mmcv>=2.0.0,<2.2.0',
        'mmsegmentation>=1.2.0',
        'mmdet>=3.2.0',
        'timm',
    ],
)

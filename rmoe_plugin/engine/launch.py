"""Starting the frameworks' own train and test tools, on machines without CUDA too.

``tools/train.py`` and ``tools/test.py`` run the ``tools/train.py`` / ``tools/test.py`` that the
config's framework ships (its ``default_scope``: mmseg, mmdet or mmpretrain; the scripts
``mim train`` and ``mim test`` run) with their own arguments and behaviour, adding one step
just before the Runner is built: :func:`setup_launch`.

mmengine 0.10.7 cannot start several processes on a machine without CUDA: its launchers call
``torch.cuda.set_device``, its default backend is nccl, it gives DDP ``device_ids=[LOCAL_RANK]``,
and ``SyncBN`` refuses CPU tensors. There :func:`setup_launch` starts a gloo process group from
the launcher's environment (the Runner then skips its own ``init_dist``), lets DDP wrap a CPU
module and swaps ``SyncBN`` for :class:`CPUSyncBatchNorm`. With CUDA it changes nothing.
"""
import argparse
import datetime
import importlib.util
import os
import subprocess
import sys
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from mmengine.config import Config, DictAction
from mmengine.registry import MODEL_WRAPPERS, MODELS
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

FRAMEWORKS = ('mmseg', 'mmdet', 'mmpretrain')
LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
TOOLS = ('train', 'test')
# Norm types whose training forward needs CUDA once a process group exists.
CUDA_SYNC_BN = ('SyncBN', 'MMSyncBN', torch.nn.SyncBatchNorm)


@MODELS.register_module('CPUSyncBN')
class CPUSyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every process, on any backend (gloo too).

    torch's ``SyncBatchNorm`` raises on CPU tensors; this one all-reduces the per-channel sums
    with differentiable collectives, so CPU data-parallel training normalises over the global
    batch as ``SyncBN`` does on GPUs, and every replica keeps the same running statistics.
    Outside distributed training, and in eval mode, it is plain batch norm. Its parameters and
    buffers are those of ``BatchNorm2d``, so checkpoints move freely between the two.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f'CPUSyncBatchNorm expects (N, C, ...) input, got {input.dim()}D')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, ...) with batch statistics over every process when training."""
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Statistics in at least fp32, as torch's SyncBatchNorm keeps them under autocast.
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        count = torch.tensor(float(x.numel() // x.size(1)), dtype=torch.float64)
        dist.all_reduce(count)
        # Two passes (mean, then centred squares) rather than E[x^2] - E[x]^2, which cancels.
        mean = dist_fn.all_reduce(xs.sum(dims)) / count
        centred = xs - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor,
                              count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        unbiased = var * (count / (count - 1).clamp(min=1))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def setup_launch(cfg: Config) -> Config:
    """Prepare ``cfg`` for its ``launcher`` on this machine, just before the Runner is built.

    With CUDA, or with ``launcher='none'``, nothing changes. Otherwise the gloo process group
    is started from the launcher's environment, ``env_cfg.dist_cfg.backend`` becomes
    ``'gloo'``, ``model_wrapper_cfg`` makes DDP wrap a CPU module (``device_ids=None``; other
    settings, ``find_unused_parameters`` included, are kept) and ``SyncBN`` norm layers become
    ``CPUSyncBN``.

    Args:
        cfg: The config a framework tool is about to build its Runner from; changed in place.

    Returns:
        The same config.

    Raises:
        ValueError: ``cfg.launcher`` is unknown, or ``cfg.sync_bn`` asks for a CUDA-only
            conversion on a machine without CUDA.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher {launcher!r}: expected one of {LAUNCHERS}')
    if launcher == 'none' or torch.cuda.is_available():
        return cfg
    if cfg.get('sync_bn'):
        raise ValueError(
            f"sync_bn={cfg.sync_bn!r} converts BatchNorm to a CUDA-only SyncBatchNorm; without "
            "CUDA use norm_cfg=dict(type='SyncBN') in the model instead (run as CPUSyncBN)")
    env_cfg = dict(cfg.get('env_cfg') or {})
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    init_cpu_process_group(launcher, timeout=dist_cfg.get('timeout'), port=dist_cfg.get('port'))
    dist_cfg['backend'] = 'gloo'
    cfg.env_cfg = dict(env_cfg, dist_cfg=dist_cfg)
    cfg.model_wrapper_cfg = cpu_model_wrapper_cfg(cfg)
    replace_cuda_sync_bn(cfg.get('model'))
    return cfg


def init_cpu_process_group(launcher: str, timeout: Optional[float] = None,
                           port: Optional[int] = None) -> None:
    """Start the default process group with gloo from ``launcher``'s environment variables.

    Does what mmengine's ``init_dist`` does for each launcher, without its
    ``torch.cuda.set_device``. A group that already exists is left as it is.

    Args:
        launcher: 'pytorch' (torchrun), 'slurm' (srun) or 'mpi' (mpirun, Open MPI).
        timeout: Seconds a collective may wait; None for torch's default.
        port: Master port for 'slurm' (``dist_cfg.port`` as mmengine reads it).

    Raises:
        ValueError: ``launcher`` is not one of them.
        RuntimeError: a variable the launcher should have set is missing.
    """
    if dist.is_initialized():
        return
    set_rank_environment(launcher, port)
    kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
    dist.init_process_group(backend='gloo', init_method='env://', **kwargs)


def set_rank_environment(launcher: str, port: Optional[int] = None) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from ``launcher``'s own variables."""
    env = os.environ
    if launcher == 'pytorch':
        _require(env, ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'), launcher,
                 'start the processes with torchrun --nproc_per_node N')
        env.setdefault('LOCAL_RANK', env['RANK'])
    elif launcher == 'slurm':
        _require(env, ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'), launcher,
                 'start the processes with srun')
        if port is not None:
            env['MASTER_PORT'] = str(port)
        env.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = subprocess.getoutput(
                f"scontrol show hostname {env['SLURM_NODELIST']} | head -n1")
        env['WORLD_SIZE'] = env['SLURM_NTASKS']
        env['RANK'] = env['SLURM_PROCID']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', env['SLURM_PROCID'])
    elif launcher == 'mpi':
        _require(env, ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'MASTER_ADDR'),
                 launcher, 'start the processes with Open MPI mpirun and set MASTER_ADDR')
        env.setdefault('MASTER_PORT', '29500')
        env['WORLD_SIZE'] = env['OMPI_COMM_WORLD_SIZE']
        env['RANK'] = env['OMPI_COMM_WORLD_RANK']
        env['LOCAL_RANK'] = env.get('OMPI_COMM_WORLD_LOCAL_RANK', env['RANK'])
    else:
        raise ValueError(f"launcher {launcher!r}: expected 'pytorch', 'slurm' or 'mpi'")


def _require(env, names, launcher: str, hint: str) -> None:
    missing = [name for name in names if name not in env]
    if missing:
        raise RuntimeError(f'--launcher {launcher} needs the environment variables '
                           f'{", ".join(missing)}: {hint}')


def cpu_model_wrapper_cfg(cfg: Config) -> dict:
    """``cfg.model_wrapper_cfg`` with what DDP needs to wrap a CPU module.

    The type defaults to ``MMDistributedDataParallel``; a DDP type gets ``device_ids=None``
    and the defaults mmengine gives its own DDP (``broadcast_buffers=False``, the config's
    top-level ``find_unused_parameters``), where the user did not set them.
    """
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper_type = wrapper['type']
    if isinstance(wrapper_type, str):
        wrapper_type = MODEL_WRAPPERS.get(wrapper_type)
    if isinstance(wrapper_type, type) and issubclass(wrapper_type, DistributedDataParallel):
        wrapper['device_ids'] = None
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    return wrapper


def replace_cuda_sync_bn(node) -> None:
    """Turn every ``SyncBN``/``MMSyncBN`` norm config under ``node`` into ``CPUSyncBN``."""
    if isinstance(node, dict):
        if node.get('type') in CUDA_SYNC_BN:
            node['type'] = 'CPUSyncBN'
        for value in node.values():
            replace_cuda_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            replace_cuda_sync_bn(value)


def framework_tool(scope: str, tool: str) -> str:
    """Path of the ``tools/<tool>.py`` that the framework of ``scope`` ships.

    Args:
        scope: A config's ``default_scope``: 'mmseg', 'mmdet' or 'mmpretrain'.
        tool: 'train' or 'test'.

    Raises:
        ValueError: ``scope`` or ``tool`` is not supported.
        FileNotFoundError: the framework is not installed, or ships no such script.
    """
    if scope not in FRAMEWORKS:
        raise ValueError(f'default_scope {scope!r}: expected one of {FRAMEWORKS}')
    if tool not in TOOLS:
        raise ValueError(f'tool {tool!r}: expected one of {TOOLS}')
    spec = importlib.util.find_spec(scope)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f'default_scope {scope!r}: package {scope} is not installed')
    package_dir = os.path.dirname(spec.origin)
    # A wheel ships the tools under .mim/ (what mim runs); a source checkout at its root.
    candidates = [os.path.join(package_dir, '.mim', 'tools', f'{tool}.py'),
                  os.path.join(os.path.dirname(package_dir), 'tools', f'{tool}.py')]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f'{scope} ships no tools/{tool}.py (looked at {candidates})')


def split_resume_path(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """Take the checkpoint path out of ``--resume PATH`` / ``--resume=PATH``.

    mmseg's ``--resume`` is a bare flag while mmdet's and mmpretrain's take an optional path;
    the framework's tool gets the bare flag and :func:`run_tool` sets ``load_from`` itself.

    Returns:
        ``argv`` with a bare ``--resume``, and the path (None when none was given).
    """
    for i, token in enumerate(argv):
        if token.startswith('--resume='):
            return argv[:i] + ['--resume'] + argv[i + 1:], token.split('=', 1)[1]
        if token == '--resume' and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
            return argv[:i + 1] + argv[i + 2:], argv[i + 1]
    return argv, None


def config_scope(argv: List[str], tool: str) -> str:
    """The ``default_scope`` of the config named in the framework tool's arguments ``argv``."""
    parser = argparse.ArgumentParser(prog=f'tools/{tool}.py', add_help=False)
    parser.add_argument('config')
    # Options that take a value, so that theirs is never mistaken for the config.
    for option in ('--work-dir', '--out', '--show-dir', '--wait-time', '--launcher',
                   '--local_rank', '--local-rank', '--out-item'):
        parser.add_argument(option)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    args, _ = parser.parse_known_args(argv)
    scope = args.cfg_options.get('default_scope')
    if scope is None:
        scope = Config.fromfile(args.config).get('default_scope')
    if scope is None:
        raise ValueError(f'config {args.config} sets no default_scope, which picks the '
                         f'framework; set one of {FRAMEWORKS} (or --cfg-options default_scope=...)')
    return scope


class _SetUpFirst:
    """Stands for ``Runner`` or ``RUNNERS`` in a framework tool: prepares the config first."""

    def __init__(self, target, prepare):
        self._target = target
        self._prepare = prepare

    def from_cfg(self, cfg):
        return self._target.from_cfg(self._prepare(cfg))

    def build(self, cfg, *args, **kwargs):
        return self._target.build(self._prepare(cfg), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._target, name)


def _load_script(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(tool: str, argv: Optional[List[str]] = None) -> None:
    """Run the config's framework ``tools/<tool>.py`` with :func:`setup_launch` added.

    Args:
        tool: 'train' or 'test'.
        argv: The tool's arguments (default ``sys.argv[1:]``), as the framework's tool takes
            them; ``train`` also accepts ``--resume PATH`` for every framework.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if tool not in TOOLS:
        raise ValueError(f'tool {tool!r}: expected one of {TOOLS}')
    resume_from = None
    if tool == 'train':
        argv, resume_from = split_resume_path(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(f'usage: tools/{tool}.py CONFIG ... : the arguments of the tools/{tool}.py of '
              f"the config's framework ({', '.join(FRAMEWORKS)}); give a config to see them")
        return
    scope = config_scope(argv, tool)
    script = framework_tool(scope, tool)

    def prepare(cfg):
        if resume_from is not None:
            cfg.resume, cfg.load_from = True, resume_from
        return setup_launch(cfg)

    module = _load_script(script, f'_{scope}_tools_{tool}')
    for name in ('Runner', 'RUNNERS'):
        if hasattr(module, name):
            setattr(module, name, _SetUpFirst(getattr(module, name), prepare))
    saved_argv = sys.argv
    sys.argv = [script, *argv]
    try:
        module.main()
    finally:
        sys.argv = saved_argv

"""Expert parallelism against plain DDP: a training step's time at the same global batch, and
the parameter and optimizer-state memory each rank holds.

For each world size W, W processes (gloo on the CPU, nccl on GPUs) build the config's
segmentor twice with the same weights, one wrapped in ``MMDistributedDataParallel`` and one in
``RMoEDistributedDataParallel`` with P = W, and run their training steps interleaved on each
rank's own synthetic batch (AdamW as the config sets it).

    python tools/benchmark_expert_parallel.py                          # tiny UperNet, W = 2, 4
    python tools/benchmark_expert_parallel.py CONFIG --world-sizes 1 --device cuda --size 512
"""
import argparse
import os
import platform
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', nargs='?', default=TINY)
    p.add_argument('--world-sizes', type=int, nargs='+', default=[2, 4])
    p.add_argument('--batch-size', type=int, default=2, help='images per rank')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--threads', type=int, default=1, help='torch threads per CPU process')
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    return p.parse_args()


def memory(model, optimizer):
    """Bytes a rank holds, (expert residuals, everything else), of parameters and of state."""
    is_expert = {id(p): '.experts.residual_' in n for n, p in model.named_parameters()}

    def split(pairs):
        totals = [0, 0]
        for p, t in pairs:
            totals[0 if is_expert[id(p)] else 1] += t.numel() * t.element_size()
        return tuple(totals)
    state = [(p, t) for p in model.parameters() for t in optimizer.state.get(p, {}).values()
             if torch.is_tensor(t)]
    return {'parameters': split((p, p) for p in model.parameters()),
            'optimizer state': split(state)}


def worker(rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    device = torch.device('cuda', rank) if args.device == 'cuda' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        import rmoe_plugin
        from mmengine.logging import MMLogger
        from mmengine.model import MMDistributedDataParallel
        from mmengine.optim import build_optim_wrapper
        from rmoe_plugin.engine import RMoEDistributedDataParallel
        from rmoe_plugin.utils.backbone_benchmark import build_segmentor, synthetic_batch
        from rmoe_plugin.utils.known_warnings import hide_known_prints, ignore_known_warnings
        from rmoe_plugin.utils import interleaved_times
        rmoe_plugin.register_all_modules()
        ignore_known_warnings()
        MMLogger.get_instance('benchmark_expert_parallel', log_level='WARNING')
        ids = [device.index] if device.type == 'cuda' else None
        wrapped, optims = {}, {}
        for name, wrapper in (('ddp', MMDistributedDataParallel),
                              ('expert parallel', RMoEDistributedDataParallel)):
            torch.manual_seed(0)  # the same weights in both wrappers and on every rank
            with hide_known_prints():
                model = build_segmentor(args.config, args.size, device)
            extra = dict(expert_parallel_size=world_size) if name != 'ddp' else {}
            wrapped[name] = wrapper(module=model, device_ids=ids, **extra)
            optims[name] = build_optim_wrapper(wrapped[name], model.optim_cfg)
        batch = synthetic_batch(args.batch_size, args.size, seed=rank)
        steps = {name: (lambda m=m, o=optims[name]: m.train_step(batch, o))
                 for name, m in wrapped.items()}
        times = interleaved_times(steps, args.repeats, args.warmup, device)
        record = {name: dict(step=statistics.median(t),
                             **memory(wrapped[name].module, optims[name].optimizer))
                  for name, t in times.items()}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, record)
        if rank == 0:
            results[world_size] = gathered
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def mib(n: float) -> str:
    return f'{n / 2**20:.2f}'


def main():
    args = parse_args()
    results = mp.Manager().dict()
    for world_size in args.world_sizes:
        mp.spawn(worker, args=(world_size, free_port(), args, results), nprocs=world_size)
    where = (torch.cuda.get_device_name(0) if args.device == 'cuda'
             else f'{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} thread(s) '
                  'per process')
    print(f'torch {torch.__version__}, {where}; {os.path.relpath(args.config, ROOT)}, '
          f'{args.batch_size} x {args.size}x{args.size} per rank; median of {args.repeats} '
          'interleaved steps, slowest rank')
    print('\n| processes = P | DDP step (s) | expert-parallel step (s) | ratio |'
          '\n|---:|---:|---:|---:|')
    for world_size in args.world_sizes:
        ranks = results[world_size]
        ddp, ep = (max(r[name]['step'] for r in ranks) for name in ('ddp', 'expert parallel'))
        print(f'| {world_size} | {ddp:.3f} | {ep:.3f} | {ep / ddp:.2f}x |')
    print('\n| processes = P | MiB per rank | DDP: experts + rest | expert parallel: '
          'experts + rest |\n|---:|---|---:|---:|')
    for world_size in args.world_sizes:
        first = results[world_size][0]
        for kind in ('parameters', 'optimizer state'):
            d, e = first['ddp'][kind], first['expert parallel'][kind]
            print(f'| {world_size} | {kind} | {mib(d[0])} + {mib(d[1])} | '
                  f'{mib(e[0])} + {mib(e[1])} |')


if __name__ == '__main__':
    main()

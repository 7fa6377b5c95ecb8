#!/usr/bin/env python3
"""Check the OpenMMLab stack: imports, versions, and mmcv ops on CPU and CUDA.

Run by tools/gpu/install_stack.sh. On a machine without CUDA only the CPU
checks run (that is how it was tried here on the CPU). Exit status 0 when
every check that could run passed.
"""
import importlib
import sys
import time


def main():
    failures = []
    t0 = time.time()
    import torch
    print(f'python {sys.version.split()[0]}, torch {torch.__version__} '
          f'(CUDA {torch.version.cuda}), cuda available: '
          f'{torch.cuda.is_available()}')
    for name in ('numpy', 'cv2', 'mmengine', 'mmcv', 'mmseg', 'mmdet',
                 'mmpretrain', 'mim', 'timm', 'rmoe_plugin'):
        try:
            mod = importlib.import_module(name)
            print(f'  {name} {getattr(mod, "__version__", "")}  '
                  f'{getattr(mod, "__file__", "")}')
        except Exception as err:  # report every failure, not the first only
            failures.append(f'import {name}: {type(err).__name__}: {err}')
    try:
        import mmcv.ops  # noqa: F401
        from mmcv.ops import RoIAlign, nms
        from mmcv.ops.nms import batched_nms  # noqa: F401
    except Exception as err:
        failures.append(f'import mmcv.ops: {type(err).__name__}: {err}')
        return report(failures, t0)
    ext = importlib.import_module('mmcv._ext')
    print(f'  mmcv._ext {ext.__file__}')

    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    gen = torch.Generator().manual_seed(0)
    n = 2000
    xy = torch.rand(n, 2, generator=gen) * 500
    wh = torch.rand(n, 2, generator=gen) * 80 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=gen)
    feat = torch.randn(2, 16, 64, 64, generator=gen)
    idx = torch.randint(0, 2, (300, 1), generator=gen).float()
    r_xy = torch.rand(300, 2, generator=gen) * 200
    rois = torch.cat([idx, r_xy, r_xy + torch.rand(300, 2, generator=gen) * 50 + 1],
                     1)
    ref = {}
    for dev in devices:
        try:
            dets, keep = nms(boxes.to(dev), scores.to(dev), iou_threshold=0.5)
            keep = keep.cpu()
            align = RoIAlign((7, 7), spatial_scale=0.25, sampling_ratio=2,
                             aligned=True)
            out = align(feat.to(dev), rois.to(dev)).cpu()
            if dev == 'cuda':
                torch.cuda.synchronize()
            print(f'  {dev}: nms kept {keep.numel()} of {n} boxes; RoIAlign '
                  f'{tuple(out.shape)}, mean {out.mean():.5f}')
            if dev == 'cpu':
                ref = dict(keep=keep, out=out)
                try:
                    import torchvision
                    tv = torchvision.ops.nms(boxes, scores, 0.5)
                    if not torch.equal(tv, keep):
                        failures.append('cpu nms differs from torchvision.ops.nms')
                except ImportError:
                    pass
            else:
                # The same IoU in another rounding can flip a box at the threshold.
                diff = len(set(keep.tolist()) ^ set(ref['keep'].tolist()))
                print(f'  cuda vs cpu nms: {diff} boxes kept by one only')
                if diff > 1:
                    failures.append(f'cuda nms: {diff} boxes differ from cpu nms')
                rel = ((out - ref['out']).norm() / ref['out'].norm()).item()
                print(f'  cuda vs cpu RoIAlign: relative difference {rel:.2e}')
                if not rel < 1e-5:
                    failures.append(f'cuda RoIAlign differs from cpu: {rel:.2e}')
        except Exception as err:
            failures.append(f'{dev} ops: {type(err).__name__}: {err}')
    return report(failures, t0)


def report(failures, t0):
    for f in failures:
        print(f'FAILED {f}')
    print(f'check_stack: {"OK" if not failures else "FAILED"} '
          f'({time.time() - t0:.1f} s)')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())

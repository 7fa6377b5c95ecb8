"""`mim train` and the frameworks' own tools on the shipped configs, with tiny data."""
import os
import subprocess
import sys

import pytest
import torch

from rmoe_plugin.datasets import make_ade20k

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIM = os.path.join(os.path.dirname(sys.executable), 'mim')
SEG = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py')
DET = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_mask-rcnn_coco.py')


def run(*args, cwd, env=None):
    result = subprocess.run([MIM, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                            env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def parse_flops(output):
    line = next(line for line in output.splitlines() if line.startswith('Flops:'))
    value = line.split(':')[1].strip()
    return float(value[:-1]) * {'G': 1e9, 'M': 1e6, 'T': 1e12}[value[-1]]


def seg_data(root):
    return [f'{d}.dataset.data_root={root}'
            for d in ('train_dataloader', 'val_dataloader', 'test_dataloader')]


def det_data(root):
    ann = root + 'annotations/instances_val2017.json'
    return seg_data(root) + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


@pytest.fixture(scope='module')
def seg_run(tiny_data, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('seg')
    out = run('train', 'mmseg', SEG, '--gpus', '0', '--work-dir', str(work_dir),
              '--cfg-options', *seg_data(tiny_data['ade20k']), cwd=work_dir)
    return work_dir, out


def test_mim_train_mmseg_optimises_the_balance_loss(seg_run):
    work_dir, out = seg_run
    train_lines = [line for line in out.splitlines() if 'Iter(train)' in line]
    assert len(train_lines) == 4
    assert all('loss_moe_importance' in line for line in train_lines)
    assert 'mIoU' in out
    state = torch.load(work_dir / 'iter_4.pth', map_location='cpu')['state_dict']
    assert any('.moe.experts.residual_weights.' in k for k in state)


def test_mim_train_mmseg_resumes_with_moe_state(seg_run, tiny_data):
    work_dir, _ = seg_run
    out = run('train', 'mmseg', SEG, '--gpus', '0', '--work-dir', str(work_dir), '--resume',
              '--cfg-options', 'train_cfg.max_iters=6', 'train_cfg.val_interval=6',
              *seg_data(tiny_data['ade20k']), cwd=work_dir)
    assert 'resumed' in out.lower() and 'Iter(train) [5/6]' in out
    assert 'Iter(train) [1/6]' not in out


def test_mmseg_benchmark_runs_on_the_rmoe_config(seg_run, tmp_path):
    work_dir, _ = seg_run
    # mmseg's benchmark takes no --cfg-options and times 200 images: give it the config's
    # default data root, relative to where it runs, with 200 validation images.
    make_ade20k(str(tmp_path / 'data'), num_train=1, num_val=200, size=(64, 64))
    out = run('run', 'mmseg', 'benchmark', SEG, str(work_dir / 'iter_4.pth'),
              '--work-dir', str(tmp_path), cwd=tmp_path)
    assert 'Overall fps' in out
    # mmseg 1.2.2's get_flops fails on every config with mmengine 0.10.7 (it passes both
    # input_shape and inputs to get_model_complexity_info), so it is not exercised here.


def test_mim_train_mmdet_mask_rcnn_and_mmdet_tools(tiny_data, tmp_path):
    out = run('train', 'mmdet', DET, '--gpus', '0', '--work-dir', str(tmp_path),
              '--cfg-options', *det_data(tiny_data['coco']), cwd=tmp_path)
    train_lines = [line for line in out.splitlines() if 'Epoch(train)' in line]
    assert train_lines and all('loss_moe_importance' in line for line in train_lines)
    assert 'loss_mask' in train_lines[-1]
    flops = {}
    # get_flops traces forward(mode='tensor'): the RoI heads run on every RPN proposal (the
    # mask head on the first 100); the rcnn score threshold and NMS play no part there. The
    # RPN takes the top nms_pre anchors of each level, then drops boxes of zero width or height
    # (those decoded outside the image and clipped) and runs NMS, and how many boxes either
    # removes depends on the random weights (693 to 1000 proposals, up to 12M FLOPs, seen
    # here). With the size filter off (min_bbox_size < 0) and NMS suppressing nothing (no IoU
    # exceeds 1.0), the RPN keeps min(max_per_img, sum over levels of min(nms_pre, anchors))
    # = 1000 boxes on the 96x128 image whatever the weights: the FLOPs follow from the config.
    fixed_boxes = ['model.test_cfg.rpn.min_bbox_size=-1',
                   'model.test_cfg.rpn.nms.iou_threshold=1.0']
    for blocks in ('default', 'none'):  # 'none': the same Swin with every FFN dense
        options = fixed_boxes + ([] if blocks == 'default'
                                 else [f'model.backbone.moe_blocks={blocks}'])
        out = run('run', 'mmdet', 'get_flops', DET, '--num-images', '1', '--cfg-options',
                  *det_data(tiny_data['coco']), *options, cwd=tmp_path)
        flops[blocks] = parse_flops(out)
    print(f'get_flops: {flops}')
    # Top-1 RMoE costs what the dense model does plus its routers (18k FLOPs here). get_flops
    # prints three digits (0.369G: steps of 1M), so the two may differ by one printed step; an
    # RMoE layer that ran all 4 experts on every token would add about 9M.
    assert abs(flops['default'] - flops['none']) <= 1e6, flops
    out = run('run', 'mmdet', 'benchmark', DET, '--task', 'dataloader', '--dataset-type',
              'train', '--num-warmup', '1', '--max-iter', '6', '--log-interval', '1',
              '--cfg-options', *det_data(tiny_data['coco']), cwd=tmp_path)
    assert 'img / s' in out or 'fps' in out.lower()


def compile_events(output):
    """dynamo's recompiles and graph breaks, as TORCH_LOGS=recompiles,graph_breaks logs them
    (each line names the function or the code where it happened)."""
    return [line for line in output.splitlines()
            if 'Recompiling function' in line or 'in user code at' in line]


def test_mim_train_compiled_neither_recompiles_nor_breaks_in_the_rmoe_backbone(tiny_data,
                                                                              tmp_path):
    # (the Mask R-CNN config too, but in 100 s rather than 40: checked by hand, not here)
    env = dict(os.environ, TORCH_LOGS='recompiles,graph_breaks')
    # compile=True with the quick aot_eager backend; --cfg-options compile=True is inductor
    out = run('train', 'mmseg', SEG, '--gpus', '0', '--work-dir', str(tmp_path),
              '--cfg-options', 'compile.backend=aot_eager', *seg_data(tiny_data['ade20k']),
              cwd=tmp_path, env=env)
    train_lines = [line for line in out.splitlines() if '(train)' in line]
    assert train_lines and all('loss_moe_importance' in line for line in train_lines)
    events = compile_events(out)
    assert events  # the upstream parts (data preprocessor, losses, optimizer) do both
    ours = [e for e in events if 'rmoe_plugin' in e or 'backbones/swin.py' in e]
    assert ours == []

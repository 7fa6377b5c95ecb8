"""Evaluation outputs follow the weights, however the weights were changed.

After any change of the parameters, an evaluation forward (under ``torch.no_grad()`` or
``torch.inference_mode()``) must equal that of a freshly built layer or model loaded with the
same weights (``load_state_dict(old.state_dict())``). The changes covered are those that real
training code makes, each reaching the tensors its own way:

- optimizers write in place into the parameters;
- mmengine's ``EMAHook`` swaps the EMA weights in and out with ``p.data.copy_`` and its
  ``ExponentialMovingAverage`` updates them with ``p.data.lerp_``;
- mmdet's ``MeanTeacherHook`` moves the teacher with
  ``t.data.mul_(1 - m).add_(s.data, alpha=m)``;
- ``Module.to`` / ``half`` / ``double`` and ``torch.nn.utils.vector_to_parameters`` assign
  ``p.data = new_tensor``;
- ``load_state_dict`` copies in place (or, with ``assign=True``, puts new tensors in).

Writes through ``.data`` and ``p.data = ...`` leave ``p._version`` as it was, so anything
that remembers the weights of an earlier forward must not rely on it. Only public behaviour
is checked: outputs against a fresh instance. Every check also asserts that the outputs moved
by far more than the tolerance, so an output computed from the weights of an earlier forward
could not pass.
"""
import contextlib
import copy
import itertools
import os

import pytest
import torch
from mmcv.cnn.bricks.transformer import FFN
from mmdet.engine.hooks import MeanTeacherHook
from mmengine.config import Config
from mmengine.hooks import EMAHook, Hook
from mmengine.model import BaseModel
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import rmoe_plugin  # noqa: F401  (registers RMoEFFN and the RMoE models)
from rmoe_plugin import RMoEFFN
from rmoe_plugin.moe import MoEFeedForward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_upernet_ade20k.py')
DET = os.path.join(ROOT, 'tests', 'configs', 'tiny_rmoe_mask-rcnn_coco.py')
D, H = 16, 32
MOE = dict(num_experts=4, capacity_factor=1.0, eval_capacity_factor=None,
           residual_init_std=0.05, router_noise_std=0.0)
# An output that moved by less than this since the previous check would not show weights
# left over from an earlier forward; every weight change below moves them by far more.
MARGIN = 0.05


def tolerance(dtype):
    """What two correct forwards of the same weights may differ by.

    float32 / float64: torch's defaults (a few ulps through two matmuls). float16 / bfloat16:
    a correct implementation may form ``core + residual`` at a different precision on one path
    than on another, which changes a 16-bit weight by up to half an ulp (5e-4 / 4e-3
    relative); through a 32-wide dot product that stays well under these bounds, which are
    themselves far under MARGIN.
    """
    return {torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}.get(dtype, {})


# ----------------------------------------------------------------------------- layers

def build_layer(kind, seed=0):
    torch.manual_seed(seed)
    if kind == 'RMoEFFN.from_dense':
        return RMoEFFN.from_dense(FFN(D, H, act_cfg=dict(type='GELU')), top_k=1, **MOE)
    if kind == 'RMoEFFN-config':
        return ROOT_MODELS.build(dict(type='RMoEFFN', embed_dims=D, feedforward_channels=H,
                                      act_cfg=dict(type='GELU'), top_k=2, **MOE))
    assert kind == 'MoEFeedForward'
    return MoEFeedForward(D, H, top_k=2, **MOE)


def other_weights(kind, seed, dtype=torch.float32):
    """A layer of the same kind whose every parameter differs from ``build_layer``'s."""
    layer = build_layer(kind, seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype)


def dtype_of(layer):
    return next(layer.parameters()).dtype


def fresh_copy(layer, kind):
    """A newly built layer holding ``layer``'s weights, in ``layer``'s dtype and mode."""
    clone = build_layer(kind, seed=123).to(dtype_of(layer))
    clone.load_state_dict(layer.state_dict())
    return clone.train(layer.training)


def inputs():
    return 2 * torch.randn(2, 24, D, generator=torch.Generator().manual_seed(7))


def train_backward(layer, seed):
    """One training forward and backward of a fixed projection of the output."""
    layer.train()
    out = layer(inputs().to(dtype_of(layer)))
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * proj.to(out.dtype)).sum().backward()
    layer.eval()


MODES = {
    'no_grad': lambda: torch.no_grad(),
    'inference_mode': lambda: torch.inference_mode(),
}
# Patterns of the forwards between the changes. 'train-mode no_grad' is how a MoCo / BYOL
# momentum encoder runs (in training mode, without gradients); the others evaluate.
PATTERNS = {
    'no_grad': [('no_grad', False)],
    'inference_mode': [('inference_mode', False)],
    'alternating': [('no_grad', False), ('inference_mode', False)],
    'train-mode no_grad': [('no_grad', True)],
}


class Checker:
    """Runs a forward after each change and compares it with a fresh copy's."""

    def __init__(self, layer, kind, pattern):
        self.layer, self.kind = layer, kind
        self.modes = itertools.cycle(PATTERNS[pattern])
        self.count = 0
        self.seeds = itertools.count(1)  # each set of new weights differs from all before
        self.previous = self.check(moved=False)  # the first forward, before any change

    def forward(self, layer, mode, training):
        layer.train(training)
        with MODES[mode]():
            out = layer(inputs().to(dtype_of(layer)))
        layer.eval()
        return out.clone()

    def check(self, moved=True):
        mode, training = next(self.modes)
        got = self.forward(self.layer, mode, training)
        want = self.forward(fresh_copy(self.layer, self.kind), 'no_grad', training)
        assert got.dtype == want.dtype == dtype_of(self.layer)
        torch.testing.assert_close(got, want, **tolerance(got.dtype),
                                   msg=lambda m: f'forward {self.count} ({mode}): {m}')
        if moved:  # the change moved the outputs: stale weights could not pass
            assert (want.float() - self.previous.float()).abs().max() > MARGIN
        self.previous = want
        self.count += 1
        return want

    __call__ = check

    def new_weights(self, dtype=torch.float32):
        return other_weights(self.kind, next(self.seeds), dtype)


# Each scenario changes the layer's weights and calls check() after every change.

def optimizer_steps(optimizer):
    def scenario(layer, kind, check):
        opt = optimizer(layer.parameters())
        for i in range(2):
            train_backward(layer, seed=i)
            check(moved=False)  # after backward, before the step: nothing changed yet
            opt.step()
            opt.zero_grad()
            check()
    return scenario


def data_copy(layer, kind, check):
    for _ in range(2):
        for p, q in zip(layer.parameters(), check.new_weights().parameters()):
            p.data.copy_(q.data)
        check()


def ema_lerp(layer, kind, check):
    # mmengine's ExponentialMovingAverage.avg_func, applied to p.data by update_parameters.
    for _ in range(2):
        for p, q in zip(layer.parameters(), check.new_weights().parameters()):
            p.data.lerp_(q.data, 0.5)
        check()


def ema_swap(layer, kind, check):
    # mmengine's EMAHook._swap_ema_parameters: EMA weights in for validation, then back out.
    ema = check.new_weights()
    for _ in range(2):
        for p_avg, p_src in zip(ema.parameters(), layer.parameters()):
            tmp = p_avg.data.clone()
            p_avg.data.copy_(p_src.data)
            p_src.data.copy_(tmp)
        check()


def mean_teacher(layer, kind, check):
    # mmdet's MeanTeacherHook.momentum_update, ``layer`` the teacher: the student is copied in
    # before training (momentum 1), then followed after each of its optimizer steps.
    student = check.new_weights()
    opt = torch.optim.SGD(student.parameters(), lr=1.0)

    def momentum_update(momentum):
        for src, dst in zip(student.parameters(), layer.parameters()):
            dst.data.mul_(1 - momentum).add_(src.data, alpha=momentum)

    momentum_update(1)
    check()
    for i in range(2):
        train_backward(student, seed=i)
        opt.step()
        opt.zero_grad()
        momentum_update(0.5)
        check()


def data_assign(layer, kind, check):
    for _ in range(2):
        for p, q in zip(layer.parameters(), check.new_weights().parameters()):
            p.data = q.data.clone()
        check()


def flat_vector(layer, kind, check):
    # torch.nn.utils.vector_to_parameters points every parameter at a view of one vector;
    # the vector is then rewritten and loaded again (the same views, the same addresses).
    vec = parameters_to_vector(check.new_weights().parameters()).detach().clone()
    vector_to_parameters(vec, layer.parameters())
    check()
    vec.copy_(parameters_to_vector(check.new_weights().parameters()).detach())
    vector_to_parameters(vec, layer.parameters())
    check()


def load_state_dict(layer, kind, check):
    for _ in range(2):
        layer.load_state_dict(check.new_weights().state_dict())
        check()


def load_state_dict_assign(layer, kind, check):
    for _ in range(2):
        layer.load_state_dict(check.new_weights().state_dict(), assign=True)
        check()


def to_float64(layer, kind, check):
    layer.to(torch.float64)
    check(moved=False)  # the same values, in float64
    for p, q in zip(layer.parameters(), check.new_weights(torch.float64).parameters()):
        p.data.copy_(q.data)
    check()
    layer.float()
    check(moved=False)


def low_precision(layer, kind, check):
    # float16 where this CPU build runs it, bfloat16 otherwise; what the test needs is that a
    # 16-bit model follows its weights too.
    dtype = torch.float16 if half_supported() else torch.bfloat16
    layer.to(dtype)
    check(moved=False)
    for p, q in zip(layer.parameters(), check.new_weights(dtype).parameters()):
        p.data.copy_(q.data)
    check()
    layer.to(torch.float32)
    check(moved=False)


def half_round_trip(layer, kind, check):
    # .half().float() rounds every weight to float16 and back: new values in new tensors,
    # which the allocator may place where the old ones were.
    for _ in range(2):
        layer.half().float()
        check(moved=False)
        for p, q in zip(layer.parameters(), check.new_weights().parameters()):
            p.data.copy_(q.data)
        check()


def half_supported():
    try:
        torch.nn.functional.linear(torch.ones(2, 2, dtype=torch.float16),
                                   torch.ones(2, 2, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


SCENARIOS = {
    'optimizer SGD step': optimizer_steps(lambda ps: torch.optim.SGD(ps, lr=1.0)),
    'optimizer AdamW step': optimizer_steps(lambda ps: torch.optim.AdamW(ps, lr=0.05)),
    'p.data.copy_': data_copy,
    'p.data.lerp_ (EMA update)': ema_lerp,
    'EMAHook swap through .data': ema_swap,
    'MeanTeacher momentum through .data': mean_teacher,
    'p.data = tensor': data_assign,
    'vector_to_parameters': flat_vector,
    'load_state_dict': load_state_dict,
    'load_state_dict(assign=True)': load_state_dict_assign,
    'to(float64) and back': to_float64,
    'half or bfloat16 and back': low_precision,
    'half().float() round trip': half_round_trip,
}
KINDS = ['RMoEFFN.from_dense', 'RMoEFFN-config', 'MoEFeedForward']


@pytest.mark.parametrize('pattern', list(PATTERNS))
@pytest.mark.parametrize('scenario', list(SCENARIOS))
@pytest.mark.parametrize('kind', KINDS)
def test_layer_forward_follows_every_kind_of_weight_change(kind, scenario, pattern):
    layer = build_layer(kind).eval()
    residual = [p for n, p in layer.named_parameters() if 'residual' in n]
    assert residual and all(p.abs().sum() > 0 for p in residual)  # experts differ
    check = Checker(layer, kind, pattern)
    SCENARIOS[scenario](layer, kind, check)
    assert check.count >= 3


@pytest.mark.parametrize('kind', KINDS)
def test_a_long_interleaving_of_changes_and_forwards(kind):
    """Every kind of change one after the other, forwards alternating between modes."""
    layer = build_layer(kind).eval()
    check = Checker(layer, kind, 'alternating')
    for scenario in SCENARIOS.values():
        scenario(layer, kind, check)
    assert check.count > 30


# ------------------------------------------------------------------ models and runners

def load_cfg(config, data_root, work_dir):
    cfg = Config.fromfile(config)
    cfg.work_dir = str(work_dir)
    # Runners name their message hub, logger and visualizer after the experiment: one name
    # per test, so no runner picks up another's.
    cfg.experiment_name = f'eval_follows_weights_{os.path.basename(work_dir)}'
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[name].dataset.data_root = data_root
    # Residuals that differ between experts from the start, no routing noise, and no
    # warm-up: a few steps of a large learning rate move every weight a long way.
    cfg.model.backbone.moe_cfg.update(residual_init_std=0.02, router_noise_std=0.0)
    cfg.optim_wrapper = dict(type='OptimWrapper',
                             optimizer=dict(type='AdamW', lr=5e-3, weight_decay=0.01))
    cfg.param_scheduler = []
    cfg.randomness = dict(seed=0)
    cfg.log_level = 'WARNING'
    return cfg


def build_model(cfg, scope, state_dict=None):
    """A model built from ``cfg.model``, in eval mode, holding ``state_dict`` if given."""
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(copy.deepcopy(cfg.model))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def cloned(state_dict):
    return {k: v.detach().clone() for k, v in state_dict.items()}


@contextlib.contextmanager
def recording(backbone):
    """Records (input, outputs) of every forward of ``backbone``."""
    records = []
    handle = backbone.register_forward_hook(
        lambda module, args, out: records.append(
            (args[0].detach().clone(), [o.detach().clone() for o in out])))
    try:
        yield records
    finally:
        handle.remove()


def backbone_outputs(model, images):
    with torch.no_grad():
        return [o.clone() for o in model.backbone(images)]


def assert_backbone_matches(model, records, what):
    """Each recorded backbone forward equals ``model``'s (a fresh model) on its input.

    float32, the same weights and inputs: 1e-5 leaves room for a correct implementation that
    sums in another order on one path (float32 eps 1.2e-7, through a few dozen layers), and
    is far under what other weights change (MARGIN, and the test asserts it each time).
    """
    assert records, what
    for i, (images, outputs) in enumerate(records):
        for level, (got, want) in enumerate(zip(outputs, backbone_outputs(model, images))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f'{what}, forward {i}, level {level}: {m}')


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


class EvalRecorder(Hook):
    """Records what the model computes in evaluation, and with which weights.

    Priority LOW: it runs after ``EMAHook`` (NORMAL) at every stage, so before a validation
    epoch it sees the EMA weights swapped in. With ``live_forward`` it also evaluates the
    live weights on ``batch`` after each training iteration, as a hook drawing or scoring
    training-time predictions does.
    """
    priority = 'LOW'

    def __init__(self, batch, live_forward):
        self.batch = batch
        self.live_forward = live_forward
        self.live = []  # (weights, recorded backbone forwards) after each training iteration
        self.val = []  # (weights in the model, recorded backbone forwards) per validation

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.live_forward:
            runner.model.eval()
            with torch.no_grad(), recording(runner.model.backbone) as records:
                runner.model.test_step(self.batch)
            runner.model.train()
            self.live.append((cloned(runner.model.state_dict()), records))

    def before_val_epoch(self, runner):
        self._weights = cloned(runner.model.state_dict())
        self._recording = recording(runner.model.backbone)
        self.val.append((self._weights, self._recording.__enter__()))

    def after_val_epoch(self, runner, metrics=None):
        self._recording.__exit__(None, None, None)


def train_with_ema(tiny_data, work_dir, live_forward, iters=3):
    cfg = load_cfg(SEG, tiny_data['ade20k'], work_dir)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=iters)
    # mmengine's EMA: ema = (1 - m) * ema + m * live. m = 0.5 with lr 5e-3 leaves the EMA
    # well behind the live weights (the test checks by how much).
    cfg.custom_hooks = [dict(type='EMAHook', momentum=0.5)]
    runner = Runner.from_cfg(cfg)
    batch = next(iter(runner.build_dataloader(cfg.val_dataloader, seed=0)))
    recorder = EvalRecorder(batch, live_forward)
    runner.register_hook(recorder)
    runner.train()
    ema_hook = next(h for h in runner.hooks if isinstance(h, EMAHook))
    return cfg, runner, recorder, ema_hook, batch


@pytest.mark.parametrize('live_forward', [False, True], ids=['plain', 'after-live-eval'])
def test_ema_hook_validation_equals_a_model_loaded_with_the_ema_weights(
        tiny_data, tmp_path, live_forward):
    """mmengine's EMAHook through a real Runner on the tiny UperNet: the validation at the
    end of training evaluates exactly the EMA weights (those the checkpoint saves as the
    model's ``state_dict``), whatever evaluated the live weights before it."""
    cfg, runner, recorder, ema_hook, _ = train_with_ema(tiny_data, tmp_path, live_forward)
    checkpoint = torch.load(tmp_path / 'iter_3.pth', map_location='cpu')
    # EMAHook saves the EMA weights as the model's state_dict (and the live ones under
    # ema_state_dict), so that the checkpoint deploys the EMA model.
    ema_weights = checkpoint['state_dict']
    for k, v in ema_hook.ema_model.module.state_dict().items():
        torch.testing.assert_close(v, ema_weights[k], rtol=0, atol=0)
    assert any('residual_weights' in k and v.abs().sum() > 0 for k, v in ema_weights.items())

    (val_weights, val_records), = recorder.val
    for k, v in val_weights.items():  # the EMA weights were in the model for validation
        torch.testing.assert_close(v, ema_weights[k], rtol=0, atol=0, msg=k)
    assert len(val_records) == 4  # every validation image
    ema_model = build_model(cfg, 'mmseg', ema_weights)
    assert_backbone_matches(ema_model, val_records, 'validation with the EMA weights')

    # The live weights compute something else: validating them would not have passed.
    live_model = build_model(cfg, 'mmseg', cloned(runner.model.state_dict()))
    images = val_records[0][0]
    assert max_difference(backbone_outputs(live_model, images),
                          backbone_outputs(ema_model, images)) > MARGIN
    if live_forward:
        assert len(recorder.live) == 3
        for weights, records in recorder.live:
            assert_backbone_matches(build_model(cfg, 'mmseg', weights), records,
                                    'live weights after a training iteration')


def test_after_ema_validation_the_model_evaluates_its_own_weights_again(tiny_data, tmp_path):
    """After training has validated with the EMA weights swapped in (and back out), an
    evaluation of the model, as inference after training runs it, uses its own weights."""
    cfg, runner, recorder, ema_hook, batch = train_with_ema(tiny_data, tmp_path, False)
    assert len(recorder.val) == 1  # the validation at the end of training ran
    live_model = build_model(cfg, 'mmseg', cloned(runner.model.state_dict()))
    ema_model = build_model(cfg, 'mmseg', cloned(ema_hook.ema_model.module.state_dict()))
    runner.model.eval()
    with torch.no_grad(), recording(runner.model.backbone) as records:
        runner.model.test_step(batch)
    assert_backbone_matches(live_model, records, 'the model after training')
    images = records[0][0]
    assert max_difference(backbone_outputs(live_model, images),
                          backbone_outputs(ema_model, images)) > MARGIN


class MeanTeacherDetector(BaseModel):
    """A student and a teacher, as mmdet's ``SemiBaseDetector`` holds them, driven by mmdet's
    own ``MeanTeacherHook`` (which needs only ``model.student`` and ``model.teacher``).

    As in ``SemiBaseDetector``, the teacher is frozen and, on every training iteration,
    predicts in eval mode under ``torch.no_grad()`` (its predictions are the pseudo-labels);
    the student trains. This stand-in trains the student on the labelled batch only and
    records what the teacher's backbone computed, with the teacher weights it held.
    """

    def __init__(self, cfg):
        with DefaultScope.overwrite_default_scope('mmdet'):
            from mmdet.registry import MODELS
            preprocessor = MODELS.build(copy.deepcopy(cfg.model.data_preprocessor))
        super().__init__(data_preprocessor=preprocessor)
        self.student = build_model(cfg, 'mmdet')
        self.teacher = build_model(cfg, 'mmdet')
        self.teacher.requires_grad_(False)  # SemiBaseDetector.freeze
        self.records = []  # (teacher weights, recorded teacher backbone forwards)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        assert mode == 'loss'
        weights = cloned(self.teacher.state_dict())
        with torch.no_grad(), recording(self.teacher.backbone) as records:
            self.teacher.eval()
            self.teacher.predict(inputs, copy.deepcopy(data_samples), rescale=False)
        self.records.append((weights, records))
        return self.student.loss(inputs, data_samples)


def test_mean_teacher_predicts_with_the_weights_mean_teacher_hook_gave_it(tiny_data, tmp_path):
    """mmdet's MeanTeacherHook through a real Runner on the tiny RMoE Mask R-CNN: at every
    iteration the teacher predicts with the weights the hook last wrote into it (through
    ``.data``), exactly as a fresh detector loaded with those weights does."""
    cfg = load_cfg(DET, tiny_data['coco'], tmp_path)
    model = MeanTeacherDetector(cfg)
    runner = Runner(
        model=model, work_dir=str(tmp_path), train_dataloader=cfg.train_dataloader,
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=4),
        optim_wrapper=cfg.optim_wrapper, default_hooks=dict(checkpoint=None),
        # mmdet's convention: teacher = (1 - m) * teacher + m * student. m = 0.5 moves the
        # teacher half-way to the student on every iteration.
        custom_hooks=[MeanTeacherHook(momentum=0.5)],
        default_scope='mmdet', randomness=dict(seed=0), log_level='WARNING',
        experiment_name=cfg.experiment_name)
    runner.train()
    assert len(model.records) == 4
    previous = None
    for i, (weights, records) in enumerate(model.records):
        fresh = build_model(cfg, 'mmdet', weights)
        assert_backbone_matches(fresh, records, f'teacher at iteration {i}')
        if previous is not None:  # the hook moved the teacher: stale weights would show
            images, outputs = previous
            assert max_difference(outputs, backbone_outputs(fresh, images)) > MARGIN
        previous = records[0]
    # After training, the teacher (as mmdet evaluates it with predict_on='teacher') too.
    images = model.records[-1][1][0][0]
    teacher = model.teacher.eval()
    with torch.no_grad(), recording(teacher.backbone) as records:
        teacher.backbone(images)
    assert_backbone_matches(build_model(cfg, 'mmdet', cloned(teacher.state_dict())), records,
                            'teacher after training')

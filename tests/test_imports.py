"""What importing the plugin brings in, and that registration never depends on import order."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENMMLAB = ('mmcv', 'mmengine', 'mmseg', 'mmdet', 'mmpretrain')
BLOCK_OPENMMLAB = f'''
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {OPENMMLAB!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
sys.meta_path.insert(0, Absent())
'''
RUN_LAYER = '''
import torch
from rmoe_plugin.moe import MoEFeedForward
layer = MoEFeedForward(8, 16, num_experts=4, top_k=2)
x = torch.randn(3, 5, 8, requires_grad=True)
layer(x).sum().backward()
assert x.grad.shape == x.shape and layer.router.weight.grad is not None
'''


def run(code: str) -> str:
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_layer_imports_and_trains_without_loading_openmmlab():
    loaded = run('import sys, rmoe_plugin.moe\n' + RUN_LAYER + f'''
print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPENMMLAB!r} + ('timm',))))
''')
    assert loaded.strip() == '[]'


def test_without_openmmlab_installed_the_layer_works_and_the_glue_says_what_is_missing():
    out = run(BLOCK_OPENMMLAB + 'import rmoe_plugin\n' + RUN_LAYER + '''
try:
    rmoe_plugin.RMoEFFN
except ModuleNotFoundError as e:
    print('missing', e.name)
''')
    assert out.split()[0] == 'missing' and out.split()[1].strip("'").split('.')[0] in OPENMMLAB


def test_a_config_read_after_the_plugin_was_imported_still_finds_its_modules():
    # custom_imports is a no-op for a package imported earlier: registration must not rely on it
    out = run('''
import rmoe_plugin
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS
cfg = Config.fromfile('tests/configs/tiny_rmoe_upernet_ade20k.py')
cfg.model.backbone.init_cfg = None
with DefaultScope.overwrite_default_scope('mmseg'):
    backbone = MODELS.build(cfg.model.backbone)
print(type(backbone).__name__, len(backbone.moe_layers()))
''')
    name, layers = out.split()
    assert name == 'RMoESwinTransformer' and int(layers) > 0


def test_importing_the_plugin_after_openmmlab_registers_at_once():
    out = run('''
from mmdet.registry import MODELS
import rmoe_plugin
print('RMoESwinTransformer' in MODELS.module_dict, 'RMoEMaskRCNN' in MODELS.module_dict)
''')
    assert out.split() == ['True', 'True']


def test_a_checkpoint_loaded_before_any_build_is_loaded_weights_only(tmp_path):
    # import rmoe_plugin, then mmengine's load_checkpoint of a URL (whose upstream loader
    # unpickles anything) with no registry lookup between: the weights-only loaders serve it
    out = run(f'''
import functools, http.server, os, threading, torch, rmoe_plugin
os.environ['TORCH_HOME'] = {str(tmp_path / 'torch')!r}
class Payload:
    def __reduce__(self):
        return (print, ('payload ran',))
torch.save({{'state_dict': {{}}, 'x': Payload()}}, {str(tmp_path / 'evil.pth')!r})
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory={str(tmp_path)!r})
httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
from mmengine.runner import load_checkpoint
try:
    load_checkpoint(torch.nn.Linear(1, 1), f'http://127.0.0.1:{{httpd.server_address[1]}}/evil.pth')
except ValueError as e:
    print('refused:', e)
httpd.shutdown()
''')
    assert 'payload ran' not in out and 'refused:' in out and '/evil.pth' in out

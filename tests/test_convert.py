"""torchvision state dict -> Flax conversion: logits parity, file formats, errors.

The PyTorch reference ResNets (tests/torch_resnets.py) have exactly torchvision's keys.
"""
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the converter parity tests need torch')

from dfnas_jax import models, teachers  # noqa: E402
from dfnas_jax.teachers import convert  # noqa: E402
from tests.torch_resnets import (  # noqa: E402
  CIFAR_MEAN,
  CIFAR_STD,
  compare_logits,
  images_like,
  state_dict_np,
  template_for,
  torch_resnet,
  user_teacher,
)


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
  """PyTorch's CPU thread pool stalls badly when other processes hold the cores."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def test_torch_key():
  assert convert.torch_key(('params', 'layer1_0', 'conv1', 'kernel')) == 'layer1.0.conv1.weight'
  assert convert.torch_key(('params', 'layer2_0', 'downsample_0', 'kernel')) == \
      'layer2.0.downsample.0.weight'
  assert convert.torch_key(('params', 'layer2_0', 'downsample_1', 'scale')) == \
      'layer2.0.downsample.1.weight'
  assert convert.torch_key(('batch_stats', 'bn1', 'mean')) == 'bn1.running_mean'
  assert convert.torch_key(('batch_stats', 'layer4_1', 'bn2', 'var')) == 'layer4.1.bn2.running_var'
  assert convert.torch_key(('params', 'fc', 'bias')) == 'fc.bias'


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_logits_match_torch(name):
  model = torch_resnet(name, num_classes=10)
  module = models.build_model(name, num_classes=10)
  variables = convert.convert(state_dict_np(model), template_for(module))
  diff, logits = compare_logits(module, variables, model, images_like(64, n=2))
  scale, spread = np.abs(logits).max(), np.abs(logits[0] - logits[1]).max()
  print(f'{name}: max |logit diff| {diff:.3g}, max |logit| {scale:.3g}, '
        f'max |logit difference between the two images| {spread:.3g}')
  # Logits O(1-10) that depend on the image: a meaningful test, not float32 noise.
  assert 1.0 < scale < 30.0 and spread > 0.5
  assert diff < 1e-4


@pytest.fixture(scope='module')
def resnet18_1000():
  model = torch_resnet('resnet18', num_classes=1000, seed=1)
  return model, state_dict_np(model)


@pytest.mark.parametrize('ext', ['.pth', '.npz', '.safetensors'])
def test_file_formats_round_trip(tmp_path, resnet18_1000, ext):
  model, state = resnet18_1000
  path = str(tmp_path / f'resnet18{ext}')
  if ext == '.pth':
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
  elif ext == '.npz':
    np.savez(path, **state)
  else:
    from safetensors.numpy import save_file
    save_file(state, path)
  read = convert.read_state_dict(path)
  assert sorted(read) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(read[k], v, err_msg=k)
  if ext == '.npz':  # the zoo loader, end to end: 1000-class ImageNet ResNet-18
    module, variables, spec = teachers.load('resnet18', checkpoint=path)
    assert spec.num_classes == 1000
    expected = convert.convert(state, template_for(module))
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, expected)


def test_mismatches_listed_in_one_error(resnet18_1000):
  module = models.build_model('resnet18', num_classes=1000)
  state = dict(resnet18_1000[1])
  del state['layer3.1.bn2.running_var']
  state['layer5.0.conv1.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  state['fc.weight'] = np.zeros((7, 512), np.float32)
  with pytest.raises(ValueError) as e:
    convert.convert(state, template_for(module), source='bad.pth')
  message = str(e.value)
  assert 'bad.pth' in message and '3 problems' in message
  assert 'missing: layer3.1.bn2.running_var' in message
  assert 'unexpected: layer5.0.conv1.weight' in message
  assert 'shape mismatch: fc.weight is (7, 512), expected (1000, 512)' in message


def test_unsupported_or_missing_file(tmp_path):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match=r'weights\.h5.*unsupported extension'):
    convert.read_state_dict(str(path))
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    convert.read_state_dict(str(tmp_path / 'nowhere.pth'))


def test_cli_writes_msgpack(tmp_path, resnet18_1000):
  from dfnas_jax import workdir as wd
  _, state = resnet18_1000
  src, dst = str(tmp_path / 'r18.npz'), str(tmp_path / 'r18.msgpack')
  np.savez(src, **state)
  convert.main(['--architecture', 'resnet18', '--num_classes', '1000',
                '--input', src, '--output', dst])
  variables = wd.load_variables(dst)
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['downsample_1']['var'],
                                state['layer2.0.downsample.1.running_var'])


def test_cli_writes_a_teacher_directory_every_stage_can_load(tmp_path):
  """A user's 10-class, 32 px CIFAR ResNet-18: classes, size, normalization and names travel."""
  out, model = user_teacher(str(tmp_path))
  src = str(tmp_path / 'user.pth')
  module, variables, spec = teachers.load(out)
  assert (spec.num_classes, spec.image_size, spec.class_names) == (
      10, 32, teachers.CIFAR10_CLASSES)
  assert tuple(module.mean) == CIFAR_MEAN and tuple(module.std) == CIFAR_STD
  diff, _ = compare_logits(module, variables, model, images_like(32, n=2))
  assert diff < 1e-4  # the torch model fed images normalized with the given statistics
  assert teachers.get(out) == spec  # what the stages' config checks read
  with pytest.raises(SystemExit):
    convert.main(['--architecture', 'resnet18', '--num_classes', '10', '--mean', '0.5,0.5,0.5',
                  '--input', src, '--output', str(tmp_path / 'other')])

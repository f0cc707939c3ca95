"""torchvision state dict -> Flax conversion: logits parity, file formats, errors.

The PyTorch reference ResNets below use torchvision's module names and layout
(v1.5 bottleneck, 3x3/2 max-pool with padding 1, BatchNorm eps 1e-5), so their
state dicts have exactly torchvision's keys.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn  # noqa: E402

from dfnas_jax import models, teachers  # noqa: E402
from dfnas_jax.models import resnet  # noqa: E402
from dfnas_jax.teachers import convert  # noqa: E402


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
  """PyTorch's CPU thread pool stalls badly when other processes hold the cores."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)  # v1.5: stride on the 3x3
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = conv1x1(planes, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class TorchResNet(nn.Module):

  def __init__(self, block, layers, num_classes):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHS = {'resnet18': (BasicBlock, (2, 2, 2, 2)), 'resnet50': (Bottleneck, (3, 4, 6, 3))}


def images_like(size, n=2, seed=0):
  """Images in [0, 1] with coarse structure, so pooled features differ per image."""
  r = np.random.RandomState(seed)
  coarse = r.uniform(0, 1, (n, 4, 4, 3)).repeat(size // 4, 1).repeat(size // 4, 2)
  return (0.7 * coarse + 0.3 * r.uniform(0, 1, (n, size, size, 3))).astype(np.float32)


def to_torch(images, mean=resnet.IMAGENET_MEAN, std=resnet.IMAGENET_STD):
  """NHWC images in [0, 1] -> normalized NCHW tensor, as torchvision models expect."""
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_resnet(name, num_classes, seed=0, size=64):
  """Eval-mode reference with random BatchNorm statistics and affine parameters.

  Running statistics are first measured on a few images (train-mode pass) and then
  perturbed: purely random statistics swamp the image-dependent signal, leaving
  logits that barely depend on the input and so prove little. The last BatchNorm of
  each residual branch gets a small gamma, as in trained ResNets: with gamma ~0.75
  the residual stream grows through ResNet-50's 16 blocks until float32 rounding
  alone moves its logits by ~1.5e-4 (PyTorch float32 vs float64); damped, ~3e-5.
  """
  torch.manual_seed(seed)
  block, layers = ARCHS[name]
  model = TorchResNet(block, layers, num_classes)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.weight.uniform_(0.5, 1.0)
      m.bias.uniform_(-0.2, 0.2)
      m.reset_running_stats()
      m.momentum = None  # cumulative average over the calibration pass
    for m in model.modules():
      if isinstance(m, (BasicBlock, Bottleneck)):
        (m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight.uniform_(0.2, 0.5)
    model.fc.weight.normal_(0.0, 3.0 / model.fc.in_features ** 0.5)
    model.fc.bias.uniform_(-1.0, 1.0)
    model.train()
    model(to_torch(images_like(size, n=8, seed=seed + 100)))
    for m in bns:
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
      m.running_mean.add_(0.1 * torch.randn_like(m.running_mean) * m.running_var.sqrt())
      m.num_batches_tracked.fill_(7)
  return model.eval()


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def template_for(module, size=32):
  return jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))


def compare_logits(module, variables, model, images):
  """(max |flax - torch| logits, torch logits) for the same images in [0, 1]."""
  flax_logits = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(images)))
  with torch.no_grad():
    torch_logits = model(to_torch(images, module.mean, module.std)).numpy()
  assert flax_logits.shape == torch_logits.shape
  return np.abs(flax_logits - torch_logits).max(), torch_logits


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
  model = torch_resnet('resnet18', num_classes=10, size=32)
  src, out = str(tmp_path / 'user.pth'), str(tmp_path / 'my_teacher')
  torch.save(model.state_dict(), src)
  names = tmp_path / 'classes.txt'
  names.write_text('\n'.join(teachers.CIFAR10_CLASSES) + '\n')
  convert.main(['--architecture', 'resnet18', '--num_classes', '10', '--image_size', '32',
                '--mean', '0.4914,0.4822,0.4465', '--std', '0.2470,0.2435,0.2616',
                '--class_names', str(names), '--input', src, '--output', out])
  module, variables, spec = teachers.load(out)
  assert (spec.num_classes, spec.image_size, spec.class_names) == (
      10, 32, teachers.CIFAR10_CLASSES)
  assert tuple(module.mean) == (0.4914, 0.4822, 0.4465)
  assert tuple(module.std) == (0.2470, 0.2435, 0.2616)
  diff, _ = compare_logits(module, variables, model, images_like(32, n=2))
  assert diff < 1e-4  # the torch model fed images normalized with the given statistics
  assert teachers.get(out) == spec  # what the stages' config checks read
  with pytest.raises(SystemExit):
    convert.main(['--architecture', 'resnet18', '--num_classes', '10', '--mean', '0.5,0.5,0.5',
                  '--input', src, '--output', str(tmp_path / 'other')])

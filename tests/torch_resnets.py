"""PyTorch reference ResNets with torchvision's module names and layout (v1.5
bottleneck, 3x3/2 max-pool with padding 1, BatchNorm eps 1e-5), so their state dicts
have exactly torchvision's keys; and a user's own CIFAR-10 teacher converted from one.
Needs torch (a test dependency).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from dfnas_jax import teachers
from dfnas_jax.models import resnet
from dfnas_jax.teachers import convert

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


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


def user_teacher(directory):
  """(teacher directory, torch model): a 10-class, 32 px ResNet-18 in torchvision's layout
  with CIFAR normalization and class names, converted as a user would (the CLI)."""
  model = torch_resnet('resnet18', num_classes=10, size=32)
  os.makedirs(directory, exist_ok=True)
  src, out = os.path.join(directory, 'user.pth'), os.path.join(directory, 'my_teacher')
  torch.save(model.state_dict(), src)
  names = os.path.join(directory, 'classes.txt')
  with open(names, 'w') as f:
    f.write('\n'.join(teachers.CIFAR10_CLASSES) + '\n')
  convert.main(['--architecture', 'resnet18', '--num_classes', '10', '--image_size', '32',
                '--mean', ','.join(map(str, CIFAR_MEAN)), '--std', ','.join(map(str, CIFAR_STD)),
                '--class_names', names, '--input', src, '--output', out])
  return out, model

"""The teacher zoo: pretrained classifiers by name, with their weights.

`load('cifar10_resnet20')` returns a Flax module and its variables. Modules take
images in [0, 1] and carry their own normalization. ImageNet teachers need a
torchvision checkpoint (`.pth`, `.npz`, `.safetensors`) or one already converted
to `.msgpack` by `python -m dfnas_jax.teachers.convert`.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfnas_jax import models
from dfnas_jax import workdir as wd

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), 'weights')
MODEL_JSON = 'model.json'
VARIABLES = 'variables.msgpack'


CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')


@dataclasses.dataclass(frozen=True)
class Teacher:
  name: str
  architecture: str       # key of dfnas_jax.models.ARCHITECTURES
  num_classes: int
  image_size: int
  weights: Optional[str]  # file in WEIGHTS_DIR; None: the user supplies a checkpoint
  description: str = ''
  class_names: Optional[Tuple[str, ...]] = None
  # The per-channel input normalization it was trained with; None: the architecture's.
  mean: Optional[Tuple[float, ...]] = None
  std: Optional[Tuple[float, ...]] = None

  def module(self, dtype: Any = jnp.float32, **overrides) -> nn.Module:
    if self.mean is not None:
      overrides = dict(mean=self.mean, std=self.std, **overrides)
    return models.build_model(self.architecture, self.num_classes, dtype=dtype, **overrides)


TEACHERS: Dict[str, Teacher] = {t.name: t for t in [
    Teacher('cifar10_resnet20', 'cifar_resnet20', 10, 32, 'cifar10_resnet20.msgpack',
            'CIFAR-10 ResNet-20 trained by configs/teacher.py; see weights/cifar10_resnet20.md',
            CIFAR10_CLASSES),
    Teacher('resnet18', 'resnet18', 1000, 224, None, 'torchvision ResNet-18, ImageNet'),
    Teacher('resnet34', 'resnet34', 1000, 224, None, 'torchvision ResNet-34, ImageNet'),
    Teacher('resnet50', 'resnet50', 1000, 224, None, 'torchvision ResNet-50, ImageNet'),
]}


@dataclasses.dataclass(frozen=True)
class AtInputSize:
  """A teacher whose `apply` first resizes images to its input size, so it labels a
  student's view of any size as it would see that view."""
  module: nn.Module
  image_size: int

  def apply(self, variables, images, train: bool = False):
    n, height, width, channels = images.shape
    if (height, width) != (self.image_size, self.image_size):
      images = jax.image.resize(images, (n, self.image_size, self.image_size, channels),
                                'bilinear')
    return self.module.apply(variables, images, train=train)


def get(name: str) -> Teacher:
  """The description of a zoo teacher or of a trained-model directory (no weights read)."""
  if os.path.isdir(name):
    spec_path = os.path.join(name, MODEL_JSON)
    if not os.path.isfile(spec_path):
      raise FileNotFoundError(f'{name} is a directory but has no {MODEL_JSON}; expected a '
                              'directory written by the teacher or retrain stage.')
    with open(spec_path) as f:
      fields = json.load(f)
    for key in ('class_names', 'mean', 'std'):
      fields[key] = fields.get(key) and tuple(fields[key])
    return Teacher(**fields)
  if name not in TEACHERS:
    raise ValueError(f'Unknown teacher {name!r}; known teachers: {sorted(TEACHERS)} '
                     f'(or a directory holding {MODEL_JSON} and {VARIABLES}).')
  return TEACHERS[name]


def save_trained(directory: str, teacher: Teacher, variables) -> None:
  """Writes a trained model as `model.json` + `variables.msgpack`, loadable by `load`."""
  os.makedirs(directory, exist_ok=True)
  wd.save_variables(os.path.join(directory, VARIABLES), variables)
  wd.write_json(os.path.join(directory, MODEL_JSON), dataclasses.asdict(
      dataclasses.replace(teacher, weights=VARIABLES)))


def load(name: str, checkpoint: Optional[str] = None,
         dtype: Any = jnp.float32) -> Tuple[nn.Module, Dict[str, Any], Teacher]:
  """(module, {'params', 'batch_stats'}, spec) for a zoo name or a trained-model directory.

  `checkpoint` overrides the weights: a `.msgpack` of Flax variables or a
  torchvision-style state dict (`.pth`/`.pt`, `.npz`, `.safetensors`).
  """
  spec = get(name)
  weights_path = spec.weights and os.path.join(name if os.path.isdir(name) else WEIGHTS_DIR,
                                               spec.weights)
  module = spec.module(dtype=dtype)
  path = checkpoint or weights_path
  if not path:
    raise ValueError(f'Teacher {spec.name!r} ships no weights: pass a checkpoint '
                     '(torchvision .pth/.npz/.safetensors or converted .msgpack).')
  template = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, spec.image_size, spec.image_size, 3)), train=False))
  if path.endswith('.msgpack'):
    variables = wd.load_variables(path)
    check_matches(variables, template, path)
  else:
    from dfnas_jax.teachers import convert  # torch is optional
    variables = convert.convert(convert.read_state_dict(path), template, source=path)
  return module, variables, spec


def check_matches(variables, template, source: str) -> None:
  """One error listing every missing, unexpected or mis-shaped variable."""
  flat = flatten_variables(variables)
  expected = flatten_variables(template)
  problems = [f'missing: {k} {tuple(v.shape)}' for k, v in expected.items() if k not in flat]
  problems += [f'unexpected: {k}' for k in flat if k not in expected]
  problems += [f'shape mismatch: {k} is {tuple(flat[k].shape)}, expected {tuple(v.shape)}'
               for k, v in expected.items() if k in flat and tuple(flat[k].shape) != tuple(v.shape)]
  if problems:
    shown = '\n  '.join(problems[:40])
    more = f'\n  ... and {len(problems) - 40} more' if len(problems) > 40 else ''
    raise ValueError(f'Weights in {source} do not match the model '
                     f'({len(problems)} problems):\n  {shown}{more}')


def flatten_variables(tree) -> Dict[str, Any]:
  """{"params/layer1_0/conv1/kernel": leaf, ...}"""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat['/'.join(str(getattr(p, 'key', p)) for p in path)] = leaf
  return flat

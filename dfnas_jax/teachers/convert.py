"""torchvision-style state dicts -> Flax variables for `dfnas_jax.models.resnet`.

The Flax ResNets use torchvision's module names, so the mapping is mechanical:
`params/layer1_0/conv1/kernel` <-> `layer1.0.conv1.weight`, BatchNorm
`scale`/`bias`/`mean`/`var` <-> `weight`/`bias`/`running_mean`/`running_var`.
Conv kernels go from (O, I, kh, kw) to (kh, kw, I, O), dense kernels from (O, I)
to (I, O).

A teacher of one's own becomes a directory (`model.json`: architecture, classes,
input size, normalization, class names; `variables.msgpack`) that `--config.teacher=DIR`
takes in every stage:

  python -m dfnas_jax.teachers.convert --architecture resnet18 --num_classes 10 \
      --image_size 32 --mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616 \
      [--class_names classes.txt] --input user.pth --output my_teacher

An `--output` ending in `.msgpack` writes the bare variables instead (for
`teacher_checkpoint` of a zoo teacher):

  python -m dfnas_jax.teachers.convert --architecture resnet50 --num_classes 1000 \
      --input resnet50.pth --output resnet50.msgpack
"""
import argparse
import os
import re
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dfnas_jax import teachers

FORMATS = ('.pth', '.pt', '.npz', '.safetensors')
# (collection, flax variable name) -> torch parameter/buffer name.
_VARIABLE_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A state dict {torch key: array} from a `.pth`/`.pt`, `.npz` or `.safetensors` file."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f'Cannot read weights from {path}: unsupported extension {ext!r}; '
                     f'expected a torchvision-style state dict as one of {FORMATS} '
                     '(or a converted .msgpack where a checkpoint is accepted).')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Checkpoint not found: {path} (expected a torchvision-style '
                            f'state dict, one of {FORMATS}).')
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in f.files}
  if ext == '.safetensors':
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:
    raise ValueError(f'Reading {path} needs PyTorch (pip install torch); or convert it '
                     'elsewhere to .npz/.safetensors, which need no torch.') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # corrupt file, or pickled objects beyond tensors
    raise ValueError(f'Cannot read {path} with torch.load(weights_only=True) ({e}); '
                     'expected a saved state dict of tensors.') from e
  if isinstance(state, dict):
    for wrapper in ('state_dict', 'model'):
      if isinstance(state.get(wrapper), dict):
        state = state[wrapper]
        break
  if not isinstance(state, dict):
    raise ValueError(f'{path} holds a {type(state).__name__}, expected a state dict '
                     '(a dict of tensors, possibly under "state_dict" or "model").')
  out = {}
  for k, v in state.items():
    if k.startswith('module.'):  # saved from DataParallel / DistributedDataParallel
      k = k[len('module.'):]
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      v = v.float() if v.is_floating_point() else v
      out[k] = v.numpy()
    else:
      out[k] = np.asarray(v)
  return out


def torch_key(path: Tuple[str, ...]) -> str:
  """('params', 'layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
  collection, *modules, name = path
  if (collection, name) not in _VARIABLE_NAMES:
    raise ValueError(f'No torch equivalent for Flax variable {"/".join(path)}')
  modules = [re.sub(r'_(\d+)$', r'.\1', m) for m in modules]
  return '.'.join(modules + [_VARIABLE_NAMES[collection, name]])


def _to_torch_shape(shape):
  shape = tuple(shape)
  if len(shape) == 4:  # conv (kh, kw, I, O) -> (O, I, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # dense (I, O) -> (O, I)
    return (shape[1], shape[0])
  return shape


def _to_flax(array: np.ndarray) -> np.ndarray:
  array = np.asarray(array, np.float32)
  if array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  if array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def convert(state_dict: Dict[str, Any], template: Dict[str, Any],
            source: str = 'state dict') -> Dict[str, Any]:
  """Flax variables ({'params', 'batch_stats'}, float32 numpy) shaped like `template`.

  Raises one ValueError listing every missing, unexpected and mis-shaped key.
  """
  flax_paths = {}  # torch key -> flax path
  expected = {}    # torch key -> torch-layout shape
  for path, leaf in teachers.flatten_variables(template).items():
    key = torch_key(tuple(path.split('/')))
    flax_paths[key] = path
    expected[key] = jax.ShapeDtypeStruct(_to_torch_shape(leaf.shape), jnp.float32)
  given = {k: np.asarray(v) for k, v in state_dict.items()
           if not k.endswith('num_batches_tracked')}
  teachers.check_matches(given, expected, source)
  variables: Dict[str, Any] = {}
  for key, path in flax_paths.items():
    node = variables
    *parents, name = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = _to_flax(given[key])
  return variables


def _channels(text: str) -> Tuple[float, ...]:
  values = tuple(float(v) for v in text.split(','))
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f'expected three comma-separated numbers, got {text!r}')
  return values


def main(argv=None):
  from dfnas_jax import models
  from dfnas_jax import workdir as wd
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--architecture', required=True, choices=sorted(models.ARCHITECTURES))
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--image_size', type=int, default=224, help='input side, pixels')
  parser.add_argument('--mean', type=_channels, help="R,G,B; default the architecture's")
  parser.add_argument('--std', type=_channels, help="R,G,B; default the architecture's")
  parser.add_argument('--class_names', help='text file, one class name per line')
  parser.add_argument('--input', required=True, help=f'state dict: one of {FORMATS}')
  parser.add_argument('--output', required=True,
                      help='teacher directory, or a bare .msgpack of Flax variables')
  args = parser.parse_args(argv)
  if (args.mean is None) != (args.std is None):
    parser.error('give both --mean and --std, or neither')
  class_names = None
  if args.class_names:
    with open(args.class_names) as f:
      class_names = tuple(line.strip() for line in f if line.strip())
    if len(class_names) != args.num_classes:
      parser.error(f'{args.class_names} names {len(class_names)} classes, expected '
                   f'--num_classes={args.num_classes}')
  name = os.path.basename(os.path.normpath(args.output))
  spec = teachers.Teacher(name, args.architecture, args.num_classes, args.image_size,
                          weights=None, description=f'{args.architecture} converted from '
                          f'{os.path.basename(args.input)}', class_names=class_names,
                          mean=args.mean, std=args.std)
  module = spec.module()
  template = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, args.image_size, args.image_size, 3)), train=False))
  variables = convert(read_state_dict(args.input), template, source=args.input)
  if args.output.endswith('.msgpack'):
    wd.save_variables(args.output, variables)
  else:
    teachers.save_trained(args.output, spec, variables)
  print(f'Wrote {args.output} ({args.architecture}, {args.num_classes} classes).')


if __name__ == '__main__':
  main()

"""Architectures by name: `build_model('cifar_resnet20', num_classes=10)`."""
from functools import partial
from typing import Any, Callable, Dict

import jax.numpy as jnp

from dfnas_jax.models import darts, nb201, proxyless, resnet, spos

# name -> factory(num_classes, **overrides) -> flax Module taking images in [0, 1].
_CIFAR = dict(block=resnet.BasicBlock, widths=(16, 32, 64), stem='cifar',
              mean=resnet.CIFAR10_MEAN, std=resnet.CIFAR10_STD)
_IMAGENET = dict(widths=(64, 128, 256, 512), stem='imagenet',
                 mean=resnet.IMAGENET_MEAN, std=resnet.IMAGENET_STD)

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The activation dtype a config names. With bfloat16, parameters, BatchNorm
  statistics, optimizer state and losses stay float32 (mixed precision)."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={name!r}: expected one of {sorted(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


ARCHITECTURES: Dict[str, Callable[..., Any]] = {
    'cifar_resnet8': partial(resnet.ResNet, stage_sizes=(1, 1, 1), **_CIFAR),  # tests, smoke runs
    'cifar_resnet20': partial(resnet.ResNet, stage_sizes=(3, 3, 3), **_CIFAR),
    'cifar_resnet32': partial(resnet.ResNet, stage_sizes=(5, 5, 5), **_CIFAR),
    'cifar_resnet56': partial(resnet.ResNet, stage_sizes=(9, 9, 9), **_CIFAR),
    'resnet18': partial(resnet.ResNet, block=resnet.BasicBlock, stage_sizes=(2, 2, 2, 2),
                        **_IMAGENET),
    'resnet34': partial(resnet.ResNet, block=resnet.BasicBlock, stage_sizes=(3, 4, 6, 3),
                        **_IMAGENET),
    'resnet50': partial(resnet.ResNet, block=resnet.Bottleneck, stage_sizes=(3, 4, 6, 3),
                        **_IMAGENET),
}


def build_model(name: str, num_classes: int, dtype: Any = jnp.float32, **overrides):
  """Returns the flax Module for architecture `name`.

  Besides ARCHITECTURES, SPOS and ProxylessNAS names: a space of `spos.SPACES`
  or `proxyless.SPACES` is its supernet, `'<space>:<one digit per layer>'` one
  stand-alone architecture of it; DARTS genotype networks `'darts:...'`
  (`darts.architecture_name`); NAS-Bench-201 networks: `'nb201'` or `'nb201-<C>x<N>'`
  is the supernet, `'nb201[-<C>x<N>]:<cell string>'` one stand-alone cell
  (`nb201.architecture_name`).
  """
  if name.startswith('darts:'):
    return darts.DARTSNet(num_classes=num_classes, dtype=dtype,
                          **{**darts.parse_name(name), **overrides})
  if nb201.is_name(name):
    channels, cells_per_stage, ops = nb201.parse_name(name)
    return nb201.NB201Net(num_classes, channels=channels, cells_per_stage=cells_per_stage,
                          ops=ops, dtype=dtype, **overrides)
  if name.split(':')[0] in spos.SPACES:
    space, choices = spos.parse_name(name)
    return spos.SPOSNet(spos.SPACES[space], num_classes, choices, dtype=dtype, **overrides)
  if name.split(':')[0] in proxyless.SPACES:
    space, choices = proxyless.parse_name(name)
    return proxyless.ProxylessNet(proxyless.SPACES[space], num_classes, choices, dtype=dtype,
                                  **overrides)
  if name not in ARCHITECTURES:
    raise ValueError(f'Unknown architecture {name!r}; known: {sorted(ARCHITECTURES)} and the '
                     f'SPOS spaces {sorted(spos.SPACES)} and ProxylessNAS spaces '
                     f'{sorted(proxyless.SPACES)} (optionally ":<choices>"), a DARTS '
                     "genotype network 'darts:...', or a NAS-Bench-201 network "
                     "'nb201[-<C>x<N>][:<cell string>]'.")
  return ARCHITECTURES[name](num_classes=num_classes, dtype=dtype, **overrides)

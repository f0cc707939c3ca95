"""Cost tables for hardware-aware ProxylessNAS: per-candidate latency or FLOPs.

The latency of every candidate at every position of the space is *measured* on
the current JAX backend (jitted forward pass, median of `repeats` after warm-up)
and cached as JSON, keyed by backend and device kind, then by operation and
shapes. A rerun, or another space sharing shapes, measures only what is missing.
The expected cost of the architecture distribution,

  E[cost] = fixed + sum over layers l of sum_i p_li cost_li,

is differentiable in the architecture logits (`expected`).
"""
import dataclasses
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dfnas_jax import workdir as wd
from dfnas_jax.models import layers
from dfnas_jax.models import proxyless as space_lib

KINDS = ('latency', 'flops')


@dataclasses.dataclass(frozen=True)
class CostTable:
  """cost[l, i] of candidate i at layer l (0 where not allowed), plus the fixed layers."""
  kind: str
  unit: str
  table: np.ndarray
  fixed: float

  def expected(self, probs):
    """E[cost] under per-layer probabilities `probs` [L, NUM_CANDIDATES]."""
    return self.fixed + jnp.sum(probs * self.table)

  def of(self, choices: Sequence[int]) -> float:
    return float(self.fixed + sum(self.table[i, c] for i, c in enumerate(choices)))

  def to_json(self):
    return {'kind': self.kind, 'unit': self.unit, 'fixed': self.fixed,
            'table': self.table.tolist(), 'candidates': list(space_lib.CANDIDATES)}


def backend_key() -> str:
  return f'{jax.default_backend()}:{jax.devices()[0].device_kind}'


def time_forward(module, input_shape: Sequence[int], repeats: int = 10) -> float:
  """Median milliseconds of `module`'s jitted inference forward pass on `input_shape`."""
  x = jnp.ones(input_shape, jnp.float32)
  variables = jax.jit(lambda: module.init(jax.random.PRNGKey(0), x))()
  forward = jax.jit(lambda v, y: module.apply(v, y))
  for _ in range(2):
    forward(variables, x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward(variables, x).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def flops_table(space: space_lib.SearchSpace, num_classes: int) -> CostTable:
  """Multiply-adds in millions (analytic)."""
  table = space_lib.candidate_costs(space)[..., 0] / 1e6
  return CostTable('flops', 'MFLOPs', table.astype(np.float32),
                   space_lib.fixed_cost(space, num_classes)[0] / 1e6)


def latency_table(space: space_lib.SearchSpace, num_classes: int, batch_size: int,
                  cache_path: str, repeats: int = 10) -> CostTable:
  """Milliseconds per forward pass of `batch_size` images, measured here (cached)."""
  cache = wd.read_json(cache_path) if os.path.exists(cache_path) else {}
  entries = cache.setdefault(backend_key(), {})
  missing = 0

  def measured(key, module, input_shape):
    nonlocal missing
    if key not in entries:
      entries[key] = time_forward(module, input_shape, repeats)
      missing += 1
    return entries[key]

  alone = space_lib.BlockSettings(axis_name=None)  # each block timed on its own, one device
  table = np.zeros((space.num_layers, space_lib.NUM_CANDIDATES), np.float32)
  start = time.time()
  for i, layer in enumerate(space.layers()):
    shape = (batch_size, layer.side, layer.side, layer.in_channels)
    for c, (k, e) in enumerate(space_lib.MBCONVS):
      key = (f'{space_lib.CANDIDATES[c]} {layer.in_channels}->{layer.out_channels} '
             f's{layer.stride} {shape}')
      module = space_lib.MBConv(layer.out_channels, k, e, layer.stride, alone)
      table[i, c] = measured(key, module, shape)
  stem_shape = (batch_size, space.image_size, space.image_size, 3)
  fixed = measured(f'stem {space.stem_width}/s{space.stem_stride}->{space.first_width} '
                   f'{stem_shape}', space_lib.Stem(space, alone), stem_shape)
  last = list(space.layers())[-1]
  side = layers.out_side(last.side, last.stride)
  head_shape = (batch_size, side, side, last.out_channels)
  fixed += measured(f'head {space.last_width}->{num_classes} {head_shape}',
                    space_lib.Head(space.last_width, num_classes, settings=alone), head_shape)
  if missing and jax.process_index() == 0:
    wd.write_json(cache_path, cache)
  if missing:
    logging.info('Measured %d latencies on %s in %.1f s (cache: %s).', missing, backend_key(),
                 time.time() - start, cache_path)
  return CostTable('latency', 'ms', table, float(fixed))


def cost_table(kind: str, space: space_lib.SearchSpace, num_classes: int, batch_size: int,
               cache_path: Optional[str] = None, repeats: int = 10) -> CostTable:
  if kind == 'latency':
    return latency_table(space, num_classes, batch_size, cache_path, repeats)
  if kind == 'flops':
    return flops_table(space, num_classes)
  raise ValueError(f'cost_model must be one of {KINDS}, got {kind!r}')

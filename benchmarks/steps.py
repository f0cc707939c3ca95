"""The three hot steps against the device's own peak, as one markdown table.

  python benchmarks/steps.py                     # CPU-sized; 9 minutes on 2 CPU cores
  python benchmarks/steps.py --scale=accelerator # reference-sized batches
  python benchmarks/steps.py --scale=smoke --json=/tmp/steps.json  # the smallest: a run-through

Rows: the synthesis (inversion) update on all local devices, and the SPOS
supernet step and the DARTS search step (exact second-order hypergradient), each
on one device and on all (the per-device batch fixed). Columns: images/s, GFLOP
per step from XLA's cost analysis of the compiled step, achieved GFLOP/s, and
that as a fraction of the peak measured in the same run by a large float32
matmul on one device. Random weights and inputs: cost does not depend on them.
Imports nothing that imports TensorFlow (benchmarks/device.sh runs it on machines without).
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthesis  # pylint: disable=g-import-not-at-top,wrong-import-position  # benchmarks/

from dfnas_jax import models  # pylint: disable=wrong-import-position
from dfnas_jax.configs import darts as darts_config  # pylint: disable=wrong-import-position
from dfnas_jax.models import darts as darts_space  # pylint: disable=wrong-import-position
from dfnas_jax.models import layers  # pylint: disable=wrong-import-position
from dfnas_jax.nas import bilevel  # pylint: disable=wrong-import-position
from dfnas_jax.train import state as state_lib  # pylint: disable=wrong-import-position
from dfnas_jax.train import steps  # pylint: disable=wrong-import-position

flags.DEFINE_enum('scale', 'cpu', ['cpu', 'accelerator', 'smoke'], 'Batch sizes and networks.')
flags.DEFINE_string('compute_dtype', 'float32', 'float32 | bfloat16 (activations).')
flags.DEFINE_integer('repeats', 5, 'Timed steps (after a warm-up) per row.')
flags.DEFINE_string('json', None, 'Also write the rows to this JSON file.')
FLAGS = flags.FLAGS

# (synthesis batch, supernet space, supernet batch, DARTS channels/cells/size/batch, matmul n)
SCALES = {
    'cpu': dict(synthesis=64, space='spos_cifar', supernet=32, darts=(8, 3, 16, 16), matmul=2048),
    'accelerator': dict(synthesis=256, space='spos_cifar', supernet=256, darts=(16, 8, 32, 64),
                        matmul=8192),
    # Every row at its smallest, to check the script end to end (seconds of running).
    'smoke': dict(synthesis=2, space='spos_tiny', supernet=2, darts=(2, 3, 8, 2), matmul=256),
}


def peak_gflops(n: int) -> float:
  """float32 n x n matmul on one device, best of 5 (2 n^3 FLOPs)."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(5))
  return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _time_steps(step, state, args, repeats):
  """Median seconds per call of `state, *_ = step(state, *args)`."""
  state = step(state, *args)[0]  # compile
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = step(state, *args)[0]
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _batch(n_dev, per_device, size, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.random((n_dev, per_device, size, size, 3), np.float32),
          'label': rng.integers(0, num_classes, (n_dev, per_device)).astype(np.int32),
          'logits': rng.normal(size=(n_dev, per_device, num_classes)).astype(np.float32)}


def supernet(batch_size: int, space: str, n_dev: int, dtype, repeats: int):
  model = models.build_model(space, 10, dtype)
  lr = state_lib.learning_rate_schedule(0.1, 1000, 0)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), 32,
                                       state_lib.sgd(lr, 0.9, 4e-5))
  p_step = steps.pmap_train_step(learning_rate_fn=lr, loss='distillation', temperature=3.0,
                                 after_update=layers.keep_unused_choices)
  batch = _batch(n_dev, batch_size // n_dev, 32)
  arch = np.random.default_rng(1).integers(0, 4, model.space.num_layers)
  batch['arch'] = np.tile(arch.astype(np.int32), (n_dev, 1))
  rstate = steps.replicate(state, jax.local_devices()[:n_dev])
  flops = synthesis.compiled_flops(p_step, rstate, batch) * n_dev
  return _time_steps(p_step, rstate, (batch,), repeats), flops


def darts_search(channels, cells, size, batch_size, n_dev, dtype, repeats):
  config = darts_config.get_config()
  model = darts_space.DARTSSearchNet(10, channels, cells, dtype=dtype)
  tx, lr_fn = bilevel.weight_optimizer(config, 1000)
  arch_tx = bilevel.arch_optimizer(config)
  alphas = darts_space.initial_alphas(jax.random.PRNGKey(1))
  state = state_lib.SearchState(
      weights=state_lib.create_train_state(model, jax.random.PRNGKey(0), size, tx),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  p_step = bilevel.pmap_search_step(arch_tx=arch_tx,
                                    virtual_tx=bilevel.virtual_step_optimizer(config, lr_fn),
                                    learning_rate_fn=lr_fn, mode='exact',
                                    loss='distillation', temperature=3.0)
  train, val = (_batch(n_dev, batch_size // n_dev, size, seed=s) for s in (0, 1))
  rstate = steps.replicate(state, jax.local_devices()[:n_dev])
  flops = synthesis.compiled_flops(p_step, rstate, train, val) * n_dev
  return _time_steps(p_step, rstate, (train, val), repeats), flops


def main(_):
  s = SCALES[FLAGS.scale]
  dtype = models.compute_dtype(FLAGS.compute_dtype)
  peak = peak_gflops(s['matmul'])
  device = jax.local_devices()[0]
  print(f'{jax.local_device_count()} x {device.device_kind} ({jax.default_backend()}), '
        f'JAX {jax.__version__}, compute {FLAGS.compute_dtype}; peak (float32 '
        f'{s["matmul"]}^2 matmul, one device): {peak:.1f} GFLOP/s')
  rows = []
  n_all = jax.local_device_count()
  r = synthesis.measure(batch_size=s['synthesis'] * n_all, steps=FLAGS.repeats, repeats=3)
  rows.append(('synthesis step (cifar10_resnet20, canvas 40, window 32)', n_all,
               s['synthesis'] * n_all, r['step_s'], r['flops_per_step']))
  for n_dev in sorted({1, n_all}):  # weak scaling: the per-device batch is fixed
    step_s, flops = supernet(s['supernet'] * n_dev, s['space'], n_dev, dtype, FLAGS.repeats)
    rows.append((f'SPOS supernet step ({s["space"]})', n_dev, s['supernet'] * n_dev, step_s,
                 flops))
    c, cells, size, b = s['darts']
    step_s, flops = darts_search(c, cells, size, b * n_dev, n_dev, dtype, FLAGS.repeats)
    rows.append((f'DARTS search step (exact, C={c}, {cells} cells, {size} px)', n_dev, b * n_dev,
                 step_s, flops))
  print('| step | devices | batch | ms/step | images/s | GFLOP/step | GFLOP/s | of peak |')
  print('|---|---|---|---|---|---|---|---|')
  table = []
  for name, n_dev, batch, step_s, flops in rows:
    achieved = flops / step_s / 1e9
    print(f'| {name} | {n_dev} | {batch} | {step_s * 1e3:.1f} | {batch / step_s:.0f} | '
          f'{flops / 1e9:.2f} | {achieved:.1f} | {achieved / (peak * n_dev):.0%} |')
    table.append({'step': name, 'devices': n_dev, 'batch': batch, 'ms': step_s * 1e3,
                  'images_per_s': batch / step_s, 'gflop_per_step': flops / 1e9,
                  'gflop_per_s': achieved, 'of_peak': achieved / (peak * n_dev)})
  if FLAGS.json:  # NaN where XLA's cost analysis has none (GPU): json writes NaN
    with open(FLAGS.json, 'w') as f:
      json.dump({'device': f'{jax.local_device_count()} x {device.device_kind}',
                 'backend': jax.default_backend(), 'jax': jax.__version__,
                 'compute_dtype': FLAGS.compute_dtype, 'scale': FLAGS.scale,
                 'peak_gflops': peak, 'rows': table}, f, indent=2)
    print(f'Wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)

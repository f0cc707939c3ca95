"""Throughput of the inversion update: steps/s, images x steps/s, achieved FLOP/s.

  python benchmarks/synthesis.py --teacher=cifar10_resnet20 --batch_size=128 \
      --canvas=40 --window=32 --steps=20

Weights do not change the cost, so the teacher's architecture runs with random
weights (no checkpoint needed). FLOPs per step come from XLA's cost analysis of
one compiled step (not reported on GPU, whose analysis omits cuDNN convolutions).
"""
import time

import jax
import numpy as np
from absl import app, flags

from dfnas_jax import teachers
from dfnas_jax.synthesis import inversion
from dfnas_jax.train import state as state_lib

flags.DEFINE_string('teacher', 'cifar10_resnet20', 'Zoo teacher (architecture used).')
flags.DEFINE_integer('batch_size', 128, 'Images per step over all local devices.')
flags.DEFINE_integer('canvas', 40, 'Canvas side.')
flags.DEFINE_integer('window', 32, 'Window side.')
flags.DEFINE_integer('factor', 1, 'Resolution factor of the measured stage (2 = half).')
flags.DEFINE_integer('steps', 20, 'Steps per timed dispatch.')
flags.DEFINE_integer('repeats', 3, 'Timed dispatches (after one warm-up).')
FLAGS = flags.FLAGS


def main(_):
  spec = teachers.get(FLAGS.teacher)
  module = spec.module()
  variables = state_lib.init_variables(module, jax.random.PRNGKey(0), FLAGS.window)
  settings = inversion.Settings(canvas=FLAGS.canvas, window=FLAGS.window)
  stages = [(FLAGS.factor, FLAGS.steps)]
  inverter = inversion.Inverter(module.apply, variables, module.mean, module.std, settings,
                                stages, chunk_steps=FLAGS.steps)
  n = jax.local_device_count()
  keys = inversion.image_keys(0, 0, np.arange(FLAGS.batch_size)).reshape(n, -1, 2)
  targets = np.eye(spec.num_classes, dtype=np.float32)[
      np.arange(FLAGS.batch_size) % spec.num_classes].reshape(n, -1, spec.num_classes)

  canvas = inverter.init_canvas_fn(keys)
  targets = jax.numpy.asarray(targets)
  no_terms = {k: jax.numpy.zeros((n,)) for k in inversion.LOSS_TERMS}
  carry = (canvas, inverter.init_optimizer_fn(FLAGS.steps)(canvas), no_terms,
           jax.numpy.full((n,), -1, jax.numpy.int32), no_terms)
  step = inverter.chunk_fn(FLAGS.factor, 0, FLAGS.steps)  # one step, no device loop
  args = (*carry[:2], targets, keys, 0, inverter.variables, *carry[3:])
  cost = step.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_step = cost.get('flops', float('nan')) * n  # per device -> all devices
  if jax.default_backend() == 'gpu':
    # XLA:GPU's cost analysis leaves out convolutions lowered to cuDNN custom calls
    # (measured on an H200: 1.38 GFLOP/step at batch 256, vs 20.0 at batch 128 on CPU).
    flops_per_step = float('nan')

  def run(carry):
    return inverter.advance(carry, targets, keys, FLAGS.factor, 0, FLAGS.steps, FLAGS.steps)

  carry = jax.block_until_ready(run(carry))  # warm-up (compile)
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    carry = jax.block_until_ready(run(carry))
    times.append(time.perf_counter() - start)
  step_time = float(np.median(times)) / FLAGS.steps
  print(f'backend={jax.default_backend()} devices={n} teacher={FLAGS.teacher} '
        f'batch={FLAGS.batch_size} canvas={FLAGS.canvas} window={FLAGS.window} '
        f'factor={FLAGS.factor} device_loop={inverter.loop_on_device}')
  print(f'step_ms={step_time * 1e3:.1f} steps_per_s={1 / step_time:.2f} '
        f'image_steps_per_s={FLAGS.batch_size / step_time:.0f} '
        f'gflop_per_step={flops_per_step / 1e9:.2f} '
        f'achieved_gflops={flops_per_step / step_time / 1e9:.1f}')


if __name__ == '__main__':
  app.run(main)

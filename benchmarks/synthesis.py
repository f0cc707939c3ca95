"""Throughput of the inversion update: steps/s, images x steps/s, achieved FLOP/s.

  python benchmarks/synthesis.py --teacher=cifar10_resnet20 --batch_size=128 --method=inversion \
      --canvas=40 --window=32 --steps=20

Weights do not change the cost, so the teacher's architecture runs with random
weights (no checkpoint needed). FLOPs per step come from XLA's cost analysis of
one compiled step (not reported on GPU, whose analysis omits cuDNN convolutions).
"""
import time

import flax.jax_utils
import jax
import numpy as np
from absl import app, flags

from dfnas_jax import teachers
from dfnas_jax.configs import synthesize as synthesize_config
from dfnas_jax.synthesis import generator, inversion
from dfnas_jax.train import state as state_lib


def compiled_flops(jitted, *args) -> float:
  """FLOPs of one call from XLA's cost analysis (NaN on GPU: it leaves out the
  convolutions lowered to cuDNN custom calls; measured on an H200 it reported
  1.38 GFLOP/step for a synthesis step that costs 20.0 on CPU)."""
  if jax.default_backend() == 'gpu':
    return float('nan')
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


def measure(teacher: str = 'cifar10_resnet20', batch_size: int = 128, canvas: int = 40,
            window: int = 32, factor: int = 1, steps: int = 20, repeats: int = 3,
            method: str = 'inversion', generator_channels: int = 16):
  """{'step_s', 'flops_per_step', 'device_loop'} of the inversion update (method
  'generator': of the generator mode's) on all local devices."""
  spec = teachers.get(teacher)
  module = spec.module()
  variables = state_lib.init_variables(module, jax.random.PRNGKey(0), window)
  config = synthesize_config.get_config()
  config.update(canvas=canvas, window=window)
  config.generator.channels = generator_channels
  settings = inversion.settings_from_config(config)
  args = (module.apply, variables, module.mean, module.std, settings, [(factor, steps)])
  n = jax.local_device_count()
  keys = inversion.image_keys(0, 0, np.arange(batch_size)).reshape(n, -1, 2)
  targets = jax.numpy.asarray(np.eye(spec.num_classes, dtype=np.float32)[
      np.arange(batch_size) % spec.num_classes].reshape(n, -1, spec.num_classes))
  if method == 'generator':
    inverter = generator.GeneratorInverter(
        *args, chunk_steps=steps, generator_settings=generator.settings_from_config(config))
    canvases = {'generator': flax.jax_utils.replicate(inverter.init_weights(0)),
                'latent': inverter.latents_fn(keys)}
  else:
    inverter = inversion.Inverter(*args, chunk_steps=steps)
    canvases = inverter.init_canvas_fn(keys)
  no_terms = {k: jax.numpy.zeros((n,)) for k in inversion.LOSS_TERMS}
  carry = (canvases, inverter.init_optimizer_fn(steps)(canvases), no_terms,
           jax.numpy.full((n,), -1, jax.numpy.int32), no_terms)
  step = inverter.chunk_fn(factor, 0, steps)  # one step, no device loop
  flops = compiled_flops(step, *carry[:2], targets, keys, 0, inverter.variables, *carry[3:])
  flops *= n  # per device -> all devices

  def run(carry):
    return inverter.advance(carry, targets, keys, factor, 0, steps, steps)

  carry = jax.block_until_ready(run(carry))  # warm-up (compile)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    carry = jax.block_until_ready(run(carry))
    times.append(time.perf_counter() - start)
  return {'step_s': float(np.median(times)) / steps, 'flops_per_step': flops,
          'device_loop': inverter.loop_on_device}


def main(_):
  r = measure(FLAGS.teacher, FLAGS.batch_size, FLAGS.canvas, FLAGS.window, FLAGS.factor,
              FLAGS.steps, FLAGS.repeats, FLAGS.method, FLAGS.generator_channels)
  step_time, flops_per_step = r['step_s'], r['flops_per_step']
  print(f'backend={jax.default_backend()} devices={jax.local_device_count()} '
        f'method={FLAGS.method} teacher={FLAGS.teacher} batch={FLAGS.batch_size} '
        f'canvas={FLAGS.canvas} '
        f'window={FLAGS.window} factor={FLAGS.factor} device_loop={r["device_loop"]}')
  print(f'step_ms={step_time * 1e3:.1f} steps_per_s={1 / step_time:.2f} '
        f'image_steps_per_s={FLAGS.batch_size / step_time:.0f} '
        f'gflop_per_step={flops_per_step / 1e9:.2f} '
        f'achieved_gflops={flops_per_step / step_time / 1e9:.1f}')


if __name__ == '__main__':
  flags.DEFINE_string('teacher', 'cifar10_resnet20', 'Zoo teacher (architecture used).')
  flags.DEFINE_integer('batch_size', 128, 'Images per step over all local devices.')
  flags.DEFINE_integer('canvas', 40, 'Canvas side.')
  flags.DEFINE_integer('window', 32, 'Window side.')
  flags.DEFINE_integer('factor', 1, 'Resolution factor of the measured stage (2 = half).')
  flags.DEFINE_integer('steps', 20, 'Steps per timed dispatch.')
  flags.DEFINE_integer('repeats', 3, 'Timed dispatches (after one warm-up).')
  flags.DEFINE_enum('method', 'inversion', ['inversion', 'generator'], 'What is optimized.')
  flags.DEFINE_integer('generator_channels', 16, 'method=generator: its channels.')
  FLAGS = flags.FLAGS
  app.run(main)

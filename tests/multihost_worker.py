"""One process of the 2-process CPU job that tests/test_multihost.py starts.

  python tests/multihost_worker.py PROCESS_ID PORT WORKDIR [CRASH_AT_STEP]

Joins a job of two processes coordinated on 127.0.0.1:PORT, synthesizes the
smoke dataset together (each process its own batches), trains the smoke
supernet on it for a few pmap-ed steps (gradients reduced over both processes)
and writes this process's final parameters to WORKDIR/params_<id>.npz. With
CRASH_AT_STEP, process 1 kills itself with SIGKILL at its CRASH_AT_STEP-th
supernet step of this run.
"""
import os
import signal
import sys

import jax
import numpy as np
from absl import logging

from dfnas_jax import distributed, models
from dfnas_jax.configs import spos as spos_config  # pylint: disable=g-import-not-at-top
from dfnas_jax.nas import search_data, spos
from dfnas_jax.synthesis import synthesize

SUPERNET_STEPS = 6


def main(process_id: int, port: int, workdir: str, crash_at_step: int = 0):
  logging.set_verbosity(logging.INFO)  # the stages' progress lines, for a failing test's log
  distributed.initialize(f'127.0.0.1:{port}', 2, process_id)
  if not jax.config.jax_compilation_cache_dir:  # the test run's shared one, if set
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  config = spos_config.get_config('smoke')
  config.soft_labels = 'stored'
  config.synthesis.regional_update = False  # window-sized images: stored logits label them
  config.supernet.loss = 'distillation'
  config.supernet.num_train_steps = SUPERNET_STEPS
  config.supernet.checkpoint_every_steps = 2
  summary = synthesize.run(config.synthesis, os.path.join(workdir, 'synthesize'))
  if process_id == 0:
    assert summary['num_images'] == 32, summary

  config.dataset = os.path.join(workdir, 'synthesize', 'synthetic')
  data = search_data.load(config, workdir, per_class=config.val_per_class)
  sampler = spos.PathSampler(spos.one_shot_space(config.space), data.train.num_classes,
                             config.flops_min, config.flops_max, config.path_sampling)
  model = models.build_model(config.space, data.train.num_classes, dropout=config.dropout)

  calls = iter(range(1, 1_000_000))

  def sample(rng):  # one call per supernet step
    if process_id == 1 and next(calls) == crash_at_step:
      os.kill(os.getpid(), signal.SIGKILL)
    return sampler(rng)

  result = spos.train_supernet(config, os.path.join(workdir, 'supernet'), model, data.train,
                               sample, None)
  leaves = jax.tree_util.tree_flatten_with_path(result['state'].params)[0]
  np.savez(os.path.join(workdir, f'params_{process_id}.npz'),
           **{jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves})


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
       int(sys.argv[4]) if len(sys.argv) > 4 else 0)

"""Runs one stage: python -m dfnas_jax.main --config=configs/<stage>.py[:preset].

Everything a stage needs is in its config; `config.stage` picks the stage. The work
directory defaults to ./workdir/<config file stem>; rerunning with the same work
directory resumes.

Multi-host (one process per Cloud TPU VM host): add --distributed. Elsewhere
(GPU clusters, several CPU processes) also name the coordinator:
  --distributed --coordinator_address=HOST0:1234 --num_processes=N --process_id=I
"""
import os
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from dfnas_jax import distributed, stages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Stage config file (configs/*.py[:preset]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory; default ./workdir/<config file stem>.')
flags.DEFINE_bool('compilation_cache', True,
                  'Keep compiled steps in <workdir>/jax_cache (or $JAX_COMPILATION_CACHE_DIR '
                  'when set) for reruns and resumes.')
flags.DEFINE_bool('distributed', False,
                  'Run as one process of a multi-process job (jax.distributed.initialize).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0; auto-detected on Cloud TPU VMs and SLURM.')
flags.DEFINE_integer('num_processes', None, 'Processes in the job (with coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.DEFINE_bool('traceback', False,
                  'On a bad input, show the Python traceback, not only the one-line message.')
flags.mark_flags_as_required(['config'])

# What a bad config, path, checkpoint or dataset raises, and a diverged training run
# (dfnas_jax.train.loop): one line, unless --traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


class _QuietOrbax:
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or 'orbax' not in record.pathname


def default_workdir() -> str:
  path = config_flags.get_config_filename(FLAGS['config']).split(':')[0]
  return os.path.join('workdir', os.path.splitext(os.path.basename(path))[0])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.distributed:  # before anything starts a JAX backend
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
    raise app.UsageError('--coordinator_address/--num_processes/--process_id need --distributed.')
  # tf.data only: keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  workdir = FLAGS.workdir or default_workdir()
  # A resumed run skips recompiling (minutes on CPU for DARTS); a cache the environment
  # names (JAX_COMPILATION_CACHE_DIR) is kept, e.g. one shared by every work directory.
  if FLAGS.compilation_cache and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Stage %s, workdir %s, config:\n%s', FLAGS.config.stage, workdir, FLAGS.config)
  try:
    summary = stages.run(FLAGS.config, workdir)
  except USER_ERRORS as e:
    if FLAGS.traceback:
      raise
    sys.exit(f'Error: {e}\n(stage {FLAGS.config.stage}; --traceback shows where it was raised)')
  logging.info('Summary: %s', summary)


if __name__ == '__main__':
  app.run(main)

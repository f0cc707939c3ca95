"""Runs one stage: python -m dfnas_jax.main --config=configs/<stage>.py[:preset].

Everything a stage needs is in its config; `config.stage` picks the stage. The work
directory defaults to ./workdir/<config file stem>; rerunning with the same work
directory resumes.
"""
import os
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from dfnas_jax import stages

# configs/*.py import each other as `configs.*`: in a source checkout (pip install -e)
# make that package importable from any working directory.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, 'configs', '__init__.py')) and _CHECKOUT not in sys.path:
  sys.path.append(_CHECKOUT)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Stage config file (configs/*.py[:preset]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory; default ./workdir/<config file stem>.')
flags.DEFINE_bool('compilation_cache', True,
                  'Keep compiled steps in <workdir>/jax_cache for reruns and resumes.')
flags.mark_flags_as_required(['config'])


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
  # tf.data only: keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  workdir = FLAGS.workdir or default_workdir()
  if FLAGS.compilation_cache:  # a resumed run skips recompiling (minutes on CPU for DARTS)
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Stage %s, workdir %s, config:\n%s', FLAGS.config.stage, workdir, FLAGS.config)
  summary = stages.run(FLAGS.config, workdir)
  logging.info('Summary: %s', summary)


if __name__ == '__main__':
  app.run(main)

"""Runs one stage: python -m dfnas_jax.main --config=configs/<stage>.py[:preset].

Everything a stage needs is in its config; `config.stage` picks the stage. The work
directory defaults to ./workdir/<config file stem>; rerunning with the same work
directory resumes.

Multi-host (one process per Cloud TPU VM host): add --distributed. Elsewhere
(GPU clusters, several CPU processes) also name the coordinator:
  --distributed --coordinator_address=HOST0:1234 --num_processes=N --process_id=I
"""
import difflib
import os
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_dict, config_flags

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


def _wants_traceback(argv) -> bool:
  """Whether the last --traceback/--notraceback of a command line whose flags did not
  parse asks for tracebacks."""
  wanted = False
  for arg in argv[1:]:
    if arg == '--':
      break
    name, _, value = arg.lstrip('-').partition('=')
    if name in ('traceback', 'notraceback') and arg.startswith('-'):
      wanted = name == 'traceback' and value.lower() in ('', 'true', 't', '1')
  return wanted


def _config_arg(argv) -> str:
  """The value of --config (as --config=X or --config X)."""
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _unknown_field(argv) -> str:
  """Which --config.<field> override names no field, and the nearest fields; '' if none
  does (the error was another)."""
  try:
    config = FLAGS['config'].parser.parse(_config_arg(argv))
  except Exception:  # pylint: disable=broad-except
    return ''
  for arg in argv[1:]:
    if not arg.startswith(('--config.', '-config.')):
      continue
    path = arg.split('.', 1)[1].split('=', 1)[0]
    node, parent = config, 'the config'
    for name in path.split('.'):
      if not isinstance(node, config_dict.ConfigDict):
        break
      if name not in node:
        near = difflib.get_close_matches(name, list(node.keys()), n=3, cutoff=0.6)
        hint = (f'did you mean {" or ".join(map(repr, near))}?' if near
                else f'its fields: {", ".join(sorted(node.keys()))}.')
        return f'--config.{path}: {parent} has no field {name!r}; {hint}'
      node, parent = node[name], name
  return ''


def parse_flags(argv):
  """absl's flag parsing, but a --config whose preset or field overrides name nothing, or
  whose file does not load, ends in one line (a traceback with --traceback)."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.get('stage')  # a config file that failed to load raises here
    return argv
  except Exception as e:  # pylint: disable=broad-except
    if _wants_traceback(argv):
      raise
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
      chain.append(chain[-1].__cause__ or chain[-1].__context__)
    # ml_collections re-raises what get_config (e.g. an unknown preset) raised with its
    # traceback in the message; the exception it handled is the one that reads well.
    wrapped = [c.__context__ for c in chain
               if str(c).startswith('Error whilst parsing config file') and c.__context__]
    if wrapped:
      message = ' '.join(str(wrapped[0]).split())
    elif isinstance(e, (KeyError, AttributeError)):
      message = _unknown_field(argv) or ' '.join(str(e).strip('\'"').split())
    elif isinstance(e, OSError):
      message = f'Cannot load --config: {str(e).strip().splitlines()[-1].strip()}'
    elif isinstance(e, flags.Error):  # other flags: as absl reports them
      sys.stderr.write(f'FATAL Flags parsing error: {e}\n'
                       'Pass --helpshort or --helpfull to see help on flags.\n')
      sys.exit(1)
    else:
      raise
    sys.exit(f'Error: {message}\n(--traceback shows where it was raised)')


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
  app.run(main, flags_parser=parse_flags)

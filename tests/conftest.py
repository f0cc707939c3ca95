"""Shared fixtures. Real-data tests read the offline CIFAR-10 copy (TFDS `cifar10_jpeg`).

Its location: $DFNAS_TEST_DATA_DIR, else ../shared/data/tfds next to the repository.
The NAS-Bench-201 results table: $DFNAS_NB201_TABLE, else
../shared/data/nasbench201/cifar10.json next to the repository.
Two tiers. The default run (`python -m pytest`) is the fast tier: no real data, minutes.
`-m slow` is the rest: end-to-end stage runs, kill/resume, notebooks, several processes,
and every test that reads the offline copies (marked here from the fixtures it uses);
`-m 'slow or not slow'` runs both, as .ci/run does.

The package itself never needs these copies. Without them (or without torch) the tests
that need them skip, each saying why; with DFNAS_TEST_NO_SKIPS=1 (set by .ci/run) a missing
copy stops the run before it starts and any skipped test fails it.
"""
import importlib.util
import os
import pathlib
import shutil
import tempfile

import pytest

pytest_plugins = ('pytester',)  # tests/test_skip_policy.py runs this file on sample tests

REPO = pathlib.Path(__file__).resolve().parents[1]
NO_SKIPS = os.environ.get('DFNAS_TEST_NO_SKIPS') == '1'


def pytest_configure(config):
  """One persistent compilation cache for the whole run, made by the main pytest process
  before JAX is imported: xdist workers, stage subprocesses and notebook kernels inherit
  it through the environment, so a step compiled by one test is read back by the next."""
  if not hasattr(config, 'workerinput'):  # the main process, not an xdist worker
    if NO_SKIPS:
      _require_everything()
    config.jax_cache = tempfile.mkdtemp(prefix='dfnas-test-jax-cache-')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = config.jax_cache


def pytest_unconfigure(config):
  if getattr(config, 'jax_cache', None):
    shutil.rmtree(config.jax_cache, ignore_errors=True)


# The fixtures that read the offline copies: a test that uses one (directly or through
# another fixture) is in the slow tier.
REAL_DATA_FIXTURES = ('data_dir', 'nb201_table_path')


# The files that take longest in a full run (docs/benchmarks.md), longest first. xdist
# hands whole files to the workers in collection order (addopts: --no-loadscope-reorder;
# its default puts the files with most tests first, so a one-test file of minutes, such as
# test_multihost.py, started last and ran alone at the end). Longest first keeps both
# workers busy to the end. A file missing here only runs later; nothing else depends on it.
LONGEST_FIRST = ('test_darts.py', 'test_multihost.py', 'test_nb201_stages.py', 'test_spos.py',
                 'test_compare_torch.py', 'test_zero_cost.py', 'test_proxyless.py',
                 'test_synthesis.py', 'test_zero_shot.py', 'test_mixed_precision.py',
                 'test_rank_correlation.py', 'test_main.py', 'test_training.py', 'test_nb201.py')


def _schedule_rank(item) -> int:
  name = item.path.name
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if any(f in getattr(item, 'fixturenames', ()) for f in REAL_DATA_FIXTURES):
      item.add_marker(pytest.mark.slow)
  items.sort(key=_schedule_rank)  # stable: a file's tests keep their order


def _require_everything():
  missing = [m for m in (_data_dir_missing(), _nb201_table_missing()) if m]
  if importlib.util.find_spec('torch') is None:
    missing.append("torch (pip install 'torch==2.13.0', the CPU build)")
  if missing:
    raise pytest.UsageError('DFNAS_TEST_NO_SKIPS=1, but these are missing: ' + '; '.join(missing))


def pytest_sessionfinish(session, exitstatus):
  """Under DFNAS_TEST_NO_SKIPS=1 a skipped test fails the run (pytest alone exits 0)."""
  if not NO_SKIPS or hasattr(session.config, 'workerinput'):
    return
  reporter = session.config.pluginmanager.get_plugin('terminalreporter')
  skipped = reporter.stats.get('skipped', []) if reporter else []
  if skipped and exitstatus == 0:
    reporter.write_line(f'DFNAS_TEST_NO_SKIPS=1: {len(skipped)} test(s) skipped', red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _data_dir():
  return os.environ.get('DFNAS_TEST_DATA_DIR', str(REPO.parent / 'shared' / 'data' / 'tfds'))


def _data_dir_missing():
  if not os.path.isdir(os.path.join(_data_dir(), 'cifar10_jpeg')):
    return f'offline cifar10_jpeg not found under {_data_dir()} (set DFNAS_TEST_DATA_DIR)'
  return None


@pytest.fixture(scope='session')
def data_dir():
  missing = _data_dir_missing()
  if missing:
    pytest.skip(missing)
  return _data_dir()


def _nb201_table():
  return os.environ.get('DFNAS_NB201_TABLE',
                        str(REPO.parent / 'shared' / 'data' / 'nasbench201' / 'cifar10.json'))


def _nb201_table_missing():
  if not os.path.isfile(_nb201_table()):
    return f'NAS-Bench-201 table {_nb201_table()} not found (set DFNAS_NB201_TABLE)'
  return None


@pytest.fixture(scope='session')
def nb201_table_path():
  missing = _nb201_table_missing()
  if missing:
    pytest.skip(missing)
  return _nb201_table()


@pytest.fixture
def train_config(data_dir):
  """The teacher stage's smoke config on a tiny ResNet (seconds on 2 CPU cores)."""
  from dfnas_jax.configs import teacher
  config = teacher.get_config('smoke')
  config.architecture = 'cifar_resnet8'
  config.dataset = 'cifar10_jpeg'
  config.data_dir = data_dir
  config.download = False
  config.image_size = 16
  return config


@pytest.fixture
def quick_compiles():
  """XLA without most optimizations, for tests whose time goes to compiling, not running."""
  import jax
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', False)

"""Shared fixtures. Real-data tests read the offline CIFAR-10 copy (TFDS `cifar10_jpeg`).

Its location: $DFNAS_TEST_DATA_DIR, else ../shared/data/tfds next to the repository.
The NAS-Bench-201 results table: $DFNAS_NB201_TABLE, else
../shared/data/nasbench201/cifar10.json next to the repository.
The package itself never needs these copies.
"""
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
  """One persistent compilation cache for the whole run, made by the main pytest process
  before JAX is imported: xdist workers, stage subprocesses and notebook kernels inherit
  it through the environment, so a step compiled by one test is read back by the next."""
  if not hasattr(config, 'workerinput'):  # the main process, not an xdist worker
    config.jax_cache = tempfile.mkdtemp(prefix='dfnas-test-jax-cache-')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = config.jax_cache


def pytest_unconfigure(config):
  if getattr(config, 'jax_cache', None):
    shutil.rmtree(config.jax_cache, ignore_errors=True)


def _data_dir():
  return os.environ.get('DFNAS_TEST_DATA_DIR', str(REPO.parent / 'shared' / 'data' / 'tfds'))


@pytest.fixture(scope='session')
def data_dir():
  path = _data_dir()
  if not os.path.isdir(os.path.join(path, 'cifar10_jpeg')):
    pytest.skip(f'offline cifar10_jpeg not found under {path} (set DFNAS_TEST_DATA_DIR)')
  return path


@pytest.fixture(scope='session')
def nb201_table_path():
  path = os.environ.get('DFNAS_NB201_TABLE',
                        str(REPO.parent / 'shared' / 'data' / 'nasbench201' / 'cifar10.json'))
  if not os.path.isfile(path):
    pytest.skip(f'NAS-Bench-201 table {path} not found (set DFNAS_NB201_TABLE)')
  return path


@pytest.fixture
def train_config(data_dir):
  """The teacher stage's smoke config on a tiny ResNet (seconds on 2 CPU cores)."""
  from configs import teacher
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

"""The colab/ notebooks, run headless at smoke scale as a user would run them.

Each notebook runs in a fresh Jupyter kernel (nbclient) with its `parameters`
cell overridden papermill-style: a cell after it sets SCALE='smoke', a temporary
WORKDIR and the offline CIFAR-10 copy for real-data evaluation. Notebook 01
synthesizes one dataset (a module fixture) that 02-04 search on, as they would
after a user ran 01. A failing cell fails the test with its traceback.

The NAS runs are compile-bound, so the kernel gets JAX_DISABLE_MOST_OPTIMIZATIONS
and the notebooks' CONFIG_OVERRIDES pick the cheaper variant where a stage has one
(stored soft labels, first-order DARTS, the FLOPs cost table); the stages
themselves are tested at their smoke presets elsewhere. Notebook 05 (the
consistency study) makes its own data: two architectures, the Gaussian-noise
variant only (no inversion), two training steps per cell.
"""
import contextlib
import io
import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / 'colab'
NOTEBOOKS = {'01_synthesize': 'synthesize', '02_spos': 'spos', '03_darts': 'darts',
             '04_proxylessnas': 'proxylessnas', '05_consistency': 'rank_correlation'}
EVAL_SPLIT = 'train[45000:45064]'


def _read(name):
  return nbformat.read(COLAB / f'{name}.ipynb', as_version=4)


def _tagged(nb, tag):
  cells = [i for i, c in enumerate(nb.cells) if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def run_notebook(name, parameters, cwd=COLAB):
  """Executes colab/<name>.ipynb with `parameters` injected; returns the executed notebook."""
  nb = _read(name)
  injected = nbformat.v4.new_code_cell(
      '# Parameters injected by tests/test_notebooks.py\n'
      + ''.join(f'{k} = {v!r}\n' for k, v in parameters.items()))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(_tagged(nb, 'parameters') + 1, injected)
  # One CPU device, as the other tests' subprocesses get (no inherited device-count flags).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(cwd)}})
  client.execute(env=env)  # raises CellExecutionError, with the cell's traceback
  return nb


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if o.output_type == kind]


def images_shown(nb):
  return sum('image/png' in o.data for o in _outputs(nb, 'display_data'))


def stdout(nb):
  return ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stdout')


def stderr(nb):
  return ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stderr')


def _summary(workdir):
  return json.loads((workdir / 'summary.json').read_text())


def test_notebooks_are_committed_clean():
  """Stored without outputs; a parameters cell (and a config cell) the tests can override."""
  assert sorted(p.stem for p in COLAB.glob('[0-9][0-9]_*.ipynb')) == sorted(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith('# ')
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])
    assert "SCALE = 'default'" in nb.cells[_tagged(nb, 'parameters')].source
    _tagged(nb, 'config')


@pytest.mark.parametrize('scale', ['smoke', 'default', 'accelerator'])
@pytest.mark.parametrize('name', sorted(NOTEBOOKS))
def test_config_cell_builds_every_scale(name, scale):
  """The config cell at every SCALE (only smoke is run below): a locked config of the stage."""
  nb = _read(name)
  namespace = {}
  exec(nb.cells[_tagged(nb, 'parameters')].source, namespace)
  namespace['SCALE'] = scale
  with contextlib.redirect_stdout(io.StringIO()):
    exec(nb.cells[_tagged(nb, 'config')].source, namespace)
  config = namespace['config']
  assert config.is_locked and config.stage == NOTEBOOKS[name]


def test_kernel_runs_this_interpreter():
  from jupyter_client.manager import KernelManager
  assert KernelManager(kernel_name='python3').format_kernel_cmd()[0] == sys.executable


@pytest.fixture(scope='module')
def synthesized(tmp_path_factory):
  """Runs notebook 01 once: (its work directory, the executed notebook)."""
  workdir = tmp_path_factory.mktemp('notebooks') / 'synthesize'
  # Window-sized images: their stored soft labels label the whole image, so 02 and 04
  # can distil from them (the cheaper variant) on crops of the full image.
  nb = run_notebook('01_synthesize', {'SCALE': 'smoke', 'WORKDIR': str(workdir),
                                      'CONFIG_OVERRIDES': {'regional_update': False}})
  return workdir, nb


def test_01_synthesize(synthesized):
  workdir, nb = synthesized
  summary = _summary(workdir)
  assert summary['num_images'] == 32 and summary['num_rounds'] == 2
  assert os.path.isdir(summary['dataset_dir'])
  for png in ('preview.png', 'soft_labels.png', 'rounds.png', 'losses.png'):
    assert (workdir / png).stat().st_size > 0, png
  assert images_shown(nb) == 4
  out = stdout(nb)
  assert 'round 0: 16 images' in out and 'round 1: 16 images' in out
  assert "'logits': (32, 10)" in out  # the dataset loaded back through TFDS
  assert 'Synthesized round 1 batch 1' in stderr(nb)  # the stage's progress log is shown


def _nas_parameters(synthesized, data_dir, workdir, overrides):
  return {'SCALE': 'smoke', 'WORKDIR': str(workdir),
          'SYNTHETIC_DIR': _summary(synthesized[0])['dataset_dir'],
          'EVAL_DATASET': 'cifar10_jpeg', 'EVAL_DATA_DIR': data_dir, 'EVAL_SPLIT': EVAL_SPLIT,
          'DOWNLOAD': False, 'CONFIG_OVERRIDES': overrides}


def _check_nas(nb, workdir, synthesized):
  summary = _summary(workdir)
  assert summary['dataset'] == _summary(synthesized[0])['dataset_dir']  # 01's, reused
  assert not summary['synthesized'] and not (workdir / 'synthesize').exists()
  assert summary['final_eval_data'] == f'cifar10_jpeg {EVAL_SPLIT}'
  assert 0.0 <= summary['final_accuracy'] <= 1.0
  assert (workdir / 'retrain' / 'model').is_dir()
  assert f'Final accuracy on cifar10_jpeg {EVAL_SPLIT}' in stdout(nb)
  return summary


def test_02_spos(synthesized, data_dir, tmp_path):
  workdir = tmp_path / 'spos'
  nb = run_notebook('02_spos', _nas_parameters(synthesized, data_dir, workdir,
                                               {'soft_labels': 'stored'}))
  summary = _check_nas(nb, workdir, synthesized)
  assert summary['best_architecture'].startswith('spos_tiny:')
  assert len(summary['search_history']) == 2  # the smoke preset's generations
  for png in ('supernet_curves.png', 'search_progress.png', 'candidates.png',
              'retrain_curves.png'):
    assert (workdir / png).exists(), png
  assert images_shown(nb) == 4
  assert 'Search generation 2/2' in stderr(nb)


def test_03_darts(synthesized, data_dir, tmp_path):
  workdir = tmp_path / 'darts'
  # From the repository root rather than colab/: the notebook finds configs/ either way.
  nb = run_notebook('03_darts', _nas_parameters(synthesized, data_dir, workdir,
                                                {'mode': 'first_order'}), cwd=REPO)
  summary = _check_nas(nb, workdir, synthesized)
  assert summary['mode'] == 'first_order' and summary['architecture'].startswith('darts:')
  assert (workdir / 'search' / 'genotypes' / 'epoch_002.json').exists()
  # Search curves, heat maps after epochs 1 and 2, both cells, retraining curves.
  assert images_shown(nb) == 6
  assert 'epoch_002' in stdout(nb)


def test_04_proxylessnas(synthesized, data_dir, tmp_path):
  workdir = tmp_path / 'proxylessnas'
  nb = run_notebook('04_proxylessnas', _nas_parameters(
      synthesized, data_dir, workdir, {'soft_labels': 'stored', 'cost_model': 'flops'}))
  summary = _check_nas(nb, workdir, synthesized)
  assert summary['architecture'].startswith('proxyless_tiny:')
  assert summary['cost_model'] == 'flops'
  found = json.loads((workdir / 'architecture.json').read_text())
  assert found['architecture'] == summary['architecture']
  # Cost table, search progress, path probabilities, retraining curves.
  assert images_shown(nb) == 4
  assert 'epoch   2 (search)' in stdout(nb)


def test_05_consistency(data_dir, tmp_path):
  workdir = tmp_path / 'rank_correlation'
  nb = run_notebook('05_consistency', {
      'SCALE': 'smoke', 'WORKDIR': str(workdir),
      'REAL_DATASET': 'cifar10_jpeg', 'REAL_DATA_DIR': data_dir, 'REAL_TRAIN_SPLIT': 'train[:256]',
      'EVAL_DATASET': 'cifar10_jpeg', 'EVAL_DATA_DIR': data_dir, 'EVAL_SPLIT': EVAL_SPLIT,
      'DOWNLOAD': False,
      'CONFIG_OVERRIDES': {'num_architectures': 2, 'variants': 'gaussian_noise',
                           'train.num_train_steps': 2}})
  results = json.loads((workdir / 'results.json').read_text())
  assert len(results['architectures']) == 2 and len(results['size']) == 2
  assert results['size_unit'] == 'MFLOPs' and results['size'] == sorted(results['size'])
  assert results['eval_data'] == f'cifar10_jpeg {EVAL_SPLIT}'
  assert results['real_train_data'] == 'cifar10_jpeg train[:256]'
  assert results['num_images'] == {'gaussian_noise': 32}
  for version in ('stand_alone', 'one_shot'):
    assert set(results['statistics'][version]) == {'gaussian_noise'}
    assert len(results['scores'][version]['gaussian_noise']) == 2
    assert (workdir / f'{version}.png').stat().st_size > 0
  for png in ('architectures.png', 'agreement.png'):
    assert (workdir / png).stat().st_size > 0, png
  # Architectures by size, stand-alone and one-shot rankings, tau and regret per variant.
  assert images_shown(nb) == 4
  table = ''.join(o.data.get('text/markdown', '') for o in _outputs(nb, 'display_data'))
  assert '| stand_alone | gaussian_noise |' in table and '| one_shot | gaussian_noise |' in table
  out = stdout(nb)
  assert 'regret' in out and out.count('cells/') == 5  # 2 real, 2 noise, 1 supernet
  assert 'Cell stand_alone/real/0 done' in stderr(nb)  # the stage's progress log is shown

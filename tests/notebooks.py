"""Runs the colab/ notebooks headless, as a user would, for the tests.

A notebook runs in a fresh Jupyter kernel (nbclient) with its `parameters` cell
overridden papermill-style: a cell after it sets SCALE='smoke', the work directory
and the offline CIFAR-10 copy. The kernel gets JAX_DISABLE_MOST_OPTIMIZATIONS (the
smoke runs are compile-bound) and one CPU device. A failing cell raises
CellExecutionError with its traceback.
"""
import json
import os
import pathlib

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / 'colab'
NOTEBOOKS = {'01_synthesize': 'synthesize', '02_spos': 'spos', '03_darts': 'darts',
             '04_proxylessnas': 'proxylessnas', '05_consistency': 'rank_correlation',
             '06_zero_shot': 'zero_shot'}
EVAL_SPLIT = 'train[45000:45064]'


def read(name):
  return nbformat.read(COLAB / f'{name}.ipynb', as_version=4)


def tagged(nb, tag):
  cells = [i for i, c in enumerate(nb.cells) if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def run(name, parameters, cwd=COLAB):
  """Executes colab/<name>.ipynb with `parameters` injected; returns the executed notebook."""
  nb = read(name)
  injected = nbformat.v4.new_code_cell(
      '# Parameters injected by tests/notebooks.py\n'
      + ''.join(f'{k} = {v!r}\n' for k, v in parameters.items()))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(tagged(nb, 'parameters') + 1, injected)
  # One CPU device, as the other tests' subprocesses get (no inherited device-count flags).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(cwd)}})
  client.execute(env=env)  # raises CellExecutionError, with the cell's traceback
  return nb


def search_parameters(workdir, data_dir, overrides=None):
  """A NAS notebook (02-04) at smoke scale on WORKDIR, evaluated on the offline copy;
  SYNTHETIC_DIR '' lets the stage synthesize (or reuse) into WORKDIR/synthesize."""
  return {'SCALE': 'smoke', 'WORKDIR': str(workdir), 'SYNTHETIC_DIR': '',
          'EVAL_DATASET': 'cifar10_jpeg', 'EVAL_DATA_DIR': data_dir, 'EVAL_SPLIT': EVAL_SPLIT,
          'DOWNLOAD': False, 'CONFIG_OVERRIDES': overrides or {}}


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if o.output_type == kind]


def images_shown(nb):
  return sum('image/png' in o.data for o in _outputs(nb, 'display_data'))


def markdown_shown(nb):
  return ''.join(o.data.get('text/markdown', '') for o in _outputs(nb, 'display_data'))


def stdout(nb):
  return ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stdout')


def stderr(nb):
  return ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stderr')


def check_search(nb, workdir):
  """What every NAS notebook shows of its stage's run: the final real-data accuracy."""
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['final_eval_data'] == f'cifar10_jpeg {EVAL_SPLIT}'
  assert 0.0 <= summary['final_accuracy'] <= 1.0
  assert (workdir / 'retrain' / 'model').is_dir()
  assert f'Final accuracy on cifar10_jpeg {EVAL_SPLIT}' in stdout(nb)
  return summary

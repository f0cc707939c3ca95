"""The colab/ notebooks: committed clean, every scale's config cell, and notebook 01 run
headless at smoke scale (tests/notebooks.py says how).

Notebooks 02-06 run where their stage's end-to-end test has just run the same smoke
config in the same work directory (test_spos, test_darts, test_proxyless,
test_rank_correlation, test_zero_shot): the notebook then runs the stage again, which
reuses that work, and shows it. The stage's own test covers the fresh run; the notebook's
test covers what the notebook runs and shows, without compiling and training everything
twice.
"""
import contextlib
import io
import json
import os
import sys

import nbformat
import pytest

from tests import notebooks


def test_notebooks_are_committed_clean():
  """Stored without outputs; a parameters cell (and a config cell) the tests can override."""
  assert sorted(p.stem for p in notebooks.COLAB.glob('[0-9][0-9]_*.ipynb')) == sorted(
      notebooks.NOTEBOOKS)
  for name in notebooks.NOTEBOOKS:
    nb = notebooks.read(name)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith('# ')
    for cell in nb.cells:
      if cell.cell_type == 'code':
        assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])
    assert "SCALE = 'default'" in nb.cells[notebooks.tagged(nb, 'parameters')].source
    notebooks.tagged(nb, 'config')


def _config_cell(name, **parameters):
  """The config the notebook's config cell builds from its parameters cell and `parameters`."""
  nb = notebooks.read(name)
  namespace = {}
  exec(nb.cells[notebooks.tagged(nb, 'parameters')].source, namespace)
  namespace.update(parameters)
  with contextlib.redirect_stdout(io.StringIO()):
    exec(nb.cells[notebooks.tagged(nb, 'config')].source, namespace)
  return namespace['config']


@pytest.mark.parametrize('scale', ['smoke', 'default', 'accelerator'])
@pytest.mark.parametrize('name', sorted(notebooks.NOTEBOOKS))
def test_config_cell_builds_every_scale(name, scale):
  """The config cell at every SCALE (only smoke is run): a locked config of the stage."""
  config = _config_cell(name, SCALE=scale)
  assert config.is_locked and config.stage == notebooks.NOTEBOOKS[name]


@pytest.mark.parametrize('name', ['02_spos', '03_darts', '04_proxylessnas', '06_zero_shot'])
def test_search_notebooks_find_notebook_01s_dataset(name, tmp_path, monkeypatch):
  """SYNTHETIC_DIR None searches notebook 01's dataset at the same SCALE (found from the
  working directory), a given SYNTHETIC_DIR that one, '' a dataset synthesized anew."""
  monkeypatch.chdir(tmp_path)
  assert _config_cell(name, SCALE='smoke', SYNTHETIC_DIR=None).dataset == ''
  made_by_01 = tmp_path / 'workdir' / 'smoke' / 'synthesize' / 'summary.json'
  made_by_01.parent.mkdir(parents=True)
  made_by_01.write_text(json.dumps({'dataset_dir': '/data/of/01'}))
  assert _config_cell(name, SCALE='smoke', SYNTHETIC_DIR=None).dataset == '/data/of/01'
  assert _config_cell(name, SCALE='smoke', SYNTHETIC_DIR='/mine').dataset == '/mine'
  assert _config_cell(name, SCALE='smoke', SYNTHETIC_DIR='').dataset == ''


def test_kernel_runs_this_interpreter():
  from jupyter_client.manager import KernelManager
  assert KernelManager(kernel_name='python3').format_kernel_cmd()[0] == sys.executable


@pytest.mark.slow  # runs the notebook
def test_01_synthesize(tmp_path):
  workdir = tmp_path / 'synthesize'
  nb = notebooks.run('01_synthesize', {'SCALE': 'smoke', 'WORKDIR': str(workdir)})
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['num_images'] == 32 and summary['num_rounds'] == 2
  assert os.path.isdir(summary['dataset_dir'])
  for png in ('preview.png', 'soft_labels.png', 'rounds.png', 'losses.png'):
    assert (workdir / png).stat().st_size > 0, png
  assert notebooks.images_shown(nb) == 4
  out = notebooks.stdout(nb)
  assert 'round 0: 16 images' in out and 'round 1: 16 images' in out
  assert "'logits': (32, 10)" in out  # the dataset loaded back through TFDS
  assert 'Synthesized round 1 batch 1' in notebooks.stderr(nb)  # the stage's progress log

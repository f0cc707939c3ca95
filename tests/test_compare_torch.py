"""benchmarks/compare_torch.py: its PyTorch twins (benchmarks/torch_twins/) compute what the
JAX steps compute, and its parity checks tell rounding from a real difference.

Batch 2, the smallest SPOS space and NB201 network (nb201_smoke's), one timed call per
side; most of the time is compiling the JAX steps. The ProxylessNAS rows: the
proxyless_tiny space, the FLOPs table for the latency term (measuring latencies takes long).
The DARTS row: configs/darts.py:smoke's search network (C=2, 3 cells, 8 px, batch 4).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the PyTorch twins need torch')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import compare_torch  # noqa: E402  # benchmarks/; JAX on the CPU
import jax  # noqa: E402  # after compare_torch has put JAX on the CPU
from torch_twins import darts as darts_row  # noqa: E402  # benchmarks/
from torch_twins import parity as tp  # noqa: E402

from dfnas_jax import teachers  # noqa: E402
from dfnas_jax.configs import darts as darts_config  # noqa: E402
from dfnas_jax.models import darts  # noqa: E402
from dfnas_jax.teachers import convert  # noqa: E402
from dfnas_jax.train import state as state_lib  # noqa: E402

pytestmark = pytest.mark.slow  # the benchmark's PyTorch twins against the JAX steps


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
  """torch on one thread: beside other jobs its OpenMP threads spin at every barrier (the
  DARTS twin's step at the smoke config took 45 s on 2 loaded cores, against ~1 s)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


# Per row: its smallest build, the torch weight to perturb, the failure that must follow.
ROWS = {
    'synthesis': (dict(batch_size=2), lambda b: b.torch_teacher.conv1.weight,
                  'Teacher logits differ'),
    'spos_supernet': (dict(batch_size=2, space='spos_tiny'), lambda b: b.torch_model.fc.weight,
                      'losses differ'),
    'nb201_supernet': (dict(batch_size=2, space='nb201-4x1'),
                       lambda b: b.torch_model.classifier.weight, 'losses differ'),
    'proxyless_weight': (dict(batch_size=2, space='proxyless_tiny'),
                         lambda b: b.torch_model.head.classifier.weight, 'losses differ'),
    'proxyless_arch': (dict(batch_size=2, space='proxyless_tiny', cost_model='flops'),
                       lambda b: b.torch_model.head.classifier.weight, 'losses differ'),
}


@pytest.mark.parametrize('name', list(ROWS))
def test_torch_twin_matches_and_a_perturbed_weight_fails(name, quick_compiles):
  kwargs, weight, failure = ROWS[name]
  bench = compare_torch.ROWS[name](**kwargs)
  row, parity, _ = compare_torch.run_row(bench, repeats=1, warmup=0)
  assert row['jax_ms'] > 0 and row['torch_ms'] > 0 and row['parity'] == 'passed'
  assert row['ratio'] == pytest.approx(row['torch_ms'] / row['jax_ms'])
  for jax_loss, torch_loss in parity['losses']:
    assert torch_loss == pytest.approx(jax_loss, rel=tp.LOSS_RTOL)
  bench.check()  # timing left the weights (and logits) the check starts from as they were
  with torch.no_grad():
    weight(bench).mul_(1.05)
  with pytest.raises(tp.ParityError, match=failure):
    bench.check()


def test_darts_twin_has_one_tensor_per_flax_variable():
  """Each scanned edge's slice of every stacked Flax variable names one torch tensor, and
  every torch tensor is named once."""
  c = darts_config.get_config('smoke')
  model = darts.DARTSSearchNet(10, c.init_channels, c.layers)
  shapes = jax.eval_shape(lambda: state_lib.init_variables(model, jax.random.PRNGKey(0),
                                                           c.image_size))
  variables = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  flat = teachers.flatten_variables(darts_row.unstack_edges(variables))
  names = [convert.torch_key(tuple(k.split('/'))) for k in flat]
  state = darts_row.TorchDARTSSearchNet(model).state_dict()
  shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}
  assert len(set(names)) == len(names) == len(shapes)
  assert set(names) == set(shapes)
  for key, name in zip(flat, names):
    assert tp.torch_layout(np.zeros(flat[key].shape)).shape == shapes[name], key
  # 14 edges per cell, each of its stacked arrays split into as many torch tensors.
  stacked = teachers.flatten_variables(variables)
  edges = sum(v.shape[0] for k, v in stacked.items() if '/edge/' in k)
  assert len(flat) == len(stacked) - sum('/edge/' in k for k in stacked) + edges


def test_darts_twin_matches_and_a_perturbed_weight_fails(quick_compiles):
  """'finite_difference', the twin's own arithmetic, where every tensor must agree. The
  config's 'exact' differs in the JAX step's hypergradient alone, which tests/test_darts.py
  checks against finite differences of the unrolled loss; compiling it here too cost as
  much again."""
  bench = compare_torch.ROWS['darts_second_order'](mode='finite_difference',
                                                   config=darts_config.get_config('smoke'))
  row, parity, lines = compare_torch.run_row(bench, repeats=1, warmup=0)
  assert row['jax_ms'] > 0 and row['torch_ms'] > 0
  assert 'finite_difference hypergradient' in row['config'] and 'parity' in lines[0]
  for jax_loss, torch_loss in parity['losses']:
    assert torch_loss == pytest.approx(jax_loss, rel=tp.LOSS_RTOL)
  for group in parity['arch'].values():  # the logits' step agrees too, none at rounding
    assert group['worst'][0].rel <= tp.UPDATE_RTOL and not group['at_rounding']
  bench.check()  # timing left the weights and logits the check starts from as they were
  with torch.no_grad():
    bench.torch_model.classifier.weight.mul_(1.05)
  with pytest.raises(tp.ParityError, match='losses differ'):
    bench.check()


def test_compare_torch_imports_no_tensorflow():
  """The accelerator machines have no TensorFlow: the benchmark and its rows do without."""
  code = ('import sys; sys.path.insert(0, "benchmarks"); import compare_torch; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == '[]', out.stdout


def test_update_checks_compare_tiny_updates_against_their_group():
  """A tensor whose update is rounding next to its group's largest passes on the floor
  (reported as such); a relative difference of the same size on a real update fails; the
  proxyless_arch case from an AMD EPYC (issue 41) passes."""
  rng = np.random.default_rng(0)
  big = rng.normal(size=1000)
  tiny = 1e-7 * rng.normal(size=64)
  noise = tp.RESOLUTION * 0.5 * rng.choice([-1.0, 1.0], size=64)  # half the floor
  pairs = {'big': (big, big * (1 + 1e-3)), 'tiny': (tiny, tiny + noise * np.abs(big).max())}
  summary = tp.check_updates('row', pairs)
  assert summary['at_rounding'] == ['tiny'] and summary['worst'][1] == 'big'
  assert 'at rounding level' in tp.describe_updates(summary)
  with pytest.raises(tp.ParityError, match='rounding floor'):
    tp.check_updates('row', {'big': (big, big * 1.05), 'tiny': pairs['tiny']})
  with pytest.raises(tp.ParityError, match='update of tiny'):  # 4x the floor
    tp.check_updates('row', {'big': pairs['big'], 'tiny': (tiny, tiny + 8 * noise)})
  # Adam's second moment off by 2.5% in L2 (proxyless_arch's layer 1 on an AMD EPYC, a
  # gradient of 2e-4): its square root, on the gradient's scale, is 1.2% off.
  nu = 1e-3 * (2e-4 * rng.random(11))**2
  assert tp.check_update('row', 'nu', np.sqrt(nu), np.sqrt(nu * 1.025)).rel < 0.0125
  # An update of 0 where the other side moved: only within the floor.
  assert tp.check_update('row', 'x', np.zeros(4), np.full(4, 1e-9), scale=1.0).at_rounding
  with pytest.raises(tp.ParityError):
    tp.check_update('row', 'x', np.zeros(4), np.full(4, 1e-2), scale=1.0)


def test_a_failed_row_is_reported_and_the_next_rows_still_run(capsys):
  class Row:
    config = 'a fake row'
    draws_paths = False

    def __init__(self, name, fails):
      self.name, self.fails = name, fails

    def check(self):
      if self.fails:
        raise tp.ParityError(f'{self.name}: the update of w differs')
      return {}

    def describe_check(self, r):
      return 'agrees'

    def timers(self):
      return (lambda i: None), (lambda i: None)

  rows, failed = compare_torch.run_rows({'first': lambda: Row('first', True),
                                         'second': lambda: Row('second', False)}, 1, 0)
  assert failed == ['first'] and [r['parity'] for r in rows] == ['failed', 'passed']
  assert 'the update of w differs' in rows[0]['error'] and rows[1]['jax_ms'] >= 0
  assert 'PARITY CHECK FAILED' in capsys.readouterr().out
  assert 'parity failed' in compare_torch.markdown(rows)

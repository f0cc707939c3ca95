"""benchmarks/compare_torch.py: its PyTorch twins compute what the JAX steps compute.

Batch 2, the smallest SPOS space and NB201 network (nb201_smoke's), one timed call per
side; most of the time is compiling the three JAX steps. The ProxylessNAS rows: the
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
import torch_darts  # noqa: E402  # benchmarks/

from dfnas_jax import teachers  # noqa: E402
from dfnas_jax.configs import darts as darts_config  # noqa: E402
from dfnas_jax.models import darts  # noqa: E402
from dfnas_jax.teachers import convert  # noqa: E402
from dfnas_jax.train import state as state_lib  # noqa: E402

pytestmark = pytest.mark.slow  # the benchmark's PyTorch twins against the JAX steps


def test_torch_twins_match_and_a_perturbed_weight_fails(quick_compiles):
  rows = [(compare_torch.SynthesisBench(batch_size=2), lambda b: b.torch_teacher.conv1.weight,
           'Teacher logits differ'),
          (compare_torch.SupernetBench(batch_size=2, space='spos_tiny'),
           lambda b: b.torch_model.fc.weight, 'losses differ'),
          (compare_torch.NB201SupernetBench(batch_size=2, space='nb201-4x1'),
           lambda b: b.torch_model.classifier.weight, 'losses differ')]
  for bench, weight, failure in rows:
    row, parity, _ = compare_torch.run_row(bench, repeats=1, warmup=0)
    assert row['jax_ms'] > 0 and row['torch_ms'] > 0
    assert row['ratio'] == pytest.approx(row['torch_ms'] / row['jax_ms'])
    for jax_loss, torch_loss in parity['losses']:
      assert torch_loss == pytest.approx(jax_loss, rel=compare_torch.tp.LOSS_RTOL)
    bench.check()  # timing left the weights the check starts from as they were
    with torch.no_grad():
      weight(bench).mul_(1.05)
    with pytest.raises(compare_torch.tp.ParityError, match=failure):
      bench.check()


def test_proxyless_twins_match_and_a_perturbed_weight_fails(quick_compiles):
  rows = [(compare_torch.ROWS['proxyless_weight'](batch_size=2, space='proxyless_tiny'),
           lambda b: b.torch_model.head.classifier.weight, 'losses differ'),
          (compare_torch.ROWS['proxyless_arch'](batch_size=2, space='proxyless_tiny',
                                                cost_model='flops'),
           lambda b: b.torch_model.head.classifier.weight, 'losses differ')]
  for bench, weight, failure in rows:
    row, parity, _ = compare_torch.run_row(bench, repeats=1, warmup=0)
    assert row['jax_ms'] > 0 and row['torch_ms'] > 0
    for jax_loss, torch_loss in parity['losses']:
      assert torch_loss == pytest.approx(jax_loss, rel=compare_torch.tp.LOSS_RTOL)
    bench.check()  # timing left the weights and logits the check starts from as they were
    with torch.no_grad():
      weight(bench).mul_(1.05)
    with pytest.raises(compare_torch.tp.ParityError, match=failure):
      bench.check()


def test_darts_twin_has_one_tensor_per_flax_variable():
  """Each scanned edge's slice of every stacked Flax variable names one torch tensor, and
  every torch tensor is named once."""
  c = darts_config.get_config('smoke')
  model = darts.DARTSSearchNet(10, c.init_channels, c.layers)
  shapes = jax.eval_shape(lambda: state_lib.init_variables(model, jax.random.PRNGKey(0),
                                                           c.image_size))
  variables = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  flat = teachers.flatten_variables(torch_darts.unstack_edges(variables))
  names = [convert.torch_key(tuple(k.split('/'))) for k in flat]
  state = torch_darts.TorchDARTSSearchNet(model).state_dict()
  shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}
  assert len(set(names)) == len(names) == len(shapes)
  assert set(names) == set(shapes)
  for key, name in zip(flat, names):
    assert compare_torch.tp.torch_layout(np.zeros(flat[key].shape)).shape == shapes[name], key
  # 14 edges per cell, each of its stacked arrays split into as many torch tensors.
  stacked = teachers.flatten_variables(variables)
  edges = sum(v.shape[0] for k, v in stacked.items() if '/edge/' in k)
  assert len(flat) == len(stacked) - sum('/edge/' in k for k in stacked) + edges


def test_darts_twin_matches_both_modes_and_a_perturbed_weight_fails(quick_compiles):
  for mode in compare_torch.compare_torch_darts.MODES:
    bench = compare_torch.ROWS['darts_second_order'](mode=mode,
                                                     config=darts_config.get_config('smoke'))
    row, parity, lines = compare_torch.run_row(bench, repeats=1, warmup=0)
    assert row['jax_ms'] > 0 and row['torch_ms'] > 0
    assert f'{mode} hypergradient' in row['config'] and 'parity' in lines[0]
    for jax_loss, torch_loss in parity['losses']:
      assert torch_loss == pytest.approx(jax_loss, rel=compare_torch.tp.LOSS_RTOL)
    if mode == 'finite_difference':  # the twin's arithmetic: the logits' step agrees too
      assert max(rel for rel, _ in parity['arch'].values()) <= compare_torch.tp.UPDATE_RTOL
    bench.check()  # timing left the weights and logits the check starts from as they were
    with torch.no_grad():
      bench.torch_model.classifier.weight.mul_(1.05)
    with pytest.raises(compare_torch.tp.ParityError, match='losses differ'):
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

"""benchmarks/compare_torch.py: its PyTorch twins compute what the JAX steps compute.

Batch 2, the smallest SPOS space and NB201 network (nb201_smoke's), one timed call per
side; most of the time is compiling the three JAX steps. The ProxylessNAS rows: the
proxyless_tiny space, the FLOPs table for the latency term (measuring latencies takes long).
"""
import os
import sys

import pytest

torch = pytest.importorskip('torch', reason='the PyTorch twins need torch')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import compare_torch  # noqa: E402  # benchmarks/; JAX on the CPU

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

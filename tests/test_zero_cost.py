"""Zero-cost estimators: each against a hand-computed case; the supernet scores as the
stand-alone networks do."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfnas_jax.models import nb201
from dfnas_jax.nas import zero_cost as zc
from tests import benchmark_scripts

K = zc.JACOB_COV_K


class ReluDense(nn.Module):
  """logits = relu(x) W: one ReLU (the input of a module named `conv`), no BatchNorm."""

  @nn.compact
  def __call__(self, x, architecture=None, train=False):
    return nn.Dense(3, use_bias=False, name='conv')(nn.relu(x))


class LinearChain(nn.Module):
  @nn.compact
  def __call__(self, x, architecture=None, train=False):
    hidden = nn.Dense(4, use_bias=False, name='first')(x)
    return nn.Dense(3, use_bias=False, name='second')(hidden)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _jacob_cov(jacobians):
  v = np.maximum(np.linalg.eigvalsh(np.corrcoef(jacobians)), 0)
  return -np.sum(np.log(v + K) + 1 / (v + K))


def test_naswot_counts_the_units_two_codes_agree_on():
  pre = jnp.asarray([[2., -1., 3.], [1., 4., -2.]])  # codes 101 and 110: agree on 1 unit
  np.testing.assert_array_equal(zc.code_kernel(pre), [[3, 1], [1, 3]])
  np.testing.assert_allclose(zc.naswot_score(zc.code_kernel(pre)), np.log(8.), rtol=1e-6)


def test_jacob_cov_of_two_opposite_jacobians():
  # corrcoef = [[1, -1], [-1, 1]]: eigenvalues 0 and 2.
  expected = -(np.log(K) + 1 / K + np.log(2 + K) + 1 / (2 + K))
  np.testing.assert_allclose(zc.jacob_cov_score(jnp.eye(2)), expected, rtol=1e-6)


def test_zico_and_agreement_of_two_gradients():
  # Entry 0: mean |g| 2, std 1; entry 1: the same in both groups (std 0), left out.
  grads = [{'kernel': jnp.asarray([1., 2.])}, {'kernel': jnp.asarray([3., 2.])}]
  np.testing.assert_allclose(zc.zico_score(grads), np.log(2.), rtol=1e-6)
  np.testing.assert_allclose(zc.agreement_score(grads), 7 / np.sqrt(5 * 13), rtol=1e-6)


def test_every_data_estimator_on_a_one_relu_network(quick_compiles):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  p = _softmax(rng.normal(size=(4, 3))).astype(np.float32)
  model = ReluDense()
  variables = model.init(jax.random.PRNGKey(0), x)
  w = np.asarray(variables['params']['conv']['kernel'])
  scores = zc.measures(model, variables, jnp.asarray(x), jnp.asarray(p), num_groups=2)

  c = (x > 0).astype(np.float64)
  kernel = c @ c.T + (1 - c) @ (1 - c).T
  h = np.maximum(x, 0)
  residual = _softmax(h @ w) - p
  grad = h.T @ residual / 4
  groups = [h[i:i + 2].T @ residual[i:i + 2] / 2 for i in (0, 2)]
  mean_abs, std = np.mean(np.abs(groups), 0), np.std(groups, 0)
  centre = np.eye(4) - 1 / 4
  a, b = centre @ kernel @ centre, centre @ (p @ p.T) @ centre
  expected = {
      'naswot': np.linalg.slogdet(kernel)[1],
      'jacob_cov': _jacob_cov(c * w.sum(1)),  # d sum(logits) / dx_i = 1[x_i > 0] W 1
      'grad_norm': np.linalg.norm(grad),
      'snip': np.abs(w * grad).sum(),
      'zico': np.log(np.sum(mean_abs[std > 0] / std[std > 0])),
      'teacher_agreement': np.sum(groups[0] * groups[1]) / (
          np.linalg.norm(groups[0]) * np.linalg.norm(groups[1])),
      'teacher_cka': np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)),
  }
  assert set(scores) == set(zc.DATA_ESTIMATORS)
  for name, value in expected.items():
    np.testing.assert_allclose(scores[name], value, rtol=2e-4, err_msg=name)
  np.testing.assert_allclose(zc.estimator('snip')(model, variables, x, p), expected['snip'],
                             rtol=2e-4)
  # Asked for some, it computes those alone (only the passes they read), to the same values.
  for names in (('jacob_cov',), ('naswot', 'teacher_cka'), ('zico', 'jacob_cov')):
    some = zc.measures(model, variables, jnp.asarray(x), jnp.asarray(p), estimators=names)
    assert list(some) == list(names)
    np.testing.assert_allclose([some[n] for n in names], [expected[n] for n in names],
                               rtol=2e-4, err_msg=str(names))
  with pytest.raises(ValueError, match='num_groups=3 must be >= 2 and divide the batch'):
    zc.measures(model, variables, x, p, num_groups=3, estimators=('snip',))
  zc.measures(model, variables, x, p, num_groups=3, estimators=('naswot',))  # no groups read
  with pytest.raises(ValueError, match="each must be one of"):
    zc.measures(model, variables, x, p, estimators=('synflow',))


def test_mean_rank_combines_estimators_and_ranks_undefined_scores_last():
  combined = zc.mean_rank({'a': [3., 1., 2., np.nan], 'b': [1., 1., 3., 2.]})
  # Ranks by a: 4, 2, 3, 1 (NaN lowest); by b: 1.5, 1.5, 4, 3 (a tie shares its mean rank).
  np.testing.assert_allclose(combined, [2.75, 1.75, 3.5, 2.])


def test_size_and_data_separates_what_the_parameter_count_orders():
  from dfnas_jax.evaluation import zero_cost_study as study
  params, truth = [1, 1, 1, 2, 2, 2], [1, 2, 3, 4, 5, 6]
  # Right across the two sizes, reversed inside each: of 15 pairs, the 9 across concordant,
  # the 6 inside discordant. tau-b with params (6 of its pairs tied): 9 / sqrt(15 * 9).
  # tau with truth (9 - 6) / 15 = 0.2; partial (0.2 - 0.6) / (1 - 0.6) = -1.
  reversed_inside = study.size_and_data([3, 2, 1, 6, 5, 4], truth, params, noise=[3, 2, 1, 6, 5, 4])
  np.testing.assert_allclose([reversed_inside[k] for k in (
      'with_params', 'partial_given_params', 'within_equal_params', 'with_noise')],
                             [9 / np.sqrt(135), -1, -1, 1])
  # The count itself: nothing left to order inside a group, the partial undefined.
  count = study.size_and_data(params, truth, params)
  assert count['with_params'] == 1 and 'with_noise' not in count
  assert np.isnan(count['partial_given_params']) and np.isnan(count['within_equal_params'])
  results = {'test_accuracy': truth, 'scores': {
      'params': {'none': params}, 'naswot': {'full': [1, 2, 3, 4, 5, np.nan],
                                             'noise': [6, 5, 4, 3, 2, 1]}}}
  table = study.breakdown(results)
  assert set(table) == {'naswot'} and 'with_noise' not in table['naswot']['noise']
  # NaN ranks last: full's ranking is 1, 2, 3, 4, 5, 0; noise's its reverse but for the last.
  assert table['naswot']['full']['with_noise'] == pytest.approx((5 - 10) / 15)
  assert study.breakdown({'test_accuracy': truth, 'scores': {'naswot': {}}}) == {}
  assert '| naswot | full | +0.' in study.breakdown_markdown(table)


def test_the_sources_benchmark_reads_label_and_pixel_structure():
  sources = benchmark_scripts.load('zero_cost_sources')
  classes = np.array([0, 0, 1, 1, 2, 2, 2, 2])
  labels = np.eye(10)[classes]
  # Images that are their class's pattern: the pixel Gram matrix, once centred, is the
  # label kernel's, so their alignment is 1.
  images = np.eye(3)[classes][:, None, None, :] * np.ones((1, 2, 2, 1))
  row = sources.structure(images, labels)
  assert row['distinct_classes'] == 3 and row['confidence'] == 1
  # Mean label (1/4, 1/4, 1/2): exp of its entropy.
  assert row['effective_classes'] == pytest.approx(np.exp(1.5 * np.log(2)), rel=1e-6)
  assert row['pixel_label_cka'] == pytest.approx(1, abs=1e-5)
  # One label for every image: no spread, and nothing to align with.
  same = sources.structure(images, np.tile(labels[:1], (8, 1)))
  assert same['distinct_classes'] == 1 and same['label_kernel_spread'] == 0


def test_synflow_of_a_linear_chain(quick_compiles):
  # R = 1^T |W1| |W2| 1 is linear in each layer's weights, so each contributes R.
  model = LinearChain()
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 5)))
  w1, w2 = (np.abs(variables['params'][n]['kernel']) for n in ('first', 'second'))
  flow = np.ones(5) @ w1 @ w2 @ np.ones(3)
  np.testing.assert_allclose(zc.synflow(model, variables, image_shape=(5,)), np.log(2 * flow),
                             rtol=1e-5)


def test_params_and_flops_are_the_analytic_cost():
  ops = (3, 3, 3, 1, 3, 2)
  macs, params = nb201.cost(ops, 10)
  assert zc.params_and_flops(ops) == {'params': params, 'flops': macs}


SIZE = (8, 8, 3)
CELLS = ((3, 3, 3, 1, 3, 2),  # five convolutions and a skip
         (0, 1, 2, 4, 0, 3),  # every op
         (1, 0, 0, 0, 0, 0))  # no path from input to output: every score undefined or lowest


@pytest.fixture(scope='module')
def small_supernet():
  model = zc.supernet(10, channels=2, cells_per_stage=1)
  # Jitted with XLA's optimizations off: seconds faster than running every branch eagerly.
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    variables = jax.jit(zc.init_supernet, static_argnums=(0, 1, 2))(model, 0, SIZE)
  finally:
    jax.config.update('jax_disable_most_optimizations', False)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(4,) + SIZE), jnp.float32)
  p = jnp.asarray(_softmax(rng.normal(size=(4, 10))), jnp.float32)
  return model, variables, images, p


def _check_stand_alone_scores(model, variables, images, p, cells):
  data, flow = zc.scorer(model, num_groups=2, image_shape=SIZE)
  for ops in cells:
    arch = jnp.asarray(ops, jnp.int32)
    got = {k: float(v) for k, v in data(variables, arch, images, p).items()}
    got['synflow'] = float(flow(variables, arch))
    alone = nb201.NB201Net(10, 2, 1, ops=ops, axis_name=None)
    alone_variables = zc.stand_alone_variables(variables, ops)
    template = jax.eval_shape(lambda m=alone: m.init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1,) + SIZE)))
    assert (jax.tree_util.tree_structure(alone_variables)
            == jax.tree_util.tree_structure(template))
    want = jax.jit(lambda v, m=alone: dict(zc.measures(m, v, images, p),
                                           synflow=zc.synflow(m, v, image_shape=SIZE)))
    want = {k: float(v) for k, v in want(alone_variables).items()}
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                               rtol=1e-4, atol=1e-5, err_msg=str(ops))
  return got


def test_the_supernet_scores_a_cell_as_its_stand_alone_network(small_supernet, quick_compiles):
  _check_stand_alone_scores(*small_supernet, CELLS[1:2])


@pytest.mark.slow
def test_the_supernet_scores_more_cells_as_their_stand_alone_networks(small_supernet,
                                                                      quick_compiles):
  got = _check_stand_alone_scores(*small_supernet, CELLS[::2])
  # The cell that ignores its input: NaN or -inf, and ranked last.
  assert not np.isfinite([got['naswot'], got['jacob_cov'], got['synflow']]).any()
  assert zc.rankable([np.nan])[0] == -np.inf


@pytest.mark.slow
def test_every_relu_is_counted_and_synflow_rescaling_is_exact(small_supernet, quick_compiles):
  model, variables, images, p = small_supernet
  ops = CELLS[0]
  arch = jnp.asarray(ops, jnp.int32)
  forward_codes = {}

  def units(side, width):
    return side * side * width
  # Five convolutions per cell at 8, 4 and 2 px (2, 4, 8 channels); the reductions' two
  # ReLUConvBNs; the final ReLU.
  cells = 5 * (units(8, 2) + units(4, 4) + units(2, 8))
  reductions = units(8, 2) + units(4, 4) + units(4, 4) + units(2, 8)
  expected = cells + reductions + units(2, 8)
  with jax.disable_jit():
    recorder = zc._Recorder(codes=True)
    with nn.intercept_methods(recorder):
      model.apply(variables, images, arch, train=True, mutable=['batch_stats'])
    forward_codes['kernel'] = recorder.kernel(4)
    direct = zc.synflow(model, variables, arch, SIZE, rescale=False)
  np.testing.assert_array_equal(np.diag(forward_codes['kernel']), expected)
  np.testing.assert_allclose(zc.synflow(model, variables, arch, SIZE), direct, rtol=1e-5)


def test_the_study_scores_cells_on_every_source(nb201_table_path, data_dir, tmp_path,
                                                quick_compiles):
  from dfnas_jax import stages
  from dfnas_jax.configs import zero_cost_study as study_config
  from dfnas_jax.evaluation import zero_cost_study
  config = study_config.get_config('smoke')
  config.update(benchmark_table=nb201_table_path, real_dataset='cifar10_jpeg',
                real_data_dir=data_dir, real_train_split='train[:45000]', download=False)
  summary = stages.run(config, str(tmp_path))
  assert summary['num_architectures'] == 4
  results = zero_cost_study.wd.read_json(str(tmp_path / 'results.json'))
  sources = config.sources.split(',')
  assert set(results['scores']) == set(zc.ESTIMATORS)
  assert all(set(results['scores'][e]) == set(sources) for e in zc.DATA_ESTIMATORS)
  assert set(results['scores']['params']) == {'none'}
  assert all(len(v) == 4 for per in results['scores'].values() for v in per.values())
  assert (tmp_path / 'scatter_naswot.png').exists()
  size_and_data = results['size_and_data']
  assert set(size_and_data) == set(zc.ESTIMATORS) - {'params'}
  assert set(size_and_data['naswot']['full']) == {
      'with_params', 'partial_given_params', 'within_equal_params', 'with_noise'}
  assert 'tau within equal params' in (tmp_path / 'results.md').read_text()
  # A rerun reads the saved cells back instead of scoring them again.
  assert stages.run(config, str(tmp_path))['kendall_tau'] == summary['kendall_tau']
  # Another study reuses the synthetic set instead of synthesizing it again.
  pool = lambda workdir: zero_cost_study.Sources(config, str(workdir)).pool(
      'full', np.random.default_rng(0))
  synthesized = pool(tmp_path)
  config.synthetic_datasets = f'full={tmp_path / "data" / "full" / "synthetic"}'
  np.testing.assert_array_equal(pool(tmp_path / 'reusing'), synthesized)
  assert not (tmp_path / 'reusing').exists()
  # Fewer estimators: only theirs are scored, and a work directory of others is refused.
  config.update(estimators='naswot,params', sources='full,noise')
  with pytest.raises(ValueError, match='other cells or settings'):
    stages.run(config, str(tmp_path))
  stages.run(config, str(tmp_path / 'fewer'))
  fewer = zero_cost_study.wd.read_json(str(tmp_path / 'fewer' / 'results.json'))
  assert {e: set(v) for e, v in fewer['scores'].items()} == {'naswot': {'full', 'noise'},
                                                              'params': {'none'}}
  np.testing.assert_allclose(fewer['scores']['naswot']['full'],
                             results['scores']['naswot']['full'], rtol=1e-5)


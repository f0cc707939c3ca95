"""ProxylessNAS: search space, binary gates and their estimator, cost tables, the stage."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import proxylessnas as proxylessnas_config
from dfnas_jax import models, teachers
from dfnas_jax.models import proxyless as space_lib
from dfnas_jax.nas import common, latency
from dfnas_jax.nas import proxyless as stage
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps
from tests.conftest import REPO

TINY = space_lib.SPACES['proxyless_tiny']


def _params(variables):
  return int(sum(x.size for x in jax.tree_util.tree_leaves(variables['params'])))


def test_space_layers_zero_candidates_costs_and_names():
  allowed = TINY.allowed()
  assert [layer.residual for layer in TINY.layers()] == [True, True, False]
  assert allowed[:, :space_lib.ZERO].all() and allowed[:, space_lib.ZERO].tolist() == [
      True, True, False]
  reference = space_lib.SPACES['proxyless_imagenet']
  assert reference.num_layers == 21 and reference.allowed()[:, space_lib.ZERO].sum() == 15
  choices = (space_lib.ZERO, 5, 1)
  name = space_lib.architecture_name('proxyless_tiny', choices)
  assert name == 'proxyless_tiny:651' and space_lib.parse_name(name) == ('proxyless_tiny', choices)
  network = models.build_model(name, num_classes=10)
  variables = state_lib.init_variables(network, jax.random.PRNGKey(0), 32)
  assert 'layer0' not in variables['params']  # zero: the layer is skipped
  assert _params(variables) == space_lib.cost(TINY, choices, 10)[1]
  macs = space_lib.cost(TINY, choices, 10)[0]
  assert macs > space_lib.cost(TINY, (space_lib.ZERO, 0, 0), 10)[0]
  with pytest.raises(ValueError, match=r'6 only in the shape-keeping layers \[0, 1\]'):
    space_lib.architecture_name('proxyless_tiny', (0, 0, space_lib.ZERO))
  with pytest.raises(ValueError, match='not a ProxylessNAS architecture'):
    space_lib.parse_name('proxyless_huge:0000')


@pytest.mark.parametrize('layer_index', [0, 2])  # with and without the zero candidate
def test_mixed_layer_path_and_gate_modes_compute_the_same_candidate(layer_index):
  layer = list(TINY.layers())[layer_index]
  mixed = space_lib.MixedLayer(layer, functools.partial(space_lib.MBConv, axis_name=None))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, layer.side, layer.side, layer.in_channels))
  variables = mixed.init(jax.random.PRNGKey(1), x, choice=0)
  assert sorted(variables['params']) == [f'choices_{c}' for c in range(6)]  # zero has none
  apply = jax.jit(functools.partial(mixed.apply, variables))
  outputs = {}
  for c in np.flatnonzero(TINY.allowed()[layer_index]):
    outputs[c] = by_path = apply(x, choice=c)
    all_gates = jax.nn.one_hot(c, space_lib.NUM_CANDIDATES)
    np.testing.assert_allclose(apply(x, gates=all_gates), by_path, atol=1e-5)
    pair, two_gates = jnp.array([(c + 1) % 6, c]), jnp.array([0.0, 1.0])  # active second
    np.testing.assert_allclose(apply(x, gates=two_gates, paths=pair), by_path, atol=1e-5)
  if layer.residual:  # zero skips the layer; the others add their block to the input
    np.testing.assert_array_equal(outputs[space_lib.ZERO], x)
    assert np.abs(outputs[3] - x).max() > 1e-3
  assert len({round(float(jnp.sum(o)), 3) for o in outputs.values()}) == len(outputs)


@pytest.mark.parametrize('layer_index', [0, 2])  # with and without the zero candidate
@pytest.mark.parametrize('mode', ['full', 'two'])
def test_gate_estimator_equals_the_gradient_of_the_expected_loss(layer_index, mode):
  """For a loss linear in the gates (one layer), the binary-gate estimator is exact:
  it equals d/dalpha of E_{active ~ p}[L], with p over all allowed candidates
  ('full') or renormalized over the sampled pair ('two')."""
  layer = list(TINY.layers())[layer_index]
  mixed = space_lib.MixedLayer(layer, functools.partial(space_lib.MBConv, axis_name=None))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, layer.side, layer.side, layer.in_channels))
  variables = mixed.init(jax.random.PRNGKey(1), x, choice=0)
  side = space_lib.out_side(layer.side, layer.stride)
  w = jax.random.normal(jax.random.PRNGKey(2), (2, side, side, layer.out_channels))
  allowed = TINY.allowed()[layer_index:layer_index + 1]
  alphas = jax.random.normal(jax.random.PRNGKey(3), allowed.shape)
  paths, gates = stage.binarize(jax.random.PRNGKey(4), alphas, allowed, mode)

  def loss(gates):  # L(g) = <w, layer(x; g)>
    out = mixed.apply(variables, x, gates=gates[0], paths=None if paths is None else paths[0])
    return jnp.sum(w * out)

  _, _, _, estimate = stage.architecture_gradient(
      loss, gates, paths, alphas, allowed, latency.flops_table(TINY, 10), stage.CostLoss(None))

  candidates = np.arange(space_lib.NUM_CANDIDATES) if paths is None else np.asarray(paths[0])
  per_candidate = jnp.array([jnp.sum(w * mixed.apply(variables, x, choice=int(c)))
                             for c in candidates])

  def expected_loss(alphas):
    if paths is None:
      return jnp.sum(stage.probabilities(alphas, allowed)[0] * per_candidate)
    return jnp.sum(jax.nn.softmax(alphas[0, candidates]) * per_candidate)

  exact = jax.grad(expected_loss)(alphas)
  np.testing.assert_allclose(estimate, exact, rtol=1e-4, atol=1e-4)
  assert np.abs(exact).max() > 1e-3
  if mode == 'two':  # only the sampled pair gets a gradient
    untouched = np.setdiff1d(np.arange(space_lib.NUM_CANDIDATES), candidates)
    assert np.all(np.asarray(estimate)[0, untouched] == 0)
  if layer_index == 2:  # zero is not allowed here: never sampled, no gradient
    assert paths is None or space_lib.ZERO not in candidates.tolist()
    assert estimate[0, space_lib.ZERO] == 0


def test_binarize_samples_allowed_candidates_by_their_probability():
  allowed = TINY.allowed()
  alphas = jnp.zeros(allowed.shape).at[:, 1].set(2.0)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  paths = jax.vmap(lambda k: stage.sample_path(k, alphas, allowed))(keys)
  frequency = np.mean(np.asarray(paths) == 1, axis=0)
  p = np.asarray(stage.probabilities(alphas, allowed))[:, 1]
  np.testing.assert_allclose(frequency, p, atol=0.04)
  assert not np.any(np.asarray(paths)[:, 2:] == space_lib.ZERO)
  pairs, gates = jax.vmap(lambda k: stage.binarize(k, alphas, allowed, 'two'))(keys[:200])
  pairs = np.asarray(pairs)
  assert np.all(pairs[..., 0] != pairs[..., 1])
  assert not np.any(pairs[:, 2:] == space_lib.ZERO)
  assert np.all(np.asarray(gates).sum(-1) == 1)


def test_two_path_rescale_keeps_the_other_candidates_probabilities():
  allowed = TINY.allowed()
  old = jax.random.normal(jax.random.PRNGKey(0), allowed.shape)
  paths = jnp.array([[0, 3], [6, 1], [2, 5]])
  rows = np.arange(3)[:, None]
  new = old.at[rows, paths].add(jnp.array([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.1]]))
  rescaled = stage.rescale_involved(new, old, paths)
  p_old, p_new = (np.asarray(stage.probabilities(a, allowed)) for a in (old, rescaled))
  involved = np.zeros(allowed.shape, bool)
  involved[rows, np.asarray(paths)] = True
  np.testing.assert_allclose(p_new[~involved & allowed], p_old[~involved & allowed], rtol=1e-5)
  np.testing.assert_allclose(p_new[involved].reshape(3, 2).sum(-1),
                             p_old[involved].reshape(3, 2).sum(-1), rtol=1e-5)
  assert not np.allclose(p_new[involved], p_old[involved])  # the update itself survives


@pytest.mark.parametrize('form', ['mul_log', 'add_linear'])
def test_latency_term_moves_probability_to_faster_candidates(form):
  """A flat task loss: only the latency term drives the architecture."""
  allowed = TINY.allowed()
  table = np.tile(np.array([3.0, 6.0, 4.0, 8.0, 5.0, 10.0, 0.0], np.float32), (TINY.num_layers, 1))
  cost = latency.CostTable('latency', 'ms', table, fixed=2.0)
  cost_loss = stage.CostLoss(form, target=10.0)
  tx = optax.adam(1e-2, b1=0.0, b2=0.999)
  alphas = jnp.zeros(allowed.shape)
  opt_state = tx.init(alphas)
  start = float(cost.expected(stage.probabilities(alphas, allowed)))
  for i in range(100):
    paths, gates = stage.binarize(jax.random.PRNGKey(i), alphas, allowed, 'full')
    _, _, expected, grads = stage.architecture_gradient(
        lambda g: jnp.float32(2.3), gates, paths, alphas, allowed, cost, cost_loss)
    updates, opt_state = tx.update(grads, opt_state)
    alphas = optax.apply_updates(alphas, updates)
  probs = np.asarray(stage.probabilities(alphas, allowed))
  assert float(cost.expected(probs)) < start - 1.0
  uniform = np.asarray(stage.probabilities(jnp.zeros(allowed.shape), allowed))
  for layer, p in enumerate(probs):
    ms = np.where(allowed[layer], table[layer], np.nan)
    fastest, slowest = np.nanargmin(ms), np.nanargmax(ms)  # zero where allowed, else 3 ms
    assert p[fastest] == p.max() and p[fastest] > uniform[layer, fastest] + 0.05
    assert p[slowest] < uniform[layer, slowest] - 0.05


def test_one_compiled_step_serves_every_sampled_path(quick_compiles):
  """Paths differ from step to step; neither step compiles again after its first call."""
  # Two layers (one may be zero, one strided) keep the compilation short.
  space = space_lib.SearchSpace(8, 1, 8, (8, 16), (1, 1), (1, 2), 32, 16, TINY.mean, TINY.std)
  model = space_lib.ProxylessNet(space, num_classes=10)
  variables = state_lib.init_variables(model, jax.random.PRNGKey(0), 16)
  allowed = space.allowed()
  assert allowed[:, space_lib.ZERO].tolist() == [True, False]
  tx = state_lib.sgd(optax.constant_schedule(0.05), 0.9, 4e-5)
  arch_tx = optax.adam(1e-3, b1=0.0)
  alphas = jnp.zeros(allowed.shape)
  state = common.SearchState(
      weights=state_lib.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                          batch_stats=variables['batch_stats'], tx=tx),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  p_weight = jax.pmap(functools.partial(
      stage.weight_step, seed=0, allowed=allowed, learning_rate_fn=lambda s: 0.05,
      loss='cross_entropy'), axis_name=steps.AXIS)
  p_arch = jax.pmap(functools.partial(
      stage.arch_step, seed=0, allowed=allowed, mode='two', arch_tx=arch_tx,
      cost=latency.flops_table(space, 10), cost_loss=stage.CostLoss('add_linear', 5.0),
      loss='cross_entropy', temperature=1.0), axis_name=steps.AXIS)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(size=(1, 4, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(10, size=(1, 4)).astype(np.int32)}
  rstate = steps.replicate(state)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event) if 'backend_compile' in event else None)
  for step in range(4):
    rstate, _ = p_weight(rstate, batch)
    rstate, _ = p_arch(rstate, batch)
    if step == 0:
      compiles.clear()
  assert compiles == []
  paths = {tuple(np.asarray(stage.sample_path(jax.random.fold_in(jax.random.PRNGKey(0), s),
                                              alphas, allowed))) for s in range(4)}
  assert len(paths) > 1
  assert int(rstate.weights.step[0]) == 4
  assert not np.allclose(np.asarray(rstate.alphas[0]), 0.0)


def test_cost_tables_flops_and_cached_latency(tmp_path, monkeypatch):
  flops = latency.flops_table(TINY, 10)
  choices = (space_lib.ZERO, 5, 1)
  assert flops.of(choices) == pytest.approx(space_lib.cost(TINY, choices, 10)[0] / 1e6)
  cache = tmp_path / 'latency.json'
  measured = latency.latency_table(TINY, 10, batch_size=2, cache_path=str(cache), repeats=1)
  assert measured.table.shape == (3, space_lib.NUM_CANDIDATES) and measured.fixed > 0
  assert np.all(measured.table[:, :space_lib.ZERO] > 0) and np.all(measured.table[:, -1] == 0)
  saved = json.loads(cache.read_text())
  assert list(saved) == [latency.backend_key()]
  assert len(saved[latency.backend_key()]) == 2 * 6 + 2  # layers 0 and 1 share shapes
  monkeypatch.setattr(latency, 'time_forward', lambda *a, **k: pytest.fail('measured again'))
  again = latency.latency_table(TINY, 10, batch_size=2, cache_path=str(cache), repeats=1)
  np.testing.assert_array_equal(again.table, measured.table)


@pytest.mark.parametrize('field,value,message', [
    ('binary_mode', 'three', 'binary_mode must be one of'),
    ('cost_model', 'energy', 'cost_model must be one of'),
    ('cost_loss', 'exp', 'cost_loss must be one of'),
    ('space', 'proxyless_huge', 'space must be one of'),
    ('arch_update_every', 0, 'arch_update_every must be >= 1'),
    ('compute_dtype', 'fp16', "compute_dtype='fp16': expected one of"),
])
def test_bad_proxylessnas_configs_are_one_clear_error(tmp_path, field, value, message):
  config = proxylessnas_config.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=message):
    stage.run(config, str(tmp_path))


def test_mul_log_needs_a_target_above_one(tmp_path):
  config = proxylessnas_config.get_config('smoke')
  config.cost_model, config.cost_target = 'flops', 0.5
  with pytest.raises(ValueError, match='mul_log needs a cost target above 1'):
    stage.cost_setup(config, TINY, 10, str(tmp_path))


def test_proxylessnas_smoke_end_to_end_resumes_after_kill(data_dir, tmp_path):
  """Kill -9 once the search has checkpointed, rerun: it resumes and finishes once."""
  workdir = tmp_path / 'proxyless'
  cmd = [sys.executable, '-m', 'dfnas_jax.main',
         f'--config={REPO}/configs/proxylessnas.py:smoke', f'--workdir={workdir}',
         '--config.eval_dataset=cifar10_jpeg', f'--config.eval_data_dir={data_dir}',
         '--config.eval_split=train[45000:45064]', '--config.download=False']
  # Unoptimized XLA: these runs are compile-bound; what is checked does not depend on speed.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  checkpoints = workdir / 'search' / 'checkpoints'
  with open(tmp_path / 'first.log', 'w') as log:
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 900
    while not (checkpoints / '6').is_dir() and first.poll() is None and time.time() < deadline:
      time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert (checkpoints / '6').is_dir(), (tmp_path / 'first.log').read_text()[-3000:]
  assert not (workdir / 'summary.json').exists()

  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  # 32 images: 24 weight / 8 architecture images (class-balanced), 6 weight steps an epoch.
  assert 'Resuming the search from step 6 of 12' in out.stderr
  assert 'Measured' not in out.stderr  # the latency table came from the cache
  summary = json.loads((workdir / 'summary.json').read_text())
  assert [h['epoch'] for h in summary['search_history']] == [1, 2]  # no epoch twice
  assert [h['phase'] for h in summary['search_history']] == ['warmup', 'search']
  assert summary['search_steps'] == 12 and summary['warmup_steps'] == 6
  assert summary['arch_steps'] == 3 and summary['binary_mode'] == 'two'
  assert summary['search_val_split']['per_class'] == 1
  found = json.loads((workdir / 'architecture.json').read_text())
  assert found['architecture'] == summary['architecture']
  assert space_lib.parse_name(found['architecture'])[1] == tuple(found['choices'])
  assert found['choices'] == np.argmax(found['probabilities'], axis=-1).tolist()
  assert found['cost_model'] == 'latency' and found['measured_latency_ms'] > 0
  assert found['flops_m'] == pytest.approx(space_lib.cost(TINY, found['choices'], 10)[0] / 1e6)
  table = json.loads((workdir / 'cost_table.json').read_text())
  uniform = stage.probabilities(np.zeros((TINY.num_layers, space_lib.NUM_CANDIDATES)), TINY.allowed())
  expected = table['fixed'] + float(np.sum(np.asarray(uniform) * np.asarray(table['table'])))
  assert found['cost_target'] == pytest.approx(0.8 * expected, rel=1e-5)
  assert found['cost_of_architecture'] == pytest.approx(
      table['fixed'] + sum(table['table'][i][c] for i, c in enumerate(found['choices'])))
  assert (workdir / 'search' / 'probabilities.png').read_bytes()[:4] == b'\x89PNG'
  assert 0 <= summary['final_accuracy'] <= 1
  assert np.isfinite(summary['search_final']['val_loss'])
  module, _, spec = teachers.load(summary['retrain_model_dir'])
  assert spec.architecture == summary['architecture'] and module.choices == tuple(found['choices'])

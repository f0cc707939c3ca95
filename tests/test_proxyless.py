"""ProxylessNAS: search space, binary gates and their estimator, cost tables, the stage."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfnas_jax import models, teachers
from dfnas_jax.configs import proxylessnas as proxylessnas_config
from dfnas_jax.models import layers
from dfnas_jax.models import proxyless as space_lib
from dfnas_jax.nas import binary_gates, latency
from dfnas_jax.nas import proxyless as stage
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps
from tests import notebooks
from tests.conftest import REPO

TINY = space_lib.SPACES['proxyless_tiny']
ALONE = space_lib.BlockSettings(axis_name=None)  # train mode outside pmap


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
def test_mixed_layer_path_and_gate_modes_compute_the_same_candidate(layer_index, quick_compiles):
  layer = list(TINY.layers())[layer_index]
  mixed = space_lib.MixedLayer(layer, functools.partial(space_lib.MBConv, settings=ALONE))
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
def test_gate_estimator_equals_the_gradient_of_the_expected_loss(layer_index, mode, quick_compiles):
  """For a loss linear in the gates (one layer), the binary-gate estimator is exact:
  it equals d/dalpha of E_{active ~ p}[L], with p over all allowed candidates
  ('full') or renormalized over the sampled pair ('two')."""
  layer = list(TINY.layers())[layer_index]
  mixed = space_lib.MixedLayer(layer, functools.partial(space_lib.MBConv, settings=ALONE))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, layer.side, layer.side, layer.in_channels))
  variables = mixed.init(jax.random.PRNGKey(1), x, choice=0)
  side = layers.out_side(layer.side, layer.stride)
  w = jax.random.normal(jax.random.PRNGKey(2), (2, side, side, layer.out_channels))
  allowed = TINY.allowed()[layer_index:layer_index + 1]
  alphas = jax.random.normal(jax.random.PRNGKey(3), allowed.shape)
  paths, gates = binary_gates.binarize(jax.random.PRNGKey(4), alphas, allowed, mode)

  def loss(gates):  # L(g) = <w, layer(x; g)>
    out = mixed.apply(variables, x, gates=gates[0], paths=None if paths is None else paths[0])
    return jnp.sum(w * out)

  _, _, _, estimate = binary_gates.architecture_gradient(
      loss, gates, paths, alphas, allowed, latency.flops_table(TINY, 10),
      binary_gates.CostLoss(None))

  candidates = np.arange(space_lib.NUM_CANDIDATES) if paths is None else np.asarray(paths[0])
  per_candidate = jnp.array([jnp.sum(w * mixed.apply(variables, x, choice=int(c)))
                             for c in candidates])

  def expected_loss(alphas):
    if paths is None:
      return jnp.sum(binary_gates.probabilities(alphas, allowed)[0] * per_candidate)
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
  paths = jax.vmap(lambda k: binary_gates.sample_path(k, alphas, allowed))(keys)
  frequency = np.mean(np.asarray(paths) == 1, axis=0)
  p = np.asarray(binary_gates.probabilities(alphas, allowed))[:, 1]
  np.testing.assert_allclose(frequency, p, atol=0.04)
  assert not np.any(np.asarray(paths)[:, 2:] == space_lib.ZERO)
  pairs, gates = jax.vmap(lambda k: binary_gates.binarize(k, alphas, allowed, 'two'))(keys[:200])
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
  rescaled = binary_gates.rescale_involved(new, old, paths)
  p_old, p_new = (np.asarray(binary_gates.probabilities(a, allowed)) for a in (old, rescaled))
  involved = np.zeros(allowed.shape, bool)
  involved[rows, np.asarray(paths)] = True
  np.testing.assert_allclose(p_new[~involved & allowed], p_old[~involved & allowed], rtol=1e-5)
  np.testing.assert_allclose(p_new[involved].reshape(3, 2).sum(-1),
                             p_old[involved].reshape(3, 2).sum(-1), rtol=1e-5)
  assert not np.allclose(p_new[involved], p_old[involved])  # the update itself survives


def test_layerwise_adam_is_torch_adam_with_one_parameter_per_layer():
  """The reference's torch.optim.Adam: a step count per parameter (each layer's
  logits), weight decay added to the gradient, and a parameter whose grad is None
  (`skip`) left as it was, its moments and step count included."""
  lr, b1, b2, eps, wd = 0.1, 0.5, 0.999, 1e-8, 1e-2
  tx = binary_gates.layerwise(optax.chain(optax.add_decayed_weights(wd),
                                          optax.adam(lr, b1=b1, b2=b2, eps=eps)))
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  state = tx.init(params)
  ref, m, v, t = np.array(params, np.float64), np.zeros((3, 4)), np.zeros((3, 4)), np.zeros(3)
  for skip in np.array([[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 0]], bool):
    grads = rng.normal(size=(3, 4)).astype(np.float32)
    updates, state = tx.update(jnp.asarray(grads), state, params, skip=jnp.asarray(skip))
    params = optax.apply_updates(params, updates)
    for k in np.flatnonzero(~skip):  # torch.optim.Adam's step of parameter k
      t[k] += 1
      g = grads[k] + wd * ref[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g ** 2
      ref[k] -= lr * m[k] / (1 - b1 ** t[k]) / (np.sqrt(v[k] / (1 - b2 ** t[k])) + eps)
  np.testing.assert_allclose(params, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles a whole supernet training step
def test_two_path_arch_step_moves_only_the_drawn_pairs_and_skips_zero_layers(quick_compiles):
  """The reference's two-path step with the cost term on: E[cost] over each layer's
  drawn pair, renormalized (`current_prob_over_ops`); its gradient and the gates'
  reach only the pair, and undrawn logits stay exactly as they were (Adam with
  b1 = 0 and no weight decay). A layer whose active candidate is zero has no
  gradient (grad None): its logits and Adam state do not change."""
  space = space_lib.SearchSpace(8, 1, 8, (8, 16), (1, 1), (1, 2), 32, 16, TINY.mean, TINY.std)
  allowed = space.allowed()  # layer 0 may be zero, layer 1 not
  model = space_lib.ProxylessNet(space, num_classes=10)
  variables = state_lib.init_variables(model, jax.random.PRNGKey(0), 16)
  arch_tx = binary_gates.arch_optimizer(proxylessnas_config.get_config())
  alphas = jax.random.normal(jax.random.PRNGKey(1), allowed.shape).at[0, space_lib.ZERO].set(1.0)
  state = state_lib.SearchState(
      weights=state_lib.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                          batch_stats=variables['batch_stats'],
                                          tx=optax.sgd(0.0)),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  cost = latency.flops_table(space, 10)
  p_arch = jax.pmap(functools.partial(
      binary_gates.arch_step, seed=0, allowed=allowed, mode='two', arch_tx=arch_tx, cost=cost,
      cost_loss=binary_gates.CostLoss('add_linear', 5.0), loss='cross_entropy', temperature=1.0),
      axis_name=steps.AXIS)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(size=(1, 4, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(10, size=(1, 4)).astype(np.int32)}
  rstate = steps.replicate(state)
  rows = np.arange(space.num_layers)[:, None]
  zero_layer_steps = 0
  for step in range(6):
    rstate = rstate.replace(weights=rstate.weights.replace(step=jnp.full((1,), step)))
    old, old_opt = jax.device_get((rstate.alphas[0], rstate.arch_opt_state))
    key = jax.random.fold_in(jax.random.PRNGKey(1), step)  # arch_step's draw
    paths, gates = (np.asarray(a) for a in binary_gates.binarize(key, old, allowed, 'two'))
    rstate, m = p_arch(rstate, batch)
    new = np.asarray(rstate.alphas[0])
    drawn = np.zeros(allowed.shape, bool)
    drawn[rows, paths] = True
    np.testing.assert_array_equal(new[~drawn], old[~drawn])
    pair = lambda a: a[rows, paths]
    expected = cost.fixed + np.sum(np.asarray(jax.nn.softmax(pair(old))) * pair(cost.table))
    assert float(m.unreplicate().compute()['expected_cost']) == pytest.approx(expected,
                                                                          rel=1e-5)
    new_opt = jax.device_get(rstate.arch_opt_state)
    for layer, active in enumerate(paths[rows[:, 0], gates.argmax(-1)]):
      if active == space_lib.ZERO:
        zero_layer_steps += 1
        np.testing.assert_array_equal(new[layer], old[layer])
        for before, after in zip(jax.tree_util.tree_leaves(old_opt),
                                 jax.tree_util.tree_leaves(new_opt)):
          assert before.shape[1:2] == (space.num_layers,)  # [devices, layers, ...]
          np.testing.assert_array_equal(after[:, layer], before[:, layer])
      else:  # the pair moved; the rescale kept its total probability
        assert not np.allclose(new[layer, paths[layer]], old[layer, paths[layer]])
        np.testing.assert_allclose(jax.nn.logsumexp(new[layer, paths[layer]]),
                                   jax.nn.logsumexp(old[layer, paths[layer]]), rtol=1e-5)
  assert 0 < zero_layer_steps < 6  # both cases were drawn in layer 0


@pytest.mark.parametrize('form', ['mul_log', 'add_linear'])
def test_latency_term_moves_probability_to_faster_candidates(form):
  """A flat task loss: only the latency term drives the architecture."""
  allowed = TINY.allowed()
  table = np.tile(np.array([3.0, 6.0, 4.0, 8.0, 5.0, 10.0, 0.0], np.float32), (TINY.num_layers, 1))
  cost = latency.CostTable('latency', 'ms', table, fixed=2.0)
  cost_loss = binary_gates.CostLoss(form, target=10.0)
  tx = optax.adam(1e-2, b1=0.0, b2=0.999)
  alphas = jnp.zeros(allowed.shape)
  opt_state = tx.init(alphas)
  start = float(cost.expected(binary_gates.probabilities(alphas, allowed)))
  for i in range(100):
    paths, gates = binary_gates.binarize(jax.random.PRNGKey(i), alphas, allowed, 'full')
    _, _, expected, grads = binary_gates.architecture_gradient(
        lambda g: jnp.float32(2.3), gates, paths, alphas, allowed, cost, cost_loss)
    updates, opt_state = tx.update(grads, opt_state)
    alphas = optax.apply_updates(alphas, updates)
  probs = np.asarray(binary_gates.probabilities(alphas, allowed))
  assert float(cost.expected(probs)) < start - 1.0
  uniform = np.asarray(binary_gates.probabilities(jnp.zeros(allowed.shape), allowed))
  for layer, p in enumerate(probs):
    ms = np.where(allowed[layer], table[layer], np.nan)
    fastest, slowest = np.nanargmin(ms), np.nanargmax(ms)  # zero where allowed, else 3 ms
    assert p[fastest] == p.max() and p[fastest] > uniform[layer, fastest] + 0.05
    assert p[slowest] < uniform[layer, slowest] - 0.05


@pytest.mark.slow  # compiles a whole supernet training step
def test_one_compiled_step_serves_every_sampled_path(quick_compiles):
  """Paths differ from step to step; neither step compiles again after its first call."""
  # Two layers (one may be zero, one strided) keep the compilation short.
  space = space_lib.SearchSpace(8, 1, 8, (8, 16), (1, 1), (1, 2), 32, 16, TINY.mean, TINY.std)
  model = space_lib.ProxylessNet(space, num_classes=10)
  variables = state_lib.init_variables(model, jax.random.PRNGKey(0), 16)
  allowed = space.allowed()
  assert allowed[:, space_lib.ZERO].tolist() == [True, False]
  tx = state_lib.sgd(optax.constant_schedule(0.05), 0.9, 4e-5)
  arch_tx = binary_gates.layerwise(optax.adam(1e-3, b1=0.0))
  alphas = jnp.zeros(allowed.shape)
  state = state_lib.SearchState(
      weights=state_lib.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                          batch_stats=variables['batch_stats'], tx=tx),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  p_weight = jax.pmap(functools.partial(
      binary_gates.weight_step, seed=0, allowed=allowed, learning_rate_fn=lambda s: 0.05,
      loss='cross_entropy'), axis_name=steps.AXIS)
  p_arch = jax.pmap(functools.partial(
      binary_gates.arch_step, seed=0, allowed=allowed, mode='two', arch_tx=arch_tx,
      cost=latency.flops_table(space, 10), cost_loss=binary_gates.CostLoss('add_linear', 5.0),
      loss='cross_entropy', temperature=1.0), axis_name=steps.AXIS)
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(size=(1, 4, 16, 16, 3)).astype(np.float32),
           'label': rng.integers(10, size=(1, 4)).astype(np.int32)}
  rstate = steps.replicate(state)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event) if 'backend_compile' in event else None)
  path_of = lambda s: np.asarray(binary_gates.sample_path(
      jax.random.fold_in(jax.random.PRNGKey(0), s), alphas, allowed))
  for step in range(4):
    before = jax.device_get(rstate.weights.params)
    rstate, _ = p_weight(rstate, batch)
    if step == 0:  # the candidates off the path keep their weights; the path's move
      after = jax.device_get(rstate.weights.params)
      for i, c in enumerate(path_of(0)):
        for other in range(space_lib.NUM_CANDIDATES):
          name = f'choices_{other}'
          if name in after[f'layer{i}']:
            moved = not np.array_equal(after[f'layer{i}'][name]['project']['kernel'],
                                       before[f'layer{i}'][name]['project']['kernel'])
            assert moved == (other == c), (i, other, c)
    rstate, _ = p_arch(rstate, batch)
    if step == 0:
      compiles.clear()
  assert compiles == []
  paths = {tuple(path_of(s)) for s in range(4)}
  assert len(paths) > 1
  assert int(rstate.weights.step[0]) == 4
  assert not np.allclose(np.asarray(rstate.alphas[0]), 0.0)


@pytest.mark.slow  # times forward passes of every candidate
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
    ('arch_start_epoch', 1, r'arch_start_epoch must be in \[0, num_epochs=1\)'),
    ('compute_dtype', 'fp16', "compute_dtype='fp16': expected one of"),
])
def test_bad_proxylessnas_configs_are_one_clear_error(tmp_path, field, value, message):
  config = proxylessnas_config.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=message):
    stage.run(config, str(tmp_path))


def test_reference_warmup_rate_weight_decay_and_first_architecture_epoch():
  """The imagenet preset's reference settings; the default keeps the project's."""
  reference, default = (proxylessnas_config.get_config(p) for p in ('imagenet', ''))
  lr = binary_gates.weight_schedule(reference, 10, 20)  # warm-up: cosine from lr_max = 0.05
  assert [float(lr(s)) for s in (0, 5, 10)] == pytest.approx([0.05, 0.025, 0.025])
  assert float(binary_gates.weight_schedule(default, 10, 20)(0)) == pytest.approx(0.1)
  params = {'kernel': jnp.ones((2, 2)), 'scale': jnp.ones((2,))}
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  for config, decays_scale in ((default, False), (reference, True)):
    tx = binary_gates.weight_optimizer(config, optax.constant_schedule(1.0))
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates['kernel'][0, 0]) < 0
    assert (float(updates['scale'][0]) < 0) == decays_scale
  # Reference: no architecture step in the first search epoch, then one every 5
  # batches (10 batches an epoch after a 10-step warm-up: the first at step 25).
  counts = [binary_gates.arch_steps_until(reference, 10, 10, s) for s in range(41)]
  assert counts.index(1) == 25 and counts[40] == 4
  assert [binary_gates.arch_steps_until(default, 10, 10, s) for s in (11, 12)] == [0, 1]


def test_bn_epsilon_reaches_every_batch_norm():
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      seen['/'.join(context.module.path)] = context.module.epsilon
    return next_fun(*args, **kwargs)

  model = space_lib.ProxylessNet(TINY, 10, bn_epsilon=1e-3)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert set(seen.values()) == {1e-3}
  assert {'stem/bn', 'head/feature_mix_bn', 'stem/first_block/project_bn'} <= set(seen)
  assert any(k.startswith('layer2/') for k in seen), sorted(seen)


def test_mul_log_needs_a_target_above_one(tmp_path):
  config = proxylessnas_config.get_config('smoke')
  config.cost_model, config.cost_target = 'flops', 0.5
  with pytest.raises(ValueError, match='mul_log needs a cost target above 1'):
    binary_gates.cost_setup(config, TINY, 10, str(tmp_path))


def test_proxylessnas_smoke_end_to_end_resumes_after_kill_then_notebook_04_shows_it(
    data_dir, tmp_path):
  """Kill -9 once the search has checkpointed, rerun: it resumes and finishes once; then
  notebook 04 on the same work directory reuses the run and shows it."""
  workdir = tmp_path / 'proxyless'
  cmd = [sys.executable, '-m', 'dfnas_jax.main',
         f'--config={REPO}/configs/proxylessnas.py:smoke', f'--workdir={workdir}',
         '--config.eval_dataset=cifar10_jpeg', f'--config.eval_data_dir={data_dir}',
         f'--config.eval_split={notebooks.EVAL_SPLIT}', '--config.download=False']
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
  # Saves are asynchronous: under load the step-8 checkpoint can complete before the kill.
  latest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())

  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  # 32 images: 24 weight / 8 architecture images (class-balanced), 6 weight steps an epoch.
  assert f'Resuming the search from step {latest} of 12' in out.stderr
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
  uniform = binary_gates.probabilities(np.zeros((TINY.num_layers, space_lib.NUM_CANDIDATES)),
                                       TINY.allowed())
  expected = table['fixed'] + float(np.sum(np.asarray(uniform) * np.asarray(table['table'])))
  assert found['cost_target'] == pytest.approx(0.8 * expected, rel=1e-5)
  assert found['cost_of_architecture'] == pytest.approx(
      table['fixed'] + sum(table['table'][i][c] for i, c in enumerate(found['choices'])))
  assert (workdir / 'search' / 'probabilities.png').read_bytes()[:4] == b'\x89PNG'
  assert 0 <= summary['final_accuracy'] <= 1
  assert np.isfinite(summary['search_final']['val_loss'])
  module, _, spec = teachers.load(summary['retrain_model_dir'])
  assert spec.architecture == summary['architecture'] and module.choices == tuple(found['choices'])

  nb = notebooks.run('04_proxylessnas', notebooks.search_parameters(workdir, data_dir))
  again = notebooks.check_search(nb, workdir)
  assert again['architecture'] == summary['architecture'] and again['cost_model'] == 'latency'
  assert again['final_accuracy'] == summary['final_accuracy']
  assert json.loads((workdir / 'architecture.json').read_text())['choices'] == found['choices']
  # Cost table, search progress, path probabilities, retraining curves.
  assert notebooks.images_shown(nb) == 4
  assert 'epoch   2 (search)' in notebooks.stdout(nb)

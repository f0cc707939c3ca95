"""DARTS: the search space, genotypes, the hypergradient and the `darts` stage."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfnas_jax import models, teachers
from dfnas_jax.configs import darts as darts_config
from dfnas_jax.models import darts, layers
from dfnas_jax.nas import bilevel
from dfnas_jax.nas import darts as darts_stage
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps
from tests import notebooks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENOTYPE = darts.Genotype(
    normal=(('sep_conv_3x3', 0), ('skip_connect', 1), ('dil_conv_3x3', 0), ('sep_conv_5x5', 2),
            ('max_pool_3x3', 1), ('avg_pool_3x3', 3), ('skip_connect', 0), ('dil_conv_5x5', 4)),
    reduce=(('max_pool_3x3', 0), ('skip_connect', 1), ('avg_pool_3x3', 2), ('sep_conv_3x3', 0),
            ('skip_connect', 2), ('dil_conv_3x3', 1), ('sep_conv_5x5', 4), ('max_pool_3x3', 0)))


@pytest.mark.parametrize('cpu_method', ['sum', 'stacked', 'dense'])
@pytest.mark.parametrize('kernel,stride,dilation', [(3, 1, 1), (5, 2, 1), (3, 1, 2), (5, 2, 2)])
def test_depthwise_conv_matches_grouped_convolution(kernel, stride, dilation, cpu_method):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, 3))
  pad = dilation * (kernel - 1) // 2
  def grouped(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=3)
  def conv(x, w):
    return layers.depthwise_conv(x, w, stride, dilation, cpu_method)
  expected = grouped(x, w)
  np.testing.assert_allclose(conv(x, w), expected, atol=1e-5, rtol=1e-5)
  # The gradients too: 'sum' and 'dense' write their own.
  g = jax.random.normal(jax.random.PRNGKey(2), expected.shape)
  def first_order(f):
    return jax.grad(lambda x, w: (f(x, w) * g).sum(), (0, 1))(x, w)
  for got, want in zip(first_order(conv), first_order(grouped)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if cpu_method != 'dense' or stride != dilation:  # (3, 1, 1) and (5, 2, 2) are enough here
    return
  # And DARTS' exact hypergradient through the hand-written backward passes: the gradient
  # of a loss after a weight step, for kernels stacked and scanned as the edges are (in
  # float64: float32 rounding alone moves it by 1e-4).
  def hypergradient(f):
    def loss(kernels, a):
      def edge(x, kernel):  # x + the edge's output, repeated back to x's side
        y = jnp.repeat(jnp.repeat(jnp.tanh(a * f(x, kernel)), stride, 1), stride, 2)
        return x + y[:, :x.shape[1], :x.shape[2]], None
      return (jax.lax.scan(edge, x.astype(jnp.float64), kernels)[0] ** 2).sum()
    kernels = jnp.stack([w, -0.5 * w]).astype(jnp.float64)
    return jax.grad(lambda a: loss(kernels - 0.1 * jax.grad(loss)(kernels, a), a))(1.5)
  # That leaves out how the input gradient moves with the kernel; a Hessian has it.
  def input_gradient_norm_grad(f):
    def input_gradient_norm(w):
      gx = jax.grad(lambda x: (jnp.tanh(f(x, w)) * g).sum())(x.astype(jnp.float64))
      return (gx ** 2).sum()
    return jax.grad(input_gradient_norm)(w.astype(jnp.float64))
  with jax.enable_x64(True):
    np.testing.assert_allclose(hypergradient(conv), hypergradient(grouped), rtol=1e-10)
    np.testing.assert_allclose(input_gradient_norm_grad(conv), input_gradient_norm_grad(grouped),
                               rtol=1e-10, atol=1e-12)


def test_pooling_does_not_count_padding():
  op = darts.Operation(4, 1, primitive='avg_pool_3x3')
  x = jnp.ones((1, 4, 4, 4))
  y = op.apply({}, x)
  np.testing.assert_allclose(y, 1.0)  # counting the zero padding would give 4/9 in a corner


def test_genotype_keeps_the_two_strongest_non_none_edges_per_node():
  alphas = {t: np.zeros((darts.NUM_EDGES, len(darts.PRIMITIVES))) for t in darts.CELL_TYPES}
  normal = alphas['normal']
  normal[:, 0] = 10.0  # 'none' is strongest everywhere and must be ignored
  # Node 0 (edges 0, 1): sep_conv_5x5 from input 1 beats max_pool from input 0.
  normal[0, darts.PRIMITIVES.index('max_pool_3x3')] = 2.0
  normal[1, darts.PRIMITIVES.index('sep_conv_5x5')] = 3.0
  # Node 1 (edges 2, 3, 4): strongest inputs are 2 (skip) and 0 (dil_conv_3x3).
  normal[4, darts.PRIMITIVES.index('skip_connect')] = 5.0
  normal[2, darts.PRIMITIVES.index('dil_conv_3x3')] = 4.0
  normal[3, darts.PRIMITIVES.index('avg_pool_3x3')] = 1.0
  genotype = darts.derive_genotype(alphas)
  assert genotype.normal[:4] == (('sep_conv_5x5', 1), ('max_pool_3x3', 0),
                                 ('skip_connect', 2), ('dil_conv_3x3', 0))
  assert len(genotype.reduce) == 8 and all(op != 'none' for op, _ in genotype.reduce)
  assert darts.Genotype.from_json(genotype.to_json()) == genotype


def test_architecture_names_round_trip_and_bad_names_are_clear():
  name = darts.architecture_name(GENOTYPE, 16, 8, auxiliary=True, drop_path=0.2)
  assert name.startswith('darts:16x8+aux+dp0.2:sep_conv_3x3@0,')
  assert darts.parse_name(name) == dict(genotype=GENOTYPE, init_channels=16, layers=8,
                                        auxiliary=True, drop_path=0.2)
  with pytest.raises(ValueError, match='is not a DARTS architecture'):
    darts.parse_name('darts:16x8:sep_conv_3x3@0')
  with pytest.raises(ValueError, match='node 0 can only read states 0..1'):
    darts.parse_name(name.replace('sep_conv_3x3@0', 'sep_conv_3x3@3', 1))
  with pytest.raises(ValueError, match="unknown \\['conv_9x9'\\]"):
    darts.parse_name(name.replace('sep_conv_3x3@0', 'conv_9x9@0', 1))


def test_search_network_shapes_and_architecture_inputs():
  model = darts.DARTSSearchNet(10, init_channels=2, layers=3)
  images = jnp.zeros((2, 8, 8, 3))
  alphas = darts.initial_alphas(jax.random.PRNGKey(0))
  assert alphas['normal'].shape == (14, 8) and float(jnp.abs(alphas['normal']).max()) < 0.01
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, alphas))
  params = variables['params']
  # Cells 1 and 2 reduce (layers // 3, 2 * layers // 3).
  assert sorted(params) == ['cell0', 'cell1', 'cell2', 'classifier', 'stem_bn', 'stem_conv']
  assert 'preprocess0' in params['cell2'] and 'conv_1' in params['cell2']['preprocess0']
  # The 8 edges from the cell inputs and the 6 between nodes are two scans over stacked
  # parameters. Each edge holds the 4 convolutions; pools, 'none' and an identity skip have
  # none, but a strided skip (reduction cell edges from the inputs) is FactorizedReduce.
  convs = {'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5'}
  for cell, strided_skip in (('cell0', False), ('cell1', True)):
    assert sorted(k for k in params[cell] if k.startswith('edges')) == [
        'edges_from_inputs', 'edges_from_nodes']
    for group, num_edges in (('edges_from_inputs', 8), ('edges_from_nodes', 6)):
      ops = params[cell][group]['edge']
      strided = strided_skip and group == 'edges_from_inputs'
      assert set(ops) == convs | ({'skip_connect'} if strided else set())
      assert {x.shape[0] for x in jax.tree_util.tree_leaves(ops)} == {num_edges}
  out = jax.eval_shape(lambda v: model.apply(v, images, alphas), variables)
  assert out.shape == (2, 10)


def test_each_architecture_row_weights_its_own_edge(quick_compiles):
  """One-hot weights: identity skips on edge e and on n_i <- s0 for the nodes before e's."""
  cell = darts.SearchCell(4, affine=False, axis_name=None)
  s0, s1 = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 6, 6, 4))
  skip, none = darts.PRIMITIVES.index('skip_connect'), darts.PRIMITIVES.index('none')
  variables = cell.init(jax.random.PRNGKey(1), s0, s1, jnp.ones((14, 8)) / 8)
  apply = jax.jit(lambda weights: cell.apply(variables, s0, s1, weights))
  labels = darts.edge_labels()
  for e in range(darts.NUM_EDGES):
    node, source = (int(t) for t in labels[e][1:].split(' <- '))
    weights = np.zeros((14, 8))
    weights[:, none] = 1.0
    for row in [labels.index(f'n{i} <- 0') for i in range(node)] + [e]:
      weights[row] = np.eye(8)[skip]
    out = np.asarray(apply(jnp.asarray(weights)))
    blocks = [out[..., 4 * i:4 * i + 4] for i in range(darts.NUM_NODES)]
    first = blocks[0] if node else blocks[node]  # the preprocessed s0 (or s1 if e reads it)
    assert np.abs(first).max() > 0, labels[e]
    for i, block in enumerate(blocks):
      if i < node:  # n_i <- s0, so every earlier state equals preprocessed s0
        np.testing.assert_allclose(block, blocks[0], err_msg=labels[e])
      elif i == node and source != 1 and node:
        np.testing.assert_allclose(block, blocks[0], err_msg=labels[e])
      elif i == node:
        assert np.abs(block).max() > 0, labels[e]
        if source == 1 and node:
          assert np.abs(block - blocks[0]).max() > 0, labels[e]
      else:
        assert np.abs(block).max() == 0, (labels[e], i)


@pytest.mark.slow  # trains a network end to end
def test_genotype_network_trains_with_auxiliary_head_and_drop_path(quick_compiles):
  name = darts.architecture_name(GENOTYPE, 4, 3, auxiliary=True, drop_path=0.3)
  model = models.build_model(name, 10)
  variables = state_lib.init_variables(model, jax.random.PRNGKey(0), 16)
  assert 'aux_head' in variables['params']
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
  assert model.apply(variables, images).shape == (4, 10)  # eval: no auxiliary head

  local = models.build_model(name, 10, axis_name=None)  # train mode outside pmap

  def train_apply(rng):
    return local.apply(variables, images, train=True, mutable=['batch_stats', 'intermediates'],
                       rngs={'dropout': rng})
  logits_a, updates = train_apply(jax.random.PRNGKey(2))
  logits_b, _ = train_apply(jax.random.PRNGKey(3))
  assert steps.auxiliary_logits(updates['intermediates']).shape == (4, 10)
  assert not np.allclose(logits_a, logits_b)  # drop-path depends on the rng

  lr = state_lib.learning_rate_schedule(0.1, 10, 0)
  state = steps.replicate(state_lib.create_train_state(model, jax.random.PRNGKey(0), 16,
                                                       state_lib.sgd(lr, 0.9, 0.0)))
  batch = {'image': images[None], 'label': jnp.arange(4)[None]}
  losses = {}
  for weight in (0.0, 0.4):
    step = steps.pmap_train_step(learning_rate_fn=lr, aux_weight=weight)
    _, m = step(jax.tree_util.tree_map(jnp.copy, state), batch)
    losses[weight] = float(jax.device_get(m.loss.total / m.loss.count)[0])
  # Adds 0.4 x the auxiliary head's cross-entropy (about ln 10 at initialization).
  assert losses[0.4] > losses[0.0] + 0.4 * 0.5


# --- The architecture gradient ------------------------------------------------------------

def _toy_problem():
  """Two tanh branches mixed by softmax(alphas), cross-entropy; float64 for exact checks."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(2, 5, 3))), 'b': jnp.asarray(rng.normal(size=3))}
  alphas = jnp.asarray([0.3, -0.2])

  def batch(seed):
    r = np.random.default_rng(seed)
    return {'x': jnp.asarray(r.normal(size=(16, 5))), 'y': jnp.asarray(r.integers(0, 3, 16))}

  def loss_fn(p, a, b):
    mix = jax.nn.softmax(a)
    logits = sum(mix[k] * jnp.tanh(b['x'] @ p['w'][k]) for k in range(2)) + p['b']
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), b['y']])

  lr = 0.5
  tx = optax.chain(optax.clip_by_global_norm(100.0),
                   optax.add_decayed_weights(3e-4), optax.sgd(lr, momentum=0.9))
  opt_state = tx.init(params)
  # One real step first, so the momentum buffer the virtual step uses is not zero.
  updates, opt_state = tx.update(jax.grad(loss_fn)(params, alphas, batch(3)), opt_state, params)
  params = optax.apply_updates(params, updates)
  return loss_fn, params, alphas, opt_state, tx, batch(1), batch(2), lr


def test_exact_hypergradient_matches_finite_differences_of_the_unrolled_loss():
  with jax.enable_x64(True):
    loss_fn, params, alphas, opt_state, tx, train, val, lr = _toy_problem()

    def unrolled(a):
      return loss_fn(bilevel.virtual_step(loss_fn, params, a, opt_state, tx, train), a, val)

    value, exact = bilevel.hypergradient(loss_fn, params, alphas, opt_state, tx, train, val,
                                           mode='exact')
    h = 1e-5
    numeric = np.array([(unrolled(alphas.at[i].add(h)) - unrolled(alphas.at[i].add(-h))) / (2 * h)
                        for i in range(2)])
    np.testing.assert_allclose(exact, numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(value, unrolled(alphas), rtol=1e-12)

    _, first = bilevel.hypergradient(loss_fn, params, alphas, opt_state, tx, train, val,
                                       mode='first_order')
    second_order_term = np.abs(np.asarray(exact) - np.asarray(first)).max()
    assert second_order_term > 1e-3 * np.abs(np.asarray(exact)).max()  # not vacuous

    # The reference's finite-difference Hessian-vector product approximates the same term.
    _, approx = bilevel.hypergradient(loss_fn, params, alphas, opt_state, tx, train, val,
                                        mode='finite_difference', learning_rate=lr)
    np.testing.assert_allclose(approx, exact, atol=0.02 * second_order_term)


class _MixedBranches(nn.Module):
  """Two dense tanh branches mixed by softmax(alphas): a search network in miniature."""

  @nn.compact
  def __call__(self, x, alphas, train=True):
    mix = jax.nn.softmax(alphas)
    x = x.reshape(x.shape[0], -1)
    return sum(mix[k] * jnp.tanh(nn.Dense(3, name=f'branch{k}')(x)) for k in range(2))


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_search_step_virtual_step_is_the_references_unclipped_one(mode):
  """w' = w - lr (momentum * buffer + grad + wd * w) on the unclipped gradient
  (cnn/architect.py), here under a clip norm that would all but zero the gradient."""
  config = darts_config.get_config()
  config.grad_clip, config.weight_decay, config.learning_rate = 1e-6, 0.05, 0.5
  tx, lr_fn = bilevel.weight_optimizer(config, 10)
  model = _MixedBranches()

  def batch(seed):
    r = np.random.default_rng(seed)
    return {'image': r.normal(size=(1, 8, 2, 2, 3)).astype(np.float32),
            'label': r.integers(0, 3, (1, 8)).astype(np.int32)}
  alphas = jnp.asarray([0.3, -0.2])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch(0)['image'][0], alphas)['params']
  arch_tx = optax.sgd(1.0)  # the hypergradient is the change of alphas
  state = state_lib.SearchState(
      weights=state_lib.create_train_state(model, None, 0, tx, {'params': params,
                                                                'batch_stats': {}}),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  p_step = bilevel.pmap_search_step(
      arch_tx=arch_tx, virtual_tx=bilevel.virtual_step_optimizer(config, lr_fn),
      learning_rate_fn=lr_fn, mode=mode, loss='cross_entropy', temperature=1.0)
  rstate, _, _ = p_step(steps.replicate(state), batch(1), batch(2))  # a momentum buffer
  before = jax.device_get(flax.jax_utils.unreplicate(rstate))
  train, val = batch(3), batch(4)
  rstate, _, arch_metrics = p_step(rstate, train, val)
  after = jax.device_get(flax.jax_utils.unreplicate(rstate))

  def loss_fn(p, a, b):
    logits = model.apply({'params': p}, b['image'][0], a)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), b['label'][0]])

  w, buffer = before.weights.params, optax.tree_utils.tree_get(before.weights.opt_state, 'trace')
  lr = lr_fn(before.weights.step)
  assert before.weights.step == 1 and float(optax.tree.norm(buffer)) > 0

  def unrolled_val_loss(a):
    grads = jax.grad(loss_fn)(w, a, train)
    decay = {'kernel': config.weight_decay, 'bias': 0.0}  # the real step's mask: kernels
    w_virtual = {b: {k: w[b][k] - lr * (config.momentum * buffer[b][k] + grads[b][k]
                                         + decay[k] * w[b][k]) for k in w[b]} for b in w}
    return loss_fn(w_virtual, a, val)

  expected_loss, expected_grad = jax.value_and_grad(unrolled_val_loss)(before.alphas)
  val_loss = flax.jax_utils.unreplicate(arch_metrics).compute()['val_loss']
  np.testing.assert_allclose(val_loss, expected_loss, rtol=1e-5)
  # 'exact' differentiates through that same step; 'finite_difference' approximates it
  # (measured 5e-7 off, with a second-order term of 0.017).
  np.testing.assert_allclose(before.alphas - after.alphas, expected_grad,
                             atol=1e-6 if mode == 'exact' else 1e-4)


def test_hypergradient_rejects_unknown_modes():
  loss_fn, params, alphas, opt_state, tx, train, val, _ = _toy_problem()
  with pytest.raises(ValueError, match="one of \\('first_order', 'exact', 'finite_difference'\\)"):
    bilevel.hypergradient(loss_fn, params, alphas, opt_state, tx, train, val, mode='second')
  with pytest.raises(ValueError, match='needs the weight step'):
    bilevel.hypergradient(loss_fn, params, alphas, opt_state, tx, train, val,
                            mode='finite_difference')


# --- The darts stage ----------------------------------------------------------------------

@pytest.mark.parametrize('field,value,message', [
    ('mode', 'second_order', 'darts mode must be one of'),
    ('loss', 'mse', "darts loss must be 'distillation' or 'cross_entropy'"),
    ('soft_labels', 'oracle', 'soft_labels must be one of'),
    ('compute_dtype', 'fp16', "compute_dtype='fp16': expected one of"),
])
def test_bad_darts_configs_are_one_clear_error(tmp_path, field, value, message):
  config = darts_config.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=message):
    darts_stage.run(config, str(tmp_path))


def test_darts_smoke_end_to_end_resumes_after_kill_then_notebook_03_shows_it(data_dir, tmp_path):
  """Kill -9 once the search has checkpointed, rerun: it resumes and finishes once; then
  notebook 03 on the same work directory reuses the run and shows it."""
  workdir = tmp_path / 'darts'
  cmd = [sys.executable, '-m', 'dfnas_jax.main', f'--config={REPO}/configs/darts.py:smoke',
         f'--workdir={workdir}', '--config.eval_dataset=cifar10_jpeg',
         f'--config.eval_data_dir={data_dir}', f'--config.eval_split={notebooks.EVAL_SPLIT}',
         '--config.download=False', '--config.mode=first_order']
  # The first-order step: what is checked here (kill/resume, the outputs, the notebook) does
  # not depend on the mode, and the exact hypergradient's compilation is most of a run's
  # time; the exact step is checked above (test_exact_hypergradient_..., test_search_step_...).
  # Unoptimized XLA: these runs are compile-bound; what is checked does not depend on speed.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  checkpoints = workdir / 'search' / 'checkpoints'
  with open(tmp_path / 'first.log', 'w') as log:
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 900
    while not (checkpoints / '2').is_dir() and first.poll() is None and time.time() < deadline:
      time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert (checkpoints / '2').is_dir(), (tmp_path / 'first.log').read_text()[-3000:]
  assert not (workdir / 'summary.json').exists()
  killed_s = json.loads((workdir / 'search' / 'wall_time.json').read_text())['2']

  out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  # The search's wall time adds the killed process's kept work to the resumed one's.
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['wall_time_s']['search_s'] > killed_s > 0
  # 32 images: 18 weight / 14 architecture images (half of each class), 4 steps an epoch.
  assert 'Resuming the search from step 2 of 8' in out.stderr
  assert [h['epoch'] for h in summary['search_history']] == [1, 2]  # no epoch twice
  assert summary['search_steps'] == 8 and summary['mode'] == 'first_order'
  assert summary['search_val_split']['fraction'] == 0.5  # class-balanced random halves
  genotype = darts.Genotype.from_json(summary['genotype'])
  assert summary['architecture'] == darts.architecture_name(genotype, 4, 3, True, 0.2)
  assert darts.parse_name(summary['architecture'])['genotype'] == genotype
  for epoch in (1, 2):
    saved = json.loads((workdir / 'search' / 'genotypes' / f'epoch_{epoch:03d}.json').read_text())
    assert np.allclose(np.sum(saved['weights']['normal'], axis=-1), 1.0, atol=1e-3)
  assert darts.Genotype.from_json(saved) == genotype  # the last epoch's is the result
  for png in ('search/alphas.png', 'normal_cell.png', 'reduce_cell.png'):
    assert (workdir / png).read_bytes()[:4] == b'\x89PNG'
  assert summary['params'] > 0 and 0 <= summary['final_accuracy'] <= 1
  assert np.isfinite(summary['search_final']['val_loss'])
  module, _, spec = teachers.load(summary['retrain_model_dir'])
  assert spec.architecture == summary['architecture'] and module.genotype == genotype

  # From the repository root rather than colab/: the notebook finds configs/ either way.
  nb = notebooks.run('03_darts', notebooks.search_parameters(
      workdir, data_dir, {'mode': 'first_order'}), cwd=REPO)
  again = notebooks.check_search(nb, workdir)
  assert again['genotype'] == summary['genotype'] and again['mode'] == 'first_order'
  assert again['final_accuracy'] == summary['final_accuracy']
  # Search curves, heat maps after epochs 1 and 2, both cells, retraining curves.
  assert notebooks.images_shown(nb) == 6
  assert 'epoch_002' in notebooks.stdout(nb)

"""NAS-Bench-201: the cell, names, analytic cost, the one-shot supernet, the DARTS search net."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfnas_jax import models
from dfnas_jax.models import layers, nb201
from dfnas_jax.train import state as state_lib
from tests import model_counts
from tests.supernet_steps import counting_path_step, leaf

SKIP, NONE, CONV1, CONV3, POOL = (nb201.OPS.index(op) for op in (
    'skip_connect', 'none', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3'))
ALL_OPS = (CONV3, POOL, NONE, SKIP, CONV1, CONV3)  # every op, nodes 2 and 3 both used


def _avg_pool_excluding_padding(x):
  """3x3, stride 1, padding 1, dividing by the pixels inside the map (count_include_pad=False)."""
  out = np.zeros_like(x)
  h, w = x.shape[1:3]
  for i in range(h):
    for j in range(w):
      window = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      out[:, i, j] = window.mean(axis=(1, 2))
  return out


def test_cell_matches_a_hand_computed_case():
  # node1 = skip(x); node2 = pool(x) + none(node1); node3 = conv1x1(x) + skip(node1) + pool(node2)
  ops = (SKIP, POOL, NONE, CONV1, SKIP, POOL)
  cell = nb201.Cell(ops=ops)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  variables = cell.init(jax.random.PRNGKey(0), x)
  # Only the 1x1 convolution has variables; give its BN non-trivial statistics and affine.
  assert set(variables['params']) == {'layer3'}
  kernel = rng.normal(size=(1, 1, 3, 3)).astype(np.float32)
  mean, var = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
  scale, bias = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
  variables = {'params': {'layer3': {'conv': {'kernel': kernel},
                                     'bn': {'scale': scale, 'bias': bias}}},
               'batch_stats': {'layer3': {'bn': {'mean': mean, 'var': var}}}}
  out = cell.apply(variables, x)

  conv = np.maximum(x, 0) @ kernel[0, 0]  # ReLU -> conv -> BN
  conv = (conv - mean) / np.sqrt(var + 1e-5) * scale + bias
  node2 = _avg_pool_excluding_padding(x)
  np.testing.assert_allclose(out, conv + x + _avg_pool_excluding_padding(node2),
                             rtol=1e-5, atol=1e-5)

  # The border windows average only the pixels inside the map: a constant map stays constant
  # (with the padding counted, a corner would be 4/9 of it).
  ones = np.ones((1, 4, 4, 2), np.float32)
  chain = nb201.Cell(ops=(POOL, NONE, POOL, NONE, NONE, POOL))  # pool(pool(pool(x)))
  np.testing.assert_allclose(chain.apply({}, ones), ones, rtol=1e-6)
  dead_end = nb201.Cell(ops=(SKIP, POOL, CONV3, NONE, NONE, NONE))  # node 3: only `none` inputs
  dead_variables = dead_end.init(jax.random.PRNGKey(0), ones)
  assert set(dead_variables['params']) == {'layer2'}  # kept, as the benchmark counts it
  np.testing.assert_array_equal(dead_end.apply(dead_variables, ones), 0.0)
  corner = nb201.Cell(ops=(NONE, NONE, NONE, POOL, NONE, NONE)).apply({}, x)[:, 0, 0]
  np.testing.assert_allclose(corner, x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize('kernel_size', [1, 3])
def test_conv_same_and_its_gradients_equal_lax_convolution(kernel_size, monkeypatch):
  rng = np.random.default_rng(kernel_size)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 5, 7, 4)), jnp.float32)
  pad = (kernel_size - 1) // 2
  reference = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(nb201.conv_same(x, kernel), reference(x, kernel), rtol=1e-5,
                             atol=1e-5)
  # Inside a switch branch, as the supernet runs it.
  ours = jax.grad(lambda x, k: jax.lax.switch(
      0, [lambda x, k: jnp.sum(nb201.conv_same(x, k) * target)], x, k), argnums=(0, 1))(x, kernel)
  expected = jax.grad(lambda x, k: jnp.sum(reference(x, k) * target), argnums=(0, 1))(x, kernel)
  for a, b in zip(ours, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Accelerators run lax's convolution directly: the same result.
  module, variables = nb201.SameConv(4, kernel_size), {'params': {'kernel': kernel}}
  on_cpu = module.apply(variables, x)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  np.testing.assert_allclose(module.apply(variables, x), on_cpu, rtol=1e-5, atol=1e-5)


def test_names_round_trip_and_bad_ones_are_rejected():
  string = nb201.arch_to_string(ALL_OPS)
  assert nb201.architecture_name(ALL_OPS) == f'nb201:{string}'
  assert nb201.architecture_name(ALL_OPS, 8, 2) == f'nb201-8x2:{string}'
  assert nb201.architecture_name(None, 8, 2) == 'nb201-8x2'
  assert nb201.architecture_name(None) == 'nb201'
  for name, parsed in ((f'nb201:{string}', (16, 5, ALL_OPS)),
                       (f'nb201-8x2:{string}', (8, 2, ALL_OPS)),
                       ('nb201', (16, 5, None)), ('nb201-8x2', (8, 2, None))):
    assert nb201.parse_name(name) == parsed
    assert nb201.architecture_name(parsed[2], *parsed[:2]) == name
    model = models.build_model(name, 10)
    assert isinstance(model, nb201.NB201Net)
    assert (model.channels, model.cells_per_stage, model.ops) == parsed

  for bad in ('nb201-8x', 'nb201-0x2', 'nb201-8x2:', f'nb201:{string}|', 'nb201:|none~0|',
              'nb201:' + string.replace('~1', '~0'), 'nb201:' + string.replace('none', 'zero')):
    with pytest.raises(ValueError, match='is not a NAS-Bench-201 architecture'):
      models.build_model(bad, 10)
  with pytest.raises(ValueError, match='NAS-Bench-201 network'):
    models.build_model('nb201x', 10)  # not ours: the unknown-name error lists the form
  assert nb201.is_name('nb201-4x1') and not nb201.is_name('nb2010')


def _counted(model, variables, size):
  """(multiply-adds of the convolutions and Dense layers `model` really runs, parameters)."""
  return (model_counts.multiply_adds(model, variables, size, (nn.Conv, nn.Dense, nb201.SameConv)),
          model_counts.num_params(variables))


@pytest.mark.parametrize('channels,cells,size', [(4, 1, 8), (8, 2, 16)])
def test_analytic_cost_equals_the_network(channels, cells, size):
  rng = np.random.default_rng(channels)
  archs = [ALL_OPS, (NONE,) * 6, (CONV3,) * 6] + [
      tuple(int(o) for o in rng.integers(0, 5, 6)) for _ in range(4)]
  for arch in archs:
    model = models.build_model(nb201.architecture_name(arch, channels, cells), 10)
    counted = _counted(model, model_counts.shapes(model, size), size)
    assert nb201.cost(arch, 10, channels, cells, size) == counted, arch
  # One path of the supernet: its cells' BNs are affine-free.
  supernet = models.build_model(nb201.architecture_name(None, channels, cells), 10)
  params = model_counts.shapes(supernet, size)['params']
  ones = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape), params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, ones)
  for arch in archs[:3]:
    used = layers.keep_unused(ones, zeros, jnp.asarray(arch))  # 1 where the path trains it
    assert nb201.cost(arch, 10, channels, cells, size, affine=False)[1] == sum(
        int(x.sum()) for x in jax.tree_util.tree_leaves(used))


def test_benchmark_network_matches_the_published_sizes():
  # NAS-Bench-201 (v1_1-096897, CIFAR-10) lists the all-3x3 cell at 1.531546 M parameters,
  # 220.11969 MFLOPs, and the all-`none` cell at 0.073306 M, 7.78305 MFLOPs; CIFAR-100 adds
  # the 90 extra classifier outputs (1.537396 M, 0.079156 M). Its FLOPs also count the
  # classifier's bias additions (num_classes), which `cost` leaves out.
  assert nb201.cost((CONV3,) * 6, 10) == (220_119_690 - 10, 1_531_546)
  assert nb201.cost((NONE,) * 6, 10) == (7_783_050 - 10, 73_306)
  assert nb201.cost((CONV3,) * 6, 100)[1] == 1_537_396
  assert nb201.cost((NONE,) * 6, 100)[1] == 79_156
  model = models.build_model(nb201.architecture_name((CONV3,) * 6), 10)
  assert _counted(model, model_counts.shapes(model, 32), 32) == (220_119_680, 1_531_546)


def _standalone_variables(supernet_variables, arch):
  """The supernet's weights of path `arch` laid out for the stand-alone network, whose cell
  BNs keep their initial scale 1 and bias 0 (the supernet's are affine-free)."""
  def cells(tree, with_affine):
    out = {}
    for name, value in tree.items():
      if not name.startswith('cell'):
        out[name] = value
        continue
      out[name] = {}
      for e, op in enumerate(arch):
        if nb201.OPS[op] in nb201.KERNELS:
          chosen = dict(value[f'layer{e}'][f'choices_{op}'])
          if with_affine:
            width = chosen['conv']['kernel'].shape[-1]
            chosen['bn'] = {'scale': jnp.ones(width), 'bias': jnp.zeros(width)}
          out[name][f'layer{e}'] = chosen
    return out
  return {'params': cells(supernet_variables['params'], True),
          'batch_stats': cells(supernet_variables['batch_stats'], False)}


@functools.partial(jax.jit, static_argnums=0, static_argnames='train')
def _apply(model, variables, images, *args, train=False):
  """Logits; in training mode with this batch's BN statistics (one compile, not eager ops)."""
  if train:
    return model.apply(variables, images, *args, train=True, mutable=['batch_stats'])[0]
  return model.apply(variables, images, *args)


@pytest.mark.slow  # compiles a whole supernet training step
def test_supernet_compiles_once_keeps_unused_choices_and_equals_the_standalone_network(
    quick_compiles):
  model = models.build_model('nb201-4x1', 10)
  step, state, traces, batch = counting_path_step('nb201-4x1', 8)
  initial = jax.device_get(state)
  state = step(state, (CONV3,) * 6)
  after_a = jax.device_get(state)
  state = step(state, (CONV1,) * 6)  # the 3x3s now have momentum and decay, yet are not used
  after_b = jax.device_get(state)
  state = step(state, ALL_OPS)
  assert len(traces) == 1

  kernel = ('cell1', 'layer4', 'choices_{}', 'conv', 'kernel')
  param = lambda s, c: leaf(s.params, *(k.format(c) for k in kernel))[0]
  trace = lambda s, c: leaf(s.opt_state[1][0].trace, *(k.format(c) for k in kernel))[0]
  assert not np.array_equal(param(initial, CONV3), param(after_a, CONV3))
  np.testing.assert_array_equal(param(initial, CONV1), param(after_a, CONV1))
  np.testing.assert_array_equal(param(after_a, CONV3), param(after_b, CONV3))
  np.testing.assert_array_equal(trace(after_a, CONV3), trace(after_b, CONV3))
  assert not np.array_equal(param(after_a, CONV1), param(after_b, CONV1))
  assert not np.array_equal(leaf(after_a.params, 'reduce2', 'shortcut', 'kernel'),
                            leaf(after_b.params, 'reduce2', 'shortcut', 'kernel'))

  # The trained supernet's path is the stand-alone network with the same weights: with batch
  # statistics (train) and with the running statistics the steps accumulated (eval).
  trained = jax.device_get(state)
  variables = jax.tree_util.tree_map(lambda x: x[0], {'params': trained.params,
                                                      'batch_stats': trained.batch_stats})
  standalone = models.build_model(nb201.architecture_name(ALL_OPS, 4, 1), 10)
  standalone_variables = _standalone_variables(variables, ALL_OPS)
  assert (jax.tree_util.tree_structure(standalone_variables)
          == jax.tree_util.tree_structure(model_counts.shapes(standalone, 8)))
  images = batch['image'][0]
  arch = jnp.asarray(ALL_OPS, jnp.int32)
  for train in (False, True):
    supernet = _apply(model.clone(axis_name=None), variables, images, arch, train=train)
    alone = _apply(standalone.clone(axis_name=None), standalone_variables, images, train=train)
    np.testing.assert_allclose(supernet, alone, rtol=1e-5, atol=1e-5)


def test_search_network_reduces_to_the_path_of_one_hot_alphas(quick_compiles):
  search = nb201.NB201SearchNet(10, channels=4, cells_per_stage=1, axis_name=None)
  supernet = models.build_model('nb201-4x1', 10).clone(axis_name=None)
  variables = state_lib.init_variables(search, jax.random.PRNGKey(1), 8)
  # One layout: weights move between DARTS and one-shot training unchanged.
  assert (jax.tree_util.tree_structure(variables)
          == jax.tree_util.tree_structure(model_counts.shapes(supernet, 8)))
  images = np.random.default_rng(0).random((4, 8, 8, 3), np.float32)
  for arch in (ALL_OPS, (SKIP, CONV1, POOL, NONE, CONV3, SKIP)):
    alphas = {'cell': 1e4 * jax.nn.one_hot(jnp.asarray(arch), len(nb201.OPS))}
    assert nb201.derive_architecture(alphas) == arch
    for train in (False, True):
      mixed = _apply(search, variables, images, alphas, train=train)
      path = _apply(supernet, variables, images, jnp.asarray(arch, jnp.int32), train=train)
      np.testing.assert_allclose(mixed, path, rtol=1e-5, atol=1e-5)

  # The architecture gradient reaches every op of every edge.
  alphas = nb201.initial_alphas(jax.random.PRNGKey(0))
  grad = jax.jit(jax.grad(lambda a: search.apply(variables, images, a).sum()))(alphas)['cell']
  assert grad.shape == (nb201.NUM_EDGES, len(nb201.OPS)) and np.all(np.asarray(grad) != 0)


def test_initial_alphas_and_derived_architectures():
  alphas = nb201.initial_alphas(jax.random.PRNGKey(0), scale=1e-3)['cell']
  assert alphas.shape == (6, 5) and 0 < float(jnp.abs(alphas).max()) < 5e-3
  np.testing.assert_array_equal(nb201.initial_alphas(None)['cell'], np.zeros((6, 5)))
  logits = np.random.default_rng(0).normal(size=(6, 5))
  logits[0] = [3, 0, 0, 0, 0]  # `none` can win an edge, as in the benchmark's DARTS runs
  derived = nb201.derive_architecture({'cell': logits})
  assert derived == tuple(int(i) for i in logits.argmax(-1)) and derived[0] == NONE
  with pytest.raises(ValueError, match=r'\[6, 5\]'):
    nb201.derive_architecture({'cell': np.zeros((14, 8))})


def test_bfloat16_supernet_gives_float32_logits(quick_compiles):
  # Every op's output must keep the activation dtype, or `nn.switch` rejects the branches.
  model = models.build_model('nb201-4x1', 10, dtype=jnp.bfloat16)
  variables = state_lib.init_variables(model, jax.random.PRNGKey(0), 8)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  images = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
  arch = jnp.asarray(ALL_OPS, jnp.int32)
  out = _apply(model, variables, images, arch)
  assert out.dtype == jnp.float32
  reference = _apply(models.build_model('nb201-4x1', 10), variables, images, arch)
  np.testing.assert_allclose(out, reference, rtol=0.05, atol=0.05 * np.abs(reference).max())
